"""Cluster-wide throughput, aggregated on the driver from the rows actors return:
a live line while the job runs, and a report (JSON + PNG chart) at the end.

Rows reach the driver in Ray Data blocks, so arrival times come in bursts. The chart
places each row at its `finished_at` (when its actor finished the batch, clamped to
[start, arrival]) and draws rates as differences of the cumulative curve over a
rolling window, so block arrival makes no spikes.

Memory stays bounded on runs of any length: the history is `HISTORY_BUCKETS` time
buckets per series; when a time falls past the last one, neighbouring buckets merge
pairwise and the bucket width doubles.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

HISTORY_BUCKETS = 240  # per series; a 24 h run ends with 512 s buckets
FIRST_BUCKET_S = 1.0
MIN_WINDOW_S = 30.0  # rolling rate window: the larger of this and WINDOW_FRACTION of the run
WINDOW_FRACTION = 0.05
RSS_POINTS = 1024  # per actor; beyond this, neighbouring batches' memory merges (max)
BUSY_BOUND = 0.8  # an actor busy this share of its time or more: the model bounded the run
CHART_NODES = 7  # with more nodes than this (+1), the rest are drawn alike in grey
NODE_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
FOOTNOTE = (
    "rows are placed when their actor finished the batch; rates are differences of the cumulative counts "
    "over the rolling window (the time since start, early on)"
)


class History:
    """Sums per fixed-width time bucket, at most `size` buckets per series, all series sharing one width."""

    def __init__(self, size: int = HISTORY_BUCKETS, width_s: float = FIRST_BUCKET_S) -> None:
        assert size % 2 == 0 and width_s > 0
        self.size, self.width = size, width_s
        self.series: dict[tuple[str, str], np.ndarray] = {}  # (metric, node) -> [size]

    def fit(self, t: float) -> None:
        """Coarsen until time t (seconds since start) falls inside the buckets."""
        while t >= self.size * self.width:
            half = self.size // 2
            for values in self.series.values():
                values[:half] = values.reshape(half, 2).sum(axis=1)
                values[half:] = 0.0
            self.width *= 2

    def add(self, t: float, metric: str, node: str, value: float) -> None:
        self.fit(t)
        values = self.series.get((metric, node))
        if values is None:
            values = self.series[(metric, node)] = np.zeros(self.size)
        values[min(int(t // self.width), self.size - 1)] += value

    def get(self, metric: str, node: str) -> np.ndarray:
        return self.series.get((metric, node), np.zeros(self.size))


class PeakSeries:
    """An actor's memory after each batch, in order, as the peak over groups of consecutive batches:
    one batch per group up to `cap` points, then neighbouring groups merge and groups double."""

    def __init__(self, cap: int = RSS_POINTS) -> None:
        assert cap % 2 == 0
        self.cap, self.group, self.filled = cap, 1, 0
        self.values: list[float] = []

    def add(self, value: float) -> None:
        if self.values and self.filled < self.group:
            self.values[-1] = max(self.values[-1], value)
            self.filled += 1
            return
        if len(self.values) == self.cap:
            self.values = [max(a, b) for a, b in zip(self.values[::2], self.values[1::2])]
            self.group *= 2
        self.values.append(value)
        self.filled = 1


@dataclass(slots=True)
class Batch:
    """Sums over the rows of one actor batch (they share node, actor and finished_at)."""

    clips: int = 0  # rows: captions and errors
    errors: int = 0
    tokens: int = 0
    accept_sum: float = 0.0  # over captions with an acceptance length
    accept_n: int = 0
    accepted: float = 0.0  # drafted tokens the target accepted (tokens less cycles)
    suffix_tokens: int = 0  # of them, drafted by suffix decoding
    busy_s: float = 0.0
    decode_s: float = 0.0
    rss_mb: float | None = None
    compile: str = ""  # "" (eager, as configured), "active" or "fallback: why"


def _by_batch(rows: list[dict]) -> dict[tuple, Batch]:
    """(worker_node, actor, finished_at) -> Batch: one pass in Python per row, the rest per batch."""
    batches: dict[tuple, Batch] = {}
    for r in rows:
        key = (r.get("worker_node", ""), r.get("actor", ""), r.get("finished_at"))
        b = batches.get(key)
        if b is None:
            b = batches[key] = Batch(rss_mb=r.get("rss_mb"), compile=r.get("compile") or "")
        b.clips += 1
        b.busy_s += r.get("busy_s", 0.0)
        b.decode_s += r.get("decode_s", 0.0)
        if r["error"]:
            b.errors += 1
            continue
        b.tokens += r["num_tokens"]
        if r["acceptance_length"] > 0:
            b.accept_sum += r["acceptance_length"]
            b.accept_n += 1
            # num_tokens = the prefill's token + (accepted + 1) a cycle; acceptance = tokens a cycle
            cycle_tokens = max(0, r["num_tokens"] - 1)
            b.accepted += cycle_tokens - cycle_tokens / r["acceptance_length"]
        b.suffix_tokens += r.get("suffix_tokens") or 0
    return batches


@dataclass
class Curves:
    """What the chart draws. Series are per node, sampled at the bucket edges `t` unless noted."""

    t: np.ndarray  # [n+1] seconds since start; the last edge is the end of the run so far
    width_s: float  # bucket width
    window_s: float  # rolling rate window
    clips: dict[str, np.ndarray]  # cumulative rows (captions and errors)
    tokens: dict[str, np.ndarray]  # cumulative tokens generated
    errors: dict[str, np.ndarray]  # cumulative error rows
    clips_per_s: dict[str, np.ndarray]  # rolling rate over the last window_s (less near the start)
    tokens_per_s: dict[str, np.ndarray]
    acceptance: np.ndarray  # [n] mean acceptance length of the rows that finished in each bucket; NaN if none

    def total(self, series: dict[str, np.ndarray]) -> np.ndarray:
        return sum(series.values(), np.zeros(len(self.t)))


class Throughput:
    def __init__(self, total: int, clock: Callable[[], float] = time.time) -> None:
        self.total = total
        self.clock = clock
        self.started = clock()
        self.clips = 0
        self.errors = 0
        self.tokens = 0
        self.accept_sum = 0.0
        self.accept_n = 0
        self.accepted = 0.0  # drafted tokens accepted, by any proposer
        self.suffix_tokens = 0  # ... drafted by suffix decoding
        self.busy_s = 0.0
        self.actors: set[str] = set()
        self.nodes: set[str] = set()
        self.per_node: dict[str, dict[str, int]] = {}  # node -> clips and tokens captioned, error rows
        self.history = History()
        self.rss_mb: dict[str, PeakSeries] = {}  # actor -> private resident memory after each batch
        self._rss_last: dict[str, float] = {}
        self.compile: dict[str, str] = {}  # actor -> how its last batch's passes ran
        self._first_add: list[float] | None = None  # [arrival, clips, tokens] of the first captions
        # actor -> [first batch finished (s), that batch's model seconds, last batch finished, model seconds]
        self._actor_time: dict[str, list[float]] = {}
        self.decode_s = 0.0  # decode seconds of every row (one core each)
        self._last_add = 0.0
        self._last_line = 0.0

    def add(self, rows: list[dict]) -> None:
        """Rows of one block, as it reaches the driver."""
        now = self.clock() - self.started
        self.history.fit(now)
        ok_clips = ok_tokens = 0
        for (node, actor, finished_at), b in _by_batch(rows).items():
            self.nodes.add(node)
            self.actors.add(actor)
            self.clips += b.clips
            self.errors += b.errors
            self.tokens += b.tokens
            self.accept_sum += b.accept_sum
            self.accept_n += b.accept_n
            self.accepted += b.accepted
            self.suffix_tokens += b.suffix_tokens
            self.busy_s += b.busy_s
            ok_clips += b.clips - b.errors
            ok_tokens += b.tokens
            entry = self.per_node.setdefault(node, {"clips": 0, "tokens": 0, "errors": 0})
            entry["clips"] += b.clips - b.errors
            entry["tokens"] += b.tokens
            entry["errors"] += b.errors
            self.compile[actor] = b.compile
            if b.rss_mb and self._rss_last.get(actor) != b.rss_mb:
                self._rss_last[actor] = b.rss_mb
                self.rss_mb.setdefault(actor, PeakSeries()).add(b.rss_mb)
            # node clocks may be off: never before the start, nor after the block arrived
            t = min(max(_epoch_s(finished_at, self.started + now) - self.started, 0.0), now)
            self.decode_s += b.decode_s
            times = self._actor_time.setdefault(actor, [t, b.busy_s, t, 0.0])
            if t < times[0]:
                times[0], times[1] = t, b.busy_s
            times[2], times[3] = max(times[2], t), times[3] + b.busy_s
            for metric, value in (("clips", b.clips), ("tokens", b.tokens), ("errors", b.errors)):
                self.history.add(t, metric, node, value)
            if b.accept_n:
                self.history.add(t, "accept_sum", "", b.accept_sum)
                self.history.add(t, "accept_n", "", b.accept_n)
        if ok_clips:
            if self._first_add is None:
                self._first_add = [now, 0, 0]
            if now == self._first_add[0]:
                self._first_add[1] += ok_clips
                self._first_add[2] += ok_tokens
            self._last_add = now

    @property
    def elapsed(self) -> float:
        return max(self.clock() - self.started, 1e-9)

    @property
    def acceptance_length(self) -> float:
        return self.accept_sum / self.accept_n if self.accept_n else 0.0

    def line(self) -> str:
        return (
            f"[flashcap] {self.clips} clips ({self.errors} errors) from {self.total} objects | "
            f"{self.clips / self.elapsed:.2f} clips/s | {self.tokens / self.elapsed:.1f} tokens/s | "
            f"acceptance {self.acceptance_length:.2f} | actors {len(self.actors)} | nodes {len(self.nodes)}"
        )

    def maybe_line(self, every_s: float = 5.0) -> str | None:
        if self.clock() - self._last_line >= every_s:
            self._last_line = self.clock()
            return self.line()
        return None

    def steady(self) -> tuple[float, float]:
        """(clips/s, tokens/s) by arrival on the driver after the first captions arrived: start-up
        (Ray, model loads) excluded."""
        if self._first_add is None:
            return 0.0, 0.0
        first, first_clips, first_tokens = self._first_add
        span = self._last_add - first
        if span <= 0:
            return 0.0, 0.0
        return (self.clips - self.errors - first_clips) / span, (self.tokens - first_tokens) / span

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
            # which proposer drafted the accepted tokens: suffix decoding, or the drafter model
            "accepted_tokens": {
                "total": round(self.accepted),
                "suffix": self.suffix_tokens,
                "drafter": max(0, round(self.accepted) - self.suffix_tokens),
            },
            "actor_busy_s": self.busy_s,
            "actors": len(self.actors),
            "nodes": sorted(self.nodes),
            "per_node": {node: dict(entry) for node, entry in sorted(self.per_node.items())},
            "memory": self.memory(),
            "compile": self.compile_report(),
            "bound": self.bound(),
            **extra,
        }

    def bound(self) -> dict:
        """Which stage held the run back. Each caption actor's share of its time busy on the model,
        from the start of its first batch (that batch's finish less its model seconds) to its last
        finish: at BUSY_BOUND or more the model bounded the run (more GPUs go faster); below it the
        actors waited for decoded frames (more decode CPUs go faster). `decode_core_s`: the rows'
        decode seconds, one core each."""
        span = busy = 0.0
        for first, first_busy, last, total in self._actor_time.values():
            span += max(last - (first - first_busy), 1e-9)
            busy += total
        fraction = min(1.0, busy / span) if span else None
        stage = None if fraction is None else "model" if fraction >= BUSY_BOUND else "decode"
        return {"stage": stage, "actor_busy_fraction": fraction, "decode_core_s": self.decode_s}

    def compile_report(self) -> dict:
        """{"active": every actor's passes ran compiled, "fallback": why one ran eager, or None}."""
        statuses = list(self.compile.values())
        fallbacks = [s.removeprefix("fallback: ") for s in statuses if s.startswith("fallback")]
        active = bool(statuses) and all(s == "active" for s in statuses)
        return {"active": active, "fallback": next(iter(fallbacks), None)}

    def memory(self) -> dict:
        """Caption actors' private resident memory (MB, Linux RssAnon): the peak over each actor's first
        and last quarter of batches, and the largest growth between them (a leak shows here on long runs)."""
        first = last = growth = 0.0
        for peaks in self.rss_mb.values():
            series = peaks.values
            q = max(1, len(series) // 4)
            head, tail = max(series[:q]), max(series[-q:])
            first, last, growth = max(first, head), max(last, tail), max(growth, tail - head)
        return {"actor_rss_mb_start": first, "actor_rss_mb_end": last, "actor_rss_growth_mb": growth}

    def curves(self) -> Curves:
        """Cumulative counts, rolling rates and acceptance over time, from the bounded history."""
        end = self.elapsed
        h = self.history
        h.fit(end)
        n = min(max(1, math.ceil(end / h.width)), h.size)
        t = np.arange(n + 1) * h.width
        t[-1] = max(end, t[-2] + 1e-9)
        k = max(1, round(max(MIN_WINDOW_S, WINDOW_FRACTION * end) / h.width))  # window in buckets
        back = np.maximum(np.arange(n + 1) - k, 0)
        dt = np.maximum(t - t[back], 1e-9)

        def cumulative(metric: str) -> dict[str, np.ndarray]:
            return {node: np.concatenate([[0.0], np.cumsum(h.get(metric, node)[:n])]) for node in self.nodes}

        def rate(cum: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {node: (c - c[back]) / dt for node, c in cum.items()}

        clips, tokens = cumulative("clips"), cumulative("tokens")
        accept_n = h.get("accept_n", "")[:n]
        with np.errstate(invalid="ignore", divide="ignore"):
            acceptance = np.where(accept_n > 0, h.get("accept_sum", "")[:n] / accept_n, np.nan)
        return Curves(
            t=t,
            width_s=h.width,
            window_s=k * h.width,
            clips=clips,
            tokens=tokens,
            errors=cumulative("errors"),
            clips_per_s=rate(clips),
            tokens_per_s=rate(tokens),
            acceptance=acceptance,
        )

    def chart_png(self) -> bytes:
        """Clips and tokens done, rolling rates, acceptance length and errors over time; per node and total."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        c = self.curves()
        unit, scale = _time_unit(float(c.t[-1]))
        x = c.t / scale
        shown, others = self._chart_nodes()
        twin = bool(others)  # many nodes: each is a small part of the total, so nodes get their own scale
        window = f"rolling {_duration(c.window_s)} window"
        fig, axes = plt.subplots(3, 2, figsize=(13, 9.5), dpi=100, sharex=True)
        panels = [
            (axes[0, 0], c.clips, "clips done (captions and errors)", "clips (cumulative)", True),
            (axes[0, 1], c.tokens, "tokens generated", "tokens (cumulative)", True),
            (axes[1, 0], c.clips_per_s, f"clips/s, {window}", "clips / s", False),
            (axes[1, 1], c.tokens_per_s, f"tokens/s, {window}", "tokens / s", False),
        ]
        for ax, series, title, ylabel, counts in panels:
            node_ax = _plot_nodes(ax, x, series, c.total(series), shown, others, twin, counts)
            if ax is axes[0, 0]:  # its entries are every panel's
                legend = [ax] if node_ax is ax else [ax, node_ax]
            ax.set_title(title, fontsize=11, loc="left")
            ax.set_ylabel(ylabel + (", all nodes" if twin else ""))
        _plot_nodes(axes[2, 1], x, c.errors, c.total(c.errors), shown, others, False, True)
        if self.errors:
            share = f"{self.errors:,} ({self.errors / max(self.clips, 1):.1%})"
            axes[2, 1].set_title(f"error rows (cumulative): {share}", fontsize=11, loc="left")
        else:
            axes[2, 1].set_title("error rows (cumulative)", fontsize=11, loc="left")
            axes[2, 1].text(0.5, 0.5, "no errors", transform=axes[2, 1].transAxes, ha="center", color="gray")
            axes[2, 1].set_ylim(0, 1)
        axes[2, 1].set_ylabel("error rows")
        centers = (c.t[:-1] + np.diff(c.t) / 2) / scale
        _plot_acceptance(axes[2, 0], centers, c.acceptance, self.acceptance_length, c.width_s)
        for ax in axes[-1]:
            ax.set_xlabel(f"time since start ({unit})")
        axes[-1, 0].set_xlim(0, x[-1])

        entries = [a.get_legend_handles_labels() for a in legend]
        handles, labels = [h for e in entries for h in e[0]], [label for e in entries for label in e[1]]
        if len(self.nodes) == 1:
            labels = [f"all nodes: {shown[0][1]}"]
        ncol = min(len(labels), 4)
        fig.legend(
            handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.935), ncol=ncol, fontsize=8, frameon=False
        )
        fig.suptitle(self._chart_title(), fontsize=12, y=0.99, va="top")
        fig.text(0.5, 0.005, FOOTNOTE, ha="center", fontsize=8, color="gray")
        top = 0.89 - 0.02 * math.ceil(len(labels) / ncol)
        fig.subplots_adjust(
            left=0.06, right=0.94 if twin else 0.985, bottom=0.08, top=top, hspace=0.3, wspace=0.36 if twin else 0.15
        )
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return buf.getvalue()

    def _chart_nodes(self) -> tuple[list[tuple[str, str]], list[str]]:
        """([(node, legend label)], other nodes): every node when few; else those most worth a look,
        most errors first, then fewest clips (slow, lost or late), and the rest drawn alike in grey."""
        rows = {n: self.per_node[n]["clips"] + self.per_node[n]["errors"] for n in self.nodes}
        if len(self.nodes) <= CHART_NODES + 1:
            picked = sorted(self.nodes)
        else:
            by_errors = sorted(
                (n for n in self.nodes if self.per_node[n]["errors"]), key=lambda n: -self.per_node[n]["errors"]
            )
            picked = by_errors[: CHART_NODES // 2]
            picked += sorted((n for n in self.nodes if n not in picked), key=lambda n: rows[n])[
                : CHART_NODES - len(picked)
            ]
        shown = []
        for n in picked:
            errors = self.per_node[n]["errors"]
            label = f"{n or '(unknown node)'}: {_count(rows[n])} clips" + (
                f", {_count(errors)} errors" if errors else ""
            )
            shown.append((n, label))
        return shown, sorted(self.nodes - set(picked))

    def _chart_title(self) -> str:
        s = self.elapsed
        return (
            f"flashcap: {self.clips:,} clips ({self.errors:,} errors) from {self.total:,} objects, "
            f"{_count(self.tokens)} tokens "
            f"in {_duration(s)}\n{self.clips / s:.2f} clips/s, {self.tokens / s:,.1f} tokens/s overall | "
            f"acceptance length {self.acceptance_length:.2f} | {_plural(len(self.nodes), 'node')}, "
            f"{_plural(len(self.actors), 'actor')}"
        )


def _plot_nodes(
    ax: Axes,
    x: np.ndarray,
    series: dict[str, np.ndarray],
    total: np.ndarray,
    shown: list[tuple[str, str]],
    others: list[str],
    twin: bool,
    counts: bool,
) -> Axes:
    """The total in black, then each node over it (so a node that is the whole total still shows):
    the shown nodes in colour, the others in grey; on a right-hand scale of their own when `twin`."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    node_ax = ax.twinx() if twin else ax
    style = {"alpha": 0.35, "linewidth": 5} if twin else {"linewidth": 2.4}
    ax.plot(x, total, color="black", label="all nodes", zorder=3, **style)
    if len(shown) + len(others) > 1:
        for n in others:
            label = f"{len(others)} other nodes" if n == others[0] else None
            node_ax.plot(x, series[n], color="0.65", linewidth=0.7, zorder=4, label=label)
        for i, (n, label) in enumerate(shown):
            node_ax.plot(x, series[n], color=NODE_COLORS[i % len(NODE_COLORS)], linewidth=1.3, label=label, zorder=5)
    if twin:
        node_ax.set_ylabel("per node", color="0.3")
    for a in {ax, node_ax}:
        a.set_ylim(bottom=0)
        a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick(v)))
        a.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=counts, min_n_ticks=2))
    ax.grid(alpha=0.3)
    return node_ax


