"""The attempt ledger: how a video that kills its worker ends as an error row
instead of stalling the job.

Ray Data restarts dead actors and retries failed tasks without limit, which is
right for a node that vanished and wrong for an input that crashes its worker
every time (a decoder segfault, an out-of-memory kill): the job would loop on
it forever. So every worker brackets each block of rows with one `begin` and
one `done` call to one small actor that lives beside the driver. A `begin` for
a key that is still in flight means the previous attempt's process died with
it: that key's crash count goes up, unless the previous attempt's node is gone
(a lost spot node is not the video's fault). Workers isolate keys with a crash
on record (one at a time, so only the culprit is charged again), and a key
charged `max_crashes` times gets an error row without being touched again.

The ledger only counts; it never decides what is written. The driver still
writes each (uri, etag) once.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

Key = tuple[str, str, str]  # (stage, clip_name, etag)
T = TypeVar("T")


def clip_name(row: dict) -> str:
    """A row's video, and the clip of it when it is a window (as a media fragment, "#t=<start>")."""
    start = float(row.get("clip_start_s") or 0.0)
    return str(row["video_uri"]) + (f"#t={start:g}" if start else "")


def _live_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class AttemptLedger:
    """Plain class (unit-testable); `start_ledger` runs it as a Ray actor. Workers are named
    "<ray node id>/<process>" (no node id: always charged); `live_nodes` gives the node ids still in
    the cluster, asked only when a key is found still in flight."""

    def __init__(self, live_nodes: Callable[[], set[str]] | None = None) -> None:
        self.in_flight: dict[Key, str] = {}
        self.crashes: Counter[Key] = Counter()
        self.lost_with_node = 0
        self.live_nodes = live_nodes or _live_nodes

    def begin(self, keys: Sequence[Key], worker: str) -> list[int]:
        """Mark keys in flight on `worker`; return each key's crash count (this attempt's evidence included)."""
        out, live = [], None
        for key in keys:
            key = tuple(key)
            previous = self.in_flight.get(key)
            if previous is not None:  # the attempt that marked it never finished: its process died
                node = previous.split("/", 1)[0] if "/" in previous else ""
                live = self.live_nodes() if live is None and node else live
                if node and node not in live:  # ... with its node: not the video's doing
                    self.lost_with_node += 1
                else:
                    self.crashes[key] += 1
            self.in_flight[key] = worker
            out.append(self.crashes[key])
        return out

    def done(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.in_flight.pop(tuple(key), None)

    def summary(self) -> dict:
        """Crashes seen, per stage, and the keys charged (uri strings) for the report."""
        by_stage: Counter[str] = Counter()
        for (stage, _, _), n in self.crashes.items():
            by_stage[stage] += n
        return {
            "worker_crashes": dict(by_stage),
            "crashed_videos": sorted({uri for (_, uri, _), n in self.crashes.items() if n}),
            "lost_with_node": self.lost_with_node,
        }


def start_ledger():
    """The ledger as a Ray actor pinned to the driver's node (it dies with the driver, never before it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(AttemptLedger)
        .options(
            num_cpus=0,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote()
    )


def worker_name() -> str:
    """This process as the ledger knows it: "<ray node id>/<host>:<pid>"."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside Ray the node is unknown: deaths are charged as before
        node = ""
    return f"{node}/{socket.gethostname()}:{os.getpid()}"


class Guard:
    """A worker's view of the ledger. Without a ledger (benchmarks, notebooks) it counts nothing."""

    def __init__(self, ledger, stage: str, max_crashes: int, worker: str | None = None) -> None:
        self.ledger, self.stage, self.max_crashes = ledger, stage, max_crashes
        self.worker = worker or worker_name()

    def run(self, rows: list[dict], work: Callable[[list[dict]], None], give_up: Callable[[dict, int], None]) -> None:
        """`work(rows)` with one `begin` and one `done` call for the whole block. If an earlier attempt
        at any of them died with its process, the rows go one at a time instead, so that only the one
        that kills the process is charged again; a row charged `max_crashes` times gets
        `give_up(row, crashes)` and no work."""
        crashes = self.begin(rows)
        if not any(crashes):
            try:
                work(rows)
            finally:  # an exception is not a death
                self.done(rows)
            return
        self.done(rows)
        for r in rows:
            (count,) = self.begin([r])
            try:
                if self.gave_up(count):
                    give_up(r, count)
                else:
                    work([r])
            finally:
                self.done([r])

    def stream(
        self, rows: list[dict], work: Callable[[dict], Iterator[T]], give_up: Callable[[dict, int], Iterator[T]]
    ) -> Iterator[T]:
        """`run` for work that yields as it goes (one row's work at a time): what each row's work
        yields, the rows of the block staying in flight on the ledger until the block's work ends."""
        crashes = self.begin(rows)
        if not any(crashes):
            try:
                for r in rows:
                    yield from work(r)
            finally:
                self.done(rows)
            return
        self.done(rows)
        for r in rows:
            (count,) = self.begin([r])
            try:
                yield from give_up(r, count) if self.gave_up(count) else work(r)
            finally:
                self.done([r])

    def _keys(self, rows: Sequence[dict]) -> list[Key]:
        return [(self.stage, clip_name(r), str(r["etag"])) for r in rows]

    def begin(self, rows: Sequence[dict]) -> list[int]:
        if self.ledger is None or not rows:
            return [0] * len(rows)
        import ray

        return ray.get(self.ledger.begin.remote(self._keys(rows), self.worker))

    def done(self, rows: Sequence[dict]) -> None:
        if self.ledger is None or not rows:
            return
        import ray

        ray.get(self.ledger.done.remote(self._keys(rows)))

    def gave_up(self, crashes: int) -> bool:
        return crashes >= self.max_crashes

    def message(self, crashes: int) -> str:
        return (
            f"{self.stage} failed: the worker process died {crashes} times while this video was in flight "
            f"(max_worker_crashes={self.max_crashes}); it was not tried again"
        )
