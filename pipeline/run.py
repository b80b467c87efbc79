"""The captioning job on Ray Data:

    list objects -> read + decode (CPU tasks) -> caption actors (pool) -> driver -> Parquet parts

The driver consumes rows as they stream out, writes them in Parquet parts
(whole parts only) and aggregates throughput. It is the only writer: blocks
are read in a thread of their own and handed over, so the driver also wakes
when no block comes and writes buffered rows `flush_seconds` after the oldest
of them arrived. Before anything runs on the cluster it reads what the output
already holds, so a rerun captions only new or changed objects and a row is
never written twice. Every log line, error row and report passes through
`redact`: no user:password@ or presigned credential from an error message
reaches them.

Every listed object ends as exactly one row (a caption or an error):
- a dead actor or task is restarted and its work retried by Ray Data; the
  attempt ledger (pipeline/ledger.py) turns a video that keeps killing its
  worker into an error row after `max_worker_crashes` deaths;
- if the cluster loses work it cannot retry (a node's results gone with it),
  the run stops, and the driver runs again on what is still missing, up to
  `max_rounds` times;
- if the driver itself dies, rerunning the same command finishes the job:
  rows already written are skipped, nothing is written twice.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np

from pipeline.config import DEFAULT_MAX_FRAMES, DEFAULT_NUM_FRAMES, CaptionConfig, redact
from pipeline.plan import Plan, make_plan
from pipeline.storage import LEGACY_VALUES, OUTPUT_SCHEMA, OutputStore, S3Settings, StorageError, VideoObject, row_key
from pipeline.throughput import Throughput

OUTPUT_COLUMNS = [f.name for f in OUTPUT_SCHEMA]
T = TypeVar("T")


class JobIncomplete(RuntimeError):
    """Some videos have no row after max_rounds; rerunning the same command finishes them."""


class KeySet:
    """A set of keys (tuples of strings: a row's video_uri, etag and clip) held as 16-byte BLAKE2b
    digests: a sorted numpy array plus a small recent set merged into it, about 16 bytes a key (160
    MB for 10 million keys, against ~230 bytes a key as Python tuples). A false match needs a 128-bit
    collision."""

    MERGE_AT = 1 << 16

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype="S16")
        self._recent: set[bytes] = set()

    @staticmethod
    def digest(key: tuple[str, ...]) -> bytes:
        return hashlib.blake2b("\x00".join(key).encode(), digest_size=16).digest()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, key: tuple[str, ...]) -> bool:
        return self._has(self.digest(key))

    def _has(self, d: bytes) -> bool:
        if d in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, d))
        # numpy hands "S16" items back without their trailing zero bytes
        return i < len(self._sorted) and self._sorted[i] == d.rstrip(b"\x00")

    def add(self, key: tuple[str, ...]) -> bool:
        """Add the key; False if it was there already."""
        d = self.digest(key)
        if self._has(d):
            return False
        self._recent.add(d)
        if len(self._recent) >= self.MERGE_AT:  # one copy of the array, no sort of it
            recent = np.array(sorted(self._recent), dtype="S16")
            self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, recent), recent)
            self._recent = set()
        return True


def writer_key(row: dict) -> tuple[str, str, str]:
    """A row's key: (video_uri, etag, where its clip starts)."""
    return str(row["video_uri"]), str(row["etag"]), repr(float(row.get("clip_start_s") or 0.0))


@dataclass
class ObjectRows:
    """The rows this run wrote of a listed object that makes several (a shard, windows)."""

    keys: set[str] = field(default_factory=set)  # row_key of each
    total: int = 0  # rows the object makes in all, once a row has said it


class PartWriter:
    """Buffers rows and writes them as Parquet parts; never writes a (video_uri, etag, clip_start_s)
    key twice. Rows are written when `flush_rows` are buffered or `flush_seconds` after the oldest
    of them arrived. Keeps count of the rows of objects that make several, to tell when one is whole."""

    def __init__(self, store: OutputStore, run_id: str, flush_rows: int, flush_seconds: float) -> None:
        self.store, self.run_id = store, run_id
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.known = KeySet()  # keys written by this run (the plan left out the ones already there)
        self.objects: dict[tuple[str, str], ObjectRows] = {}  # (object uri, etag) -> rows written
        self.whole_objects = KeySet()  # objects of several rows this run wrote whole
        self.buffer: list[dict] = []
        self.parts: list[str] = []
        self.rows_written = 0
        self.duplicates_dropped = 0
        self._oldest: float | None = None  # time.monotonic() when the oldest buffered row arrived

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            if not self.known.add(writer_key(r)):
                self.duplicates_dropped += 1
                continue
            if r.get("shard_uri") or int(r.get("object_rows", 1)) != 1:
                obj = (r.get("shard_uri") or r["video_uri"], r["etag"])
                entry = self.objects.setdefault(obj, ObjectRows())
                entry.keys.add(row_key(r["video_uri"], r.get("clip_start_s") or 0.0))
                entry.total = max(entry.total, int(r.get("object_rows") or 0))
                if 0 < entry.total <= len(entry.keys):  # all written here: 16 bytes kept of it, not its keys
                    self.whole_objects.add(obj)
                    del self.objects[obj]
            row = {c: r[c] if c in r else LEGACY_VALUES.get(c) for c in OUTPUT_COLUMNS}
            if row["error"]:  # errors quote what failed: URLs, with credentials if the input had any
                row["error"] = redact(row["error"])
            self.buffer.append(row)
        if self.buffer and self._oldest is None:
            self._oldest = time.monotonic()
        if len(self.buffer) >= self.flush_rows:
            self.flush()
        else:
            self.flush_if_due()

    def whole(self, o: VideoObject) -> bool:
        """Whether the object has all its rows: those the plan found (`o.skip`) and this run's."""
        if (o.uri, o.etag) in self.whole_objects:
            return True
        entry = self.objects.get((o.uri, o.etag))
        if entry is None:  # none of several rows written: whole if it made one row, and that was written
            return (o.uri, o.etag, repr(0.0)) in self.known
        return entry.total > 0 and len(set(o.skip) | entry.keys) >= entry.total

    def wait_s(self) -> float | None:
        """Seconds until the buffered rows are due to be written; None with nothing buffered."""
        if self._oldest is None:
            return None
        return max(0.0, self._oldest + self.flush_seconds - time.monotonic())

    def flush_if_due(self) -> None:
        if self.wait_s() == 0.0:
            self.flush()

    def flush(self) -> None:
        self._oldest = None
        if not self.buffer:
            return
        name = f"part-{self.run_id}-{len(self.parts):05d}.parquet"
        self.parts.append(self.store.write_part(self.buffer, name))
        self.rows_written += len(self.buffer)
        self.buffer = []


def timed(items: Iterable[T], wait_s: Callable[[], float | None]) -> Iterator[T | None]:
    """The items of `items`, read in a thread of its own, and None whenever none came within wait_s()
    seconds (None from wait_s: wait as long as it takes). What `items` raises is raised here. The
    reader stays at most one item ahead and stops once the consumer does."""
    handed: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def hand(message: tuple) -> bool:
        while not stop.is_set():
            try:
                handed.put(message, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in items:
                if not hand(("item", item)):
                    return
            hand(("end", None))
        except BaseException as err:  # handed over, raised in the consumer
            hand(("error", err))

    threading.Thread(target=read, name="flashcap-blocks", daemon=True).start()
    try:
        while True:
            try:
                kind, value = handed.get(timeout=wait_s())
            except queue.Empty:
                yield None
                continue
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()


def _build_dataset(config: CaptionConfig, todo: list[VideoObject], settings: S3Settings, ledger=None, actor=None):
    """list -> decode tasks -> actors of `actor` (default the caption actor) holding the target."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.caption import CaptionActor
    from pipeline.decode import decode_block

    # ~8 objects per read/decode task: fewer, larger tasks cut Ray overhead; frames stay small per block.
    if isinstance(todo, list):
        items = [{"video_uri": o.uri, "size": o.size, "etag": o.etag, "skip": list(o.skip)} for o in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // 8)))
    else:  # a Ray Data plan (manifest or a large listing)
        ds = todo.repartition(target_num_rows_per_block=8)
    ds = ds.map_batches(
        decode_block,
        batch_format="pyarrow",
        batch_size=None,  # a block (~8 objects) per call: one ledger call each way
        fn_kwargs=dict(
            settings=settings, sampling=sampling_of(config), ledger=ledger, max_crashes=config.max_worker_crashes
        ),
        num_cpus=config.cpus_per_decode,
    )
    return ds.map_batches(
        actor or CaptionActor,
        fn_constructor_kwargs={"config": config.model_dump(), "ledger": ledger},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        # Several calls per actor, in threads: the processor of one batch overlaps the model on another
        # (the actor lets one call at a time use the model).
        compute=ActorPoolStrategy(
            min_size=config.min_actors,
            max_size=config.max_actors,
            max_concurrent_calls_per_actor=config.batches_per_actor,
            enable_true_multi_threading=config.batches_per_actor > 1,
        ),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )


def sampling_of(config: CaptionConfig):
    """What the decode tasks sample, from the job's configuration."""
    from pipeline.decode import Sampling, Windows

    windows = None
    if config.window_s is not None:
        windows = Windows(config.window_s, config.window_stride_s or config.window_s, config.min_window_s)
    return Sampling(
        num_frames=config.num_frames,
        max_side=config.max_side,
        fps=config.fps,
        max_frames=config.max_frames,
        max_bytes=config.max_video_bytes,
        windows=windows,
        include=tuple(config.include),
    )


def with_checkpoint_defaults(config: CaptionConfig, settings: S3Settings) -> CaptionConfig:
    """Frame sampling the job leaves unset follows the checkpoint's video processor config, as
    Hugging Face's processors do (num_frames, else fps), else flashcap's defaults. The driver reads
    only the checkpoint's small files."""
    from pipeline.checkpoints import CONFIG_FILES, resolve_checkpoint, video_sampling

    if (config.num_frames is not None or config.fps is not None) and config.max_frames is not None:
        return config
    model = video_sampling(resolve_checkpoint(config.model, settings, only=CONFIG_FILES))
    update: dict = {"max_frames": config.max_frames or model["max_frames"] or DEFAULT_MAX_FRAMES}
    if config.num_frames is None and config.fps is None:
        if model["num_frames"]:
            update["num_frames"] = int(model["num_frames"])
        elif model["fps"]:
            update["fps"] = float(model["fps"])
        else:
            update["num_frames"] = DEFAULT_NUM_FRAMES
    return config.model_copy(update=update)


def check_placement(config: CaptionConfig, settings: S3Settings, log: Callable[[str], None]) -> None:
    """With GPUs and their memory given, the target is placed on the driver from its config.json
    alone: one too big for an actor's GPUs stops the job here (TargetDoesNotFit, with the sizes)."""
    if not (config.gpus_per_actor and config.gpu_memory_gib):
        return
    import torch

    from actors.caption import DTYPES, actor_placement
    from flash.placement import GIB
    from pipeline.checkpoints import CONFIG_FILES, reference_kind, resolve_checkpoint
    from pipeline.config import SUFFIX

    model_dir = resolve_checkpoint(config.model, settings, only=CONFIG_FILES)
    local = config.drafter and config.drafter != SUFFIX and reference_kind(config.drafter, "drafter") == "local"
    drafter = config.drafter if local else None
    dtype = DTYPES.get(config.dtype, torch.bfloat16)
    placement = actor_placement(config, model_dir, dtype, int(config.gpu_memory_gib * GIB), drafter)
    log(f"[flashcap] target placement per actor: {placement.describe()}")


@dataclass
class Rounds:
    """What the rounds of a run did."""

    count: int = 0
    missing: int = 0  # videos without a row after the last round
    errors: list[str] = field(default_factory=list)  # why each round that stopped early stopped
    crashes: dict = field(default_factory=lambda: {"worker_crashes": {}, "crashed_videos": [], "lost_with_node": 0})


def run_job(config: CaptionConfig, log: Callable[[str], None] = print) -> dict:
    """Caption everything under config.input not yet in config.output. Ray must be initialised.

    Raises StorageError for permanent storage problems (before any model loads when they are there
    from the start) and JobIncomplete if videos are still without a row after config.max_rounds.
    """
    log = _redacting(log)
    settings = S3Settings(config.s3_endpoint, config.s3_region, config.s3_max_attempts, config.s3_timeout_s)
    config = with_checkpoint_defaults(config, settings)
    check_placement(config, settings, log)
    store = OutputStore(config.output, settings)
    # Storage problems surface here, before any model loads.
    plan = make_plan(config, settings)
    if config.dry_run:
        summary = redact(plan.summary())
        log(json.dumps(summary))
        return summary
    source = config.manifest if config.manifest else f"under {config.input}"
    log(
        f"[flashcap] {plan.listed} videos {source}: {plan.already_done} already captioned, "
        f"{plan.to_caption} to caption" + (f" ({plan.to_retry} of them retries)" if plan.to_retry else "")
    )
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    writer = PartWriter(store, run_id, config.flush_rows, config.flush_seconds)
    tracker = Throughput(plan.to_caption)
    rounds = _run_rounds(config, settings, plan, writer, tracker, log)
    if plan.to_caption:
        log(tracker.line())
    report = _report(config, plan, run_id, writer, tracker, rounds)
    if config.report:
        store.write_bytes(f"_report-{run_id}.json", json.dumps(report, indent=2, default=str).encode())
        store.write_bytes(f"_throughput-{run_id}.png", tracker.chart_png())
    if rounds.missing:
        last = f"last: {rounds.errors[-1]}" if rounds.errors else "no round reported an error"
        raise JobIncomplete(
            f"{rounds.missing} of {plan.to_caption} objects lack rows after {rounds.count} rounds ({last}); "
            "rerun the same command to finish them: rows already written are kept and never duplicated"
        )
    return report


def _redacting(log: Callable[[str], None]) -> Callable[[str], None]:
    return lambda line: log(redact(line))


def _run_rounds(
    config: CaptionConfig,
    settings: S3Settings,
    plan: Plan,
    writer: PartWriter,
    tracker: Throughput,
    log: Callable[[str], None],
) -> Rounds:
    """Caption what the plan left to do, in rounds: each round runs again on what the one before left
    without a row (the cluster lost work it could not retry), up to config.max_rounds."""
    import ray
    import ray.data

    from pipeline.ledger import start_ledger

    rounds = Rounds(missing=plan.to_caption)
    if not rounds.missing:
        return rounds
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    ledger = start_ledger()
    try:
        remaining = plan.todo
        while rounds.missing and rounds.count < config.max_rounds:
            rounds.count += 1
            error = _run_round(_build_dataset(config, remaining, settings, ledger), writer, tracker, log)
            if error:
                rounds.errors.append(error)
                log(f"[flashcap] round {rounds.count} stopped early: {error}")
            writer.flush()
            remaining, rounds.missing = _still_missing(config, settings, remaining, writer)
            if rounds.missing and rounds.count < config.max_rounds:
                log(f"[flashcap] {rounds.missing} objects lack rows; round {rounds.count + 1} starts")
        if ledger is not None:
            rounds.crashes = ray.get(ledger.summary.remote())
    finally:
        if ledger is not None:
            ray.kill(ledger)
    return rounds


def _run_round(dataset, writer: PartWriter, tracker: Throughput, log: Callable[[str], None]) -> str | None:
    """Stream the dataset's rows into the writer and the tracker; None, or why the round stopped early
    (the cluster lost work it could not retry). The driver also wakes when buffered rows are due."""
    try:
        for batch in timed(dataset.iter_batches(batch_size=None, batch_format="pyarrow"), writer.wait_s):
            if batch is None:  # no block came in time: write what waited flush_seconds
                writer.flush_if_due()
                continue
            rows = batch.to_pylist()
            writer.add(rows)
            tracker.add(rows)
            line = tracker.maybe_line()
            if line:
                log(line)
    except StorageError:  # the output cannot be written: stop (a rerun resumes from what was written)
        raise
    except Exception as err:  # the cluster lost work it could not retry: run again on what is missing
        return redact(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500])
    return None


def _still_missing(config: CaptionConfig, settings: S3Settings, remaining, writer: PartWriter) -> tuple[object, int]:
    """(what is still without a row, how many) after a round."""
    if isinstance(remaining, list):
        remaining = [o for o in remaining if not writer.whole(o)]
        for i, o in enumerate(remaining):  # a partly written object: its rows written so far are skipped
            entry = writer.objects.get((o.uri, o.etag))
            if entry is not None:
                remaining[i] = replace(o, skip=tuple(sorted(set(o.skip) | entry.keys)))
        return remaining, len(remaining)
    # a Ray Data plan: plan again against the output as it is now
    again = make_plan(config.model_copy(update={"retry_errors": False}), settings)
    return again.todo, again.to_caption


def _report(
    config: CaptionConfig, plan: Plan, run_id: str, writer: PartWriter, tracker: Throughput, rounds: Rounds
) -> dict:
    """The run's report (redacted: it is written beside the output and printed)."""
    return redact(
        tracker.report(
            run_id=run_id,
            input=config.input,
            output=config.output,
            listed=plan.listed,
            already_done=plan.already_done,
            to_caption=plan.to_caption,  # objects: a shard or a video in windows makes several rows
            retried=plan.to_retry,
            rows_written=writer.rows_written,
            missing=rounds.missing,
            duplicates_dropped=writer.duplicates_dropped,
            rounds=rounds.count,
            round_errors=rounds.errors,
            worker_crashes=rounds.crashes["worker_crashes"],
            videos_in_flight_at_a_crash=len(rounds.crashes["crashed_videos"]),
            videos_lost_with_a_node=rounds.crashes["lost_with_node"],
            parts=writer.parts,
            model=config.model,
            drafter=config.drafter,
            finished_at=datetime.now(UTC).isoformat(),
        )
    )
