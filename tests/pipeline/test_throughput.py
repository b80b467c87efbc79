"""The driver's throughput tracker on synthetic runs: actors finish batches at known times, and the
driver receives their rows in Ray Data blocks, late and in bursts."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import numpy as np

from pipeline.throughput import HISTORY_BUCKETS, RSS_POINTS, Throughput

T0 = 1_700_000_000.0  # the driver's start, epoch seconds
PNG = b"\x89PNG\r\n\x1a\n"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def row(node: str, actor: str, t: float, *, tokens: int = 100, accept: float = 3.0, error: str = "") -> dict:
    """One clip's row as the driver sees it; t: seconds after the driver started."""
    return {
        "worker_node": node,
        "actor": actor,
        "finished_at": datetime.fromtimestamp(T0 + t, UTC),
        "num_tokens": 0 if error else tokens,
        "acceptance_length": 0.0 if error else accept,
        "error": error,
        "busy_s": 0.5,
    }


def batches(nodes: int, actors: int, batch: int, period_s: float, clips: int, startup_s: float, seed: int = 0):
    """(finished seconds, rows) per actor batch in time order: each actor finishes `batch` clips every
    `period_s` (jittered), all starting after `startup_s` of model loading."""
    rng = random.Random(seed)
    pending = []
    for n in range(nodes):
        for a in range(actors):
            pending.append([startup_s + rng.uniform(0.5, 1.5) * period_s, f"node{n}", f"node{n}:{a}"])
    out, done = [], 0
    while done < clips:
        pending.sort()
        slot = pending[0]
        t, node, actor = slot
        size = min(batch, clips - done)
        out.append((t, node, actor, size))
        done += size
        slot[0] = t + period_s * rng.uniform(0.9, 1.1)
    return out


