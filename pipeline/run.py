"""The captioning job on Ray Data:

    list objects -> read + decode (CPU tasks) -> caption actors (pool) -> driver -> Parquet parts

The driver consumes rows as they stream out, writes them in Parquet parts
(whole parts only) and aggregates throughput. Before anything runs on the
cluster it reads what the output already holds, so a rerun captions only new
or changed objects and a row is never written twice.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from pipeline.config import CaptionConfig
from pipeline.storage import OUTPUT_SCHEMA, OutputStore, S3Settings, VideoObject, list_videos
from pipeline.throughput import Throughput

OUTPUT_COLUMNS = [f.name for f in OUTPUT_SCHEMA]


class PartWriter:
    """Buffers rows and writes them as Parquet parts; never writes a (uri, etag) key twice."""

    def __init__(
        self, store: OutputStore, run_id: str, flush_rows: int, flush_seconds: float, known: set[tuple[str, str]]
    ) -> None:
        self.store, self.run_id = store, run_id
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.known = set(known)
        self.buffer: list[dict] = []
        self.parts: list[str] = []
        self.rows_written = 0
        self.duplicates_dropped = 0
        self._last_flush = time.time()

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            key = (r["video_uri"], r["etag"])
            if key in self.known:
                self.duplicates_dropped += 1
                continue
            self.known.add(key)
            self.buffer.append({c: r[c] for c in OUTPUT_COLUMNS})
        if len(self.buffer) >= self.flush_rows or time.time() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.time()
        if not self.buffer:
            return
        name = f"part-{self.run_id}-{len(self.parts):05d}.parquet"
        self.parts.append(self.store.write_part(self.buffer, name))
        self.rows_written += len(self.buffer)
        self.buffer = []


def _build_dataset(config: CaptionConfig, todo: list[VideoObject], settings: S3Settings):
    import ray.data
    from ray.data import ActorPoolStrategy

    from actors.caption import CaptionActor
    from pipeline.decode import decode_row

    items = [{"video_uri": o.uri, "size": o.size, "etag": o.etag} for o in todo]
    # ~8 objects per read/decode task: fewer, larger tasks cut Ray overhead; frames stay small per block.
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // 8)))
    ds = ds.map(
        decode_row,
        fn_kwargs=dict(
            settings=settings,
            num_frames=config.num_frames,
            max_side=config.max_side,
            fps=config.fps,
            max_frames=config.max_frames,
            max_bytes=config.max_video_bytes,
        ),
        num_cpus=config.cpus_per_decode,
    )
    return ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"config": config.model_dump()},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=config.min_actors, max_size=config.max_actors),
        num_gpus=config.gpus_per_actor,
        num_cpus=config.cpus_per_actor,
    )


def run_job(config: CaptionConfig, log: Callable[[str], None] = print) -> dict:
    """Caption everything under config.input not yet in config.output. Ray must be initialised."""
    import ray.data

    settings = S3Settings(config.s3_endpoint, config.s3_region)
    store = OutputStore(config.output, settings)
    # Storage problems surface here, before any model loads.
    done = store.existing_keys()
    store.check_writable()
    objects = list_videos(config.input, config.include, settings)
    todo = [o for o in objects if (o.uri, o.etag) not in done]
    log(
        f"[flashcap] {len(objects)} videos under {config.input}: {len(objects) - len(todo)} already captioned, "
        f"{len(todo)} to caption"
    )

    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
    writer = PartWriter(store, run_id, config.flush_rows, config.flush_seconds, done)
    tracker = Throughput(len(todo))
    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        dataset = _build_dataset(config, todo, settings)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pylist()
            writer.add(rows)
            tracker.add(rows)
            line = tracker.maybe_line()
            if line:
                log(line)
        writer.flush()
        log(tracker.line())

    report = tracker.report(
        run_id=run_id,
        input=config.input,
        output=config.output,
        listed=len(objects),
        already_done=len(objects) - len(todo),
        rows_written=writer.rows_written,
        duplicates_dropped=writer.duplicates_dropped,
        parts=writer.parts,
        model=config.model,
        drafter=config.drafter,
        finished_at=datetime.now(timezone.utc).isoformat(),
    )
    if config.report:
        store.write_bytes(f"_report-{run_id}.json", json.dumps(report, indent=2, default=str).encode())
        store.write_bytes(f"_throughput-{run_id}.png", tracker.chart_png())
    return report
