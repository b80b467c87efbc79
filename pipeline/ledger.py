"""The attempt ledger: how a video that kills its worker ends as an error row
instead of stalling the job.

Ray Data restarts dead actors and retries failed tasks without limit, which is
right for a node that vanished and wrong for an input that crashes its worker
every time (a decoder segfault, an out-of-memory kill): the job would loop on
it forever. So every worker brackets each unit of work with `begin`/`done`
calls to one small actor that lives beside the driver. A `begin` for a key
that is still in flight means the previous attempt's process died with it:
that key's crash count goes up. Workers isolate keys with a crash on record
(one at a time, so only the culprit is charged again), and a key charged
`max_crashes` times gets an error row without being touched again.

The ledger only counts; it never decides what is written. The driver still
writes each (uri, etag) once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

Key = tuple[str, str, str]  # (stage, video_uri, etag)


class AttemptLedger:
    """Plain class (unit-testable); `start_ledger` runs it as a Ray actor."""

    def __init__(self) -> None:
        self.in_flight: dict[Key, str] = {}
        self.crashes: Counter[Key] = Counter()

    def begin(self, keys: Sequence[Key], worker: str) -> list[int]:
        """Mark keys in flight on `worker`; return each key's crash count (this attempt's evidence included)."""
        out = []
        for key in keys:
            key = tuple(key)
            if key in self.in_flight:  # the attempt that marked it never finished: its process died
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


class Guard:
    """A worker's view of the ledger. Without a ledger (benchmarks, notebooks) it counts nothing."""

    def __init__(self, ledger, stage: str, max_crashes: int, worker: str) -> None:
        self.ledger, self.stage, self.max_crashes, self.worker = ledger, stage, max_crashes, worker

    def _keys(self, rows: Sequence[dict]) -> list[Key]:
        return [(self.stage, str(r["video_uri"]), str(r["etag"])) for r in rows]

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
