"""One engine shared by the threads that call it (an actor's batches in flight).

Each caller submits its requests, then helps decode: whichever caller holds `lock` runs the
engine's cycles, admitting waiting requests of any caller as slots free, until its own requests are
finished; it then returns and a caller still waiting takes over (leader-follower). So the next
batch's rows fill the slots of the batch finishing, and the device does not idle while one batch's
longest caption ends. Each request is charged its share of the engine's seconds: a prefill's split
over the rows it admitted, a cycle's over the rows decoding in it.

A failure inside the engine (a prefill or a cycle) fails every request admitted and not yet
finished, whoever submitted it: the engine's state is then unknown, so it is dropped and the next
cycle opens a new one. Callers decide what a failed request becomes (the caption actor decodes each
again alone).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flash.generate import Engine, _clock


@dataclass(eq=False)
class Request:
    item: Any  # the caller's (a row)
    tokens: list[int] | None = None  # new tokens, once decoded
    acceptance_length: float = 0.0
    suffix_tokens: int = 0  # accepted tokens that suffix decoding drafted
    seconds: float = 0.0  # its share of the engine's time
    error: BaseException | None = None  # the engine failed while it was admitted
    held: bool = False  # refused at admission (`admit` hook): not decoded here

    @property
    def finished(self) -> bool:
        return self.tokens is not None or self.error is not None or self.held


class SharedEngine:
    """`decode(items)` from any number of threads; one `Engine` (from `make_engine()`, with at most
    `max_rows` slots) decodes them all. `inputs_for(items)` makes a processor batch. `admit(items)`,
    called as items are about to be admitted, returns for each whether to decode it here (False:
    the request ends `held`). `failed(error, items)` hears of an engine failure before its requests
    are marked."""

    def __init__(
        self,
        make_engine: Callable[[], Engine],
        inputs_for: Callable[[list[Any]], Any],
        max_rows: int,
        admit: Callable[[list[Any]], Sequence[bool]] | None = None,
        failed: Callable[[BaseException, list[Any]], None] | None = None,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.lock = threading.Lock()  # held while the engine runs (or anything else uses the model)
        self.max_rows = max_rows
        self.engine: Engine | None = None
        self.engines_opened = 0
        self._make_engine, self._inputs_for, self._admit_hook, self._failed = make_engine, inputs_for, admit, failed
        self._queue: deque[Request] = deque()
        self._queue_lock = threading.Lock()
        self._running: dict[int, Request] = {}  # engine key -> request

    def decode(self, items: list[Any]) -> list[Request]:
        return self.wait(self.submit(items))

    def submit(self, items: list[Any]) -> list[Request]:
        """Queue items for admission; `wait` returns them decoded."""
        requests = [Request(item) for item in items]
        with self._queue_lock:
            self._queue.extend(requests)
        return requests

    def wait(self, requests: list[Request]) -> list[Request]:
        """Run the engine (while holding `lock`) until every one of `requests` is finished."""
        while not all(r.finished for r in requests):
            with self.lock:
                while not all(r.finished for r in requests):
                    self._cycle()
        return requests

    @property
    def compile_status(self) -> dict | None:
        """The engine's {"active", "fallback"} (None before the first engine opens)."""
        return self.engine.compile_status if self.engine is not None else None

    def _open(self) -> Engine:
        engine = self._make_engine()
        engine.stats.record_cycles = False  # it lives as long as its actor
        self.engine, self.engines_opened = engine, self.engines_opened + 1
        return engine

    def _take(self, engine: Engine) -> list[Request]:
        """The requests to admit now: as many as there are free slots, once a quarter of the slots
        is free (one prefill per group), or at once when nothing decodes."""
        free = self.max_rows - engine.live
        with self._queue_lock:
            if not self._queue or (engine.live and free < max(1, self.max_rows // 4)):
                return []
            return [self._queue.popleft() for _ in range(min(free, len(self._queue)))]

    def _cycle(self) -> None:
        engine = self.engine or self._open()
        group = self._take(engine)
        try:
            if group:
                self._admit(engine, group)
            if not self._running:
                if not group and not self._queue:  # a caller waits on requests that are nowhere
                    raise RuntimeError("the shared engine has no request to decode")
                return
            live = list(self._running.values())
            started = time.perf_counter()
            done = engine.step()
            share = (_clock(engine.device) - started) / len(live)
            for r in live:
                r.seconds += share
            for key in done:
                r = self._running.pop(key)
                r.suffix_tokens = engine.stats.row_suffix.get(key, 0)
                r.tokens, r.acceptance_length = engine.pop(key)
        except Exception as err:  # the engine's state is unknown: every request in it fails
            self._fail(err, group)

    def _admit(self, engine: Engine, group: list[Request]) -> None:
        if self._admit_hook is not None:
            for r, take in zip(group, self._admit_hook([r.item for r in group])):
                r.held = not take
            group = [r for r in group if not r.held]
        if not group:
            return
        started = time.perf_counter()
        keys = engine.admit(self._inputs_for([r.item for r in group]))
        share = (_clock(engine.device) - started) / len(group)
        for key, r in zip(keys, group):
            r.seconds += share
            self._running[key] = r

    def _fail(self, err: BaseException, group: list[Request]) -> None:
        running = set(self._running.values())
        failed = list(running) + [r for r in group if not r.finished and r not in running]
        self._running.clear()
        self.engine = None
        if self._failed is not None:
            self._failed(err, [r.item for r in failed])
        for r in failed:
            r.error = err