def _plot_acceptance(ax: Axes, centers: np.ndarray, acceptance: np.ndarray, mean: float, width_s: float) -> None:
    has = ~np.isnan(acceptance)
    if has.any():
        marker = "o" if has.sum() <= 60 else None  # few buckets: show each one
        label = f"per {_duration(width_s)}"
        ax.plot(
            centers[has], acceptance[has], color="tab:purple", linewidth=1.2, marker=marker, markersize=4, label=label
        )
        ax.axhline(mean, color="gray", linestyle="--", linewidth=1, label=f"run mean {mean:.2f}")
        ax.set_ylim(0, max(1.0, float(np.nanmax(acceptance))) * 1.15)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no acceptance data (no drafter?)", transform=ax.transAxes, ha="center", color="gray")
    ax.set_title("acceptance length (tokens per cycle)", fontsize=11, loc="left")
    ax.set_ylabel("tokens / cycle")
    ax.grid(alpha=0.3)


def _epoch_s(finished_at: object, default: float) -> float:
    """A row's finished_at (aware or UTC-naive datetime, or epoch seconds) as epoch seconds."""
    if isinstance(finished_at, datetime):
        if finished_at.tzinfo is None:
            finished_at = finished_at.replace(tzinfo=UTC)
        return finished_at.timestamp()
    if isinstance(finished_at, int | float):
        return float(finished_at)
    return default


def _time_unit(span_s: float) -> tuple[str, float]:
    if span_s < 600:
        return "s", 1.0
    if span_s < 36_000:
        return "min", 60.0
    return "h", 3600.0


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _tick(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _count(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"