def deliver(tracker: Throughput, clock: Clock, rows: list[tuple[float, dict]], every_s: float) -> None:
    """Hand rows (finished seconds, row) to the tracker in blocks: every `every_s`, all rows finished
    since the last block, as one block."""
    rows = sorted(rows, key=lambda x: x[0])
    i = 0
    while i < len(rows):
        arrival = (rows[i][0] // every_s + 1) * every_s
        j = i
        while j < len(rows) and rows[j][0] < arrival:
            j += 1
        clock.now = T0 + arrival
        tracker.add([r for _, r in rows[i:j]])
        i = j


def short_run() -> tuple[Throughput, list[float]]:
    """12 clips on one node: batches of 4 finish at 13, 16 and 19 s; one block reaches the driver at 20 s."""
    clock = Clock()
    tracker = Throughput(12, clock=clock)
    times = [13.0, 16.0, 19.0]
    rows = [(t, row("node0", "node0:0", t, tokens=40 + i, accept=3.0 + 0.1 * i)) for i, t in enumerate(times)]
    rows = [(t, dict(r)) for t, r in rows for _ in range(4)]
    deliver(tracker, clock, rows, every_s=20.0)
    clock.now = T0 + 21.0
    return tracker, times


def long_run(clips: int = 50_000) -> tuple[Throughput, list[tuple[float, dict]]]:
    """2 nodes x 4 actors, 8 clips per batch every 4 s (16 clips/s in all), 100 tokens per clip,
    acceptance 3.2 then 2.6 after 1500 s; node1's rows are errors between 1000 and 1100 s."""
    clock = Clock()
    tracker = Throughput(clips, clock=clock)
    rows = []
    for t, node, actor, size in batches(nodes=2, actors=4, batch=8, period_s=4.0, clips=clips, startup_s=60.0):
        error = "decode failed: corrupt" if node == "node1" and 1000 <= t < 1100 else ""
        r = row(node, actor, t, accept=3.2 if t < 1500 else 2.6, error=error)
        rows += [(t, r)] * size
    deliver(tracker, clock, rows, every_s=20.0)
    clock.now = T0 + rows[-1][0] + 5.0
    return tracker, rows


def test_short_run_counts_each_clip_when_its_batch_finished():
    tracker, times = short_run()
    c = tracker.curves()
    total = c.total(c.clips)
    for t in times:  # 4 clips more after each batch, although all 12 arrived together
        before, after = np.searchsorted(c.t, t, side="right") - 1, np.searchsorted(c.t, t + 1.0)
        assert total[after] - total[before] == 4
    assert total[-1] == 12 and c.clips.keys() == {"node0"}
    assert c.total(c.tokens)[-1] == 4 * (40 + 41 + 42)
    assert c.total(c.errors)[-1] == 0
    assert abs(np.nanmean(c.acceptance) - 3.1) < 1e-9
    # a 30 s window is longer than the run: the rate is the average since start, never a spike
    assert c.window_s == 30.0
    rate = c.total(c.clips_per_s)
    assert rate.max() <= 12 / 19 + 1e-9 and abs(rate[-1] - 12 / 21) < 1e-9
    report = tracker.report()
    assert report["clips"] == 12 and report["tokens"] == 4 * (40 + 41 + 42)
    assert report["per_node"] == {"node0": {"clips": 12, "tokens": 4 * (40 + 41 + 42), "errors": 0}}
    assert tracker.chart_png().startswith(PNG)


def test_long_run_curves_match_the_rows():
    tracker, rows = long_run()
    c = tracker.curves()
    finished = np.array([r["finished_at"].timestamp() - T0 for _, r in rows])
    is_error = np.array([bool(r["error"]) for _, r in rows])
    on_node1 = np.array([r["worker_node"] == "node1" for _, r in rows])
    for edge in range(len(c.t) - 1):  # at every bucket edge, the rows finished before it
        assert c.total(c.clips)[edge] == (finished < c.t[edge]).sum()
        assert c.errors["node1"][edge] == (is_error & (finished < c.t[edge])).sum()
    assert c.clips["node0"][-1] + c.clips["node1"][-1] == len(rows) == tracker.clips
    assert c.errors["node0"][-1] == 0 and c.errors["node1"][-1] == is_error.sum() == tracker.errors > 0
    assert c.total(c.tokens)[-1] == tracker.tokens == 100 * (~is_error).sum()
    assert tracker.per_node["node1"]["errors"] == is_error.sum()
    assert tracker.per_node["node1"]["clips"] == (on_node1 & ~is_error).sum()

    centers = c.t[:-1] + c.width_s / 2
    early = (centers > 100) & (centers < 1500 - c.width_s)
    late = centers > 1500 + c.width_s
    assert np.allclose(c.acceptance[early & ~np.isnan(c.acceptance)], 3.2)
    assert np.allclose(c.acceptance[late & ~np.isnan(c.acceptance)], 2.6)


def test_rolling_rate_has_no_block_spikes():
    """Actors finish 8 clips at a time and blocks reach the driver every 20 s; the rolling rate
    stays near the true 16 clips/s (8 per node) once a window has passed."""
    tracker, rows = long_run()
    c = tracker.curves()
    assert c.window_s >= 0.05 * c.t[-1] - c.width_s
    end = rows[-1][0]
    steady = (c.t > 60 + c.window_s) & (c.t < end - c.width_s) & ((c.t < 1000) | (c.t > 1100 + c.window_s))
    assert steady.sum() > 100
    rate = c.total(c.clips_per_s)[steady]
    assert rate.min() > 16 * 0.9 and rate.max() < 16 * 1.1, (rate.min(), rate.max())
    tokens = c.total(c.tokens_per_s)[steady]
    assert tokens.min() > 1600 * 0.9 and tokens.max() < 1600 * 1.1
    for node in ("node0", "node1"):
        assert 8 * 0.85 < c.clips_per_s[node][steady].min() <= c.clips_per_s[node][steady].max() < 8 * 1.15
    assert tracker.chart_png().startswith(PNG)


def test_history_stays_bounded_over_a_million_rows():
    clock = Clock()
    tracker = Throughput(1_000_000, clock=clock)
    started = time.perf_counter()
    for block in range(100):  # 10k rows per block, two actors per node, 2 h apart
        t = 7200.0 * (block + 1)
        clock.now = T0 + t + 1.0
        rows = []
        for node in ("node0", "node1"):
            for actor in (f"{node}:0", f"{node}:1"):
                r = row(node, actor, t)
                r["rss_mb"] = 500.0 + block
                rows += [r] * 2500
        tracker.add(rows)
    assert time.perf_counter() - started < 5.0
    assert tracker.clips == 1_000_000 and tracker.tokens == 100_000_000
    assert all(len(v) == HISTORY_BUCKETS for v in tracker.history.series.values())
    assert len(tracker.history.series) == 2 * 3 + 2  # clips, tokens, errors per node; acceptance
    c = tracker.curves()
    assert len(c.t) <= HISTORY_BUCKETS + 1 and c.total(c.clips)[-1] == 1_000_000
    assert c.total(c.clips_per_s)[-1] > 0


def test_actor_memory_history_is_bounded_and_keeps_its_quarters():
    clock = Clock()
    tracker = Throughput(0, clock=clock)
    for batch in range(20_000):  # memory grows 100 -> 300 MB over the batches
        clock.now = T0 + batch
        r = row("node0", "node0:0", batch)
        r["rss_mb"] = 100.0 + 200.0 * batch / 19_999
        tracker.add([r])
    assert len(tracker.rss_mb["node0:0"].values) <= RSS_POINTS
    memory = tracker.memory()
    assert memory["actor_rss_mb_end"] == 300.0
    assert abs(memory["actor_rss_mb_start"] - 150.0) < 1.0  # the peak of the first quarter
    assert abs(memory["actor_rss_growth_mb"] - 150.0) < 1.0


def test_report_and_live_line_keep_their_fields():
    clock = Clock()
    tracker = Throughput(24, clock=clock)
    for t in (10.0, 20.0, 30.0):  # first captions arrive at 10 s: start-up, not steady
        clock.now = T0 + t
        tracker.add([row("node0", "node0:0", t - 1)] * 8)
    clock.now = T0 + 40.0
    report = tracker.report(run_id="x")
    assert report["steady_clips_per_s"] == 16 / 20 and report["steady_tokens_per_s"] == 1600 / 20
    assert report["clips_per_s"] == 24 / 40 and report["tokens_per_s"] == 2400 / 40
    assert report["mean_acceptance_length"] == 3.0 and report["run_id"] == "x"
    assert report["memory"] == {"actor_rss_mb_start": 0.0, "actor_rss_mb_end": 0.0, "actor_rss_growth_mb": 0.0}
    assert report["nodes"] == ["node0"] and report["actors"] == 1 and report["actor_busy_s"] == 24 * 0.5
    assert tracker.line() == (
        "[flashcap] 24 clips (0 errors) from 24 objects | 0.60 clips/s | 60.0 tokens/s | acceptance 3.00 | "
        "actors 1 | nodes 1"
    )
    assert report["compile"] == {"active": False, "fallback": None}  # eager, as configured


def test_report_says_whether_every_actor_decoded_compiled():
    tracker = Throughput(4, clock=Clock())
    tracker.add([{**row("node0", "a", 1.0), "compile": "active"}, {**row("node1", "b", 1.0), "compile": "active"}])
    assert tracker.report()["compile"] == {"active": True, "fallback": None}
    tracker.add([{**row("node1", "b", 2.0), "compile": "fallback: BackendCompilerFailed: no capture"}])
    assert tracker.report()["compile"] == {"active": False, "fallback": "BackendCompilerFailed: no capture"}


def test_rows_finishing_outside_the_run_are_clamped():
    """Node clocks may be off: a row is never placed before the start or after it arrived."""
    clock = Clock()
    tracker = Throughput(2, clock=clock)
    clock.now = T0 + 10.0
    tracker.add([row("node0", "a", -5.0), row("node0", "a", 50.0)])
    clock.now = T0 + 12.0
    c = tracker.curves()
    assert c.total(c.clips)[1] == 1 and c.total(c.clips)[10] == 1 and c.total(c.clips)[11] == 2


def test_chart_renders_an_empty_run_and_many_nodes():
    """No rows yet, and 12 nodes: the nodes worth a look (errors, fewest clips) are drawn one by one."""
    clock = Clock()
    tracker = Throughput(0, clock=clock)
    clock.now = T0 + 5.0
    assert tracker.chart_png().startswith(PNG)
    tracker = Throughput(1000, clock=clock)
    rows = []
    for n in range(12):
        clips = 10 if n == 4 else 100
        rows += [row(f"node{n}", f"node{n}:0", 60.0, error="bad" if n == 9 else "")] * clips
    clock.now = T0 + 70.0
    tracker.add(rows)
    shown, others = tracker._chart_nodes()
    assert [n for n, _ in shown][:2] == ["node9", "node4"] and len(shown) == 7 and len(others) == 5
    assert tracker.chart_png().startswith(PNG)


def test_report_says_which_stage_bounded_the_run():
    """An actor that finishes a batch every time its model is free was bound by the model; one that
    waits between batches was fed too slowly (decode)."""

    def run(finishes: list[float]) -> dict:
        clock = Clock()
        tracker = Throughput(24, clock=clock)
        for t in finishes:  # 8 rows of 0.5 model seconds and 0.25 decode seconds a batch
            clock.now = T0 + t + 1
            tracker.add([{**row("node0", "a", t), "decode_s": 0.25}] * 8)
        return tracker.report()["bound"]

    assert run([4.0, 8.0, 12.0]) == {"stage": "model", "actor_busy_fraction": 1.0, "decode_core_s": 6.0}
    waited = run([9.0, 19.0, 29.0])  # busy 12 s of the 24 s from its first batch's start
    assert waited["stage"] == "decode" and waited["actor_busy_fraction"] == 0.5
    assert Throughput(1, clock=Clock()).report()["bound"]["stage"] is None
