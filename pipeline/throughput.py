"""Cluster-wide throughput, aggregated on the driver from the rows actors return:
a live line while the job runs, and a report (JSON + PNG chart per node) at the end."""

from __future__ import annotations

import io
import time
from collections import defaultdict


class Throughput:
    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.time()
        self.clips = 0
        self.errors = 0
        self.tokens = 0
        self.accept_sum = 0.0
        self.accept_n = 0
        self.busy_s = 0.0
        self.actors: set[str] = set()
        self.nodes: set[str] = set()
        self.events: list[tuple[float, str, int, int]] = []  # (seconds since start, node, clips, tokens)
        self.rss_mb: dict[str, list[float]] = {}  # actor -> private resident memory after each batch, in order
        self._last_line = 0.0

    def add(self, rows: list[dict]) -> None:
        now = time.time() - self.started
        per_node: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            self.clips += 1
            self.actors.add(r.get("actor", ""))
            self.nodes.add(r["worker_node"])
            self.busy_s += r.get("busy_s", 0.0)
            if r.get("rss_mb"):
                series = self.rss_mb.setdefault(r.get("actor", ""), [])
                if not series or series[-1] != r["rss_mb"]:
                    series.append(r["rss_mb"])
            if r["error"]:
                self.errors += 1
                continue
            self.tokens += r["num_tokens"]
            if r["acceptance_length"] > 0:
                self.accept_sum += r["acceptance_length"]
                self.accept_n += 1
            per_node[r["worker_node"]][0] += 1
            per_node[r["worker_node"]][1] += r["num_tokens"]
        for node, (clips, tokens) in per_node.items():
            self.events.append((now, node, clips, tokens))

    @property
    def elapsed(self) -> float:
        return max(time.time() - self.started, 1e-9)

    @property
    def acceptance_length(self) -> float:
        return self.accept_sum / self.accept_n if self.accept_n else 0.0

    def line(self) -> str:
        return (
            f"[flashcap] {self.clips}/{self.total} clips ({self.errors} errors) | "
            f"{self.clips / self.elapsed:.2f} clips/s | {self.tokens / self.elapsed:.1f} tokens/s | "
            f"acceptance {self.acceptance_length:.2f} | actors {len(self.actors)} | nodes {len(self.nodes)}"
        )

    def maybe_line(self, every_s: float = 5.0) -> str | None:
        if time.time() - self._last_line >= every_s:
            self._last_line = time.time()
            return self.line()
        return None

    def steady(self) -> tuple[float, float]:
        """(clips/s, tokens/s) after the first batch: start-up (Ray, model loads) excluded."""
        if len(self.events) < 2:
            return 0.0, 0.0
        first = min(e[0] for e in self.events)
        span = max(e[0] for e in self.events) - first
        after = [e for e in self.events if e[0] > first]
        if span <= 0:
            return 0.0, 0.0
        return sum(e[2] for e in after) / span, sum(e[3] for e in after) / span

    def report(self, **extra) -> dict:
        steady_clips, steady_tokens = self.steady()
        return {
            "clips": self.clips,
            "errors": self.errors,
            "tokens": self.tokens,
            "seconds": self.elapsed,
            "clips_per_s": self.clips / self.elapsed,
            "tokens_per_s": self.tokens / self.elapsed,
            "steady_clips_per_s": steady_clips,
            "steady_tokens_per_s": steady_tokens,
            "mean_acceptance_length": self.acceptance_length,
            "actor_busy_s": self.busy_s,
            "actors": len(self.actors),
            "nodes": sorted(self.nodes),
            "per_node": self._per_node(),
            "memory": self.memory(),
            **extra,
        }

    def memory(self) -> dict:
        """Caption actors' private resident memory (MB, Linux RssAnon): the peak over each actor's first
        and last quarter of batches, and the largest growth between them (a leak shows here on long runs)."""
        first = last = growth = 0.0
        for series in self.rss_mb.values():
            q = max(1, len(series) // 4)
            head, tail = max(series[:q]), max(series[-q:])
            first, last, growth = max(first, head), max(last, tail), max(growth, tail - head)
        return {"actor_rss_mb_start": first, "actor_rss_mb_end": last, "actor_rss_growth_mb": growth}

    def _per_node(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for _, node, clips, tokens in self.events:
            entry = out.setdefault(node, {"clips": 0, "tokens": 0})
            entry["clips"] += clips
            entry["tokens"] += tokens
        return out

    def chart_png(self, bucket_s: float | None = None) -> bytes:
        """Clips/s over time, one line per node."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        span = max(self.elapsed, 1.0)
        bucket = bucket_s or max(1.0, span / 30)
        n = int(span // bucket) + 1
        fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
        for node in sorted({e[1] for e in self.events}) or ["(none)"]:
            counts = [0.0] * n
            for t, nd, clips, _ in self.events:
                if nd == node:
                    counts[min(int(t // bucket), n - 1)] += clips / bucket
            ax.plot([i * bucket for i in range(n)], counts, label=node, drawstyle="steps-post")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("clips / s")
        ax.set_title("flashcap throughput per node")
        ax.legend(loc="upper right", fontsize="small")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()
