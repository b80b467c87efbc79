"""The driver's memory while rows stream through it: a Ray Data stream of N output-shaped rows
(blocks of --block rows, no model) consumed as run_job consumes it (PartWriter, Throughput), with
the driver's RSS sampled along the way. Separates what grows per row on the driver from the rest
of a real run.

    python -m bench.driver_stream [--rows 400000] [--block 8] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rows(batch):
    import pyarrow as pa

    n, now = batch.num_rows, datetime.now(UTC)
    return pa.table(
        {
            "video_uri": [f"s3://b/{i:09d}.mp4" for i in batch.column("id").to_pylist()],
            "etag": ["e"] * n,
            "size": [1] * n,
            "caption": ["a caption " * 30] * n,
            "num_tokens": [60] * n,
            "acceptance_length": [4.0] * n,
            "decode_s": [0.1] * n,
            "generate_s": [0.2] * n,
            "model": ["m"] * n,
            "drafter": ["d"] * n,
            "error": [""] * n,
            "error_kind": [""] * n,
            "worker_node": ["n@h"] * n,
            "finished_at": [now] * n,
            "actor": ["a"] * n,
        }
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import ray

    import actors.caption  # noqa: F401 - a real run's driver imports it (torch, transformers)
    from pipeline.run import PartWriter
    from pipeline.storage import OutputStore, S3Settings
    from pipeline.throughput import Throughput

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    out = Path(tempfile.mkdtemp(prefix="flashcap-stream-"))
    writer = PartWriter(OutputStore(str(out), S3Settings()), "bench", 20_000, 60.0)
    tracker = Throughput(args.rows)
    ds = ray.data.range(args.rows, override_num_blocks=args.rows // args.block)
    ds = ds.map_batches(_rows, batch_format="pyarrow", batch_size=None)
    points, done, started = [], 0, time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = batch.to_pylist()
        writer.add(rows)
        tracker.add(rows)
        done += len(rows)
        if not points or done - points[-1][0] >= args.rows // 20:
            points.append((done, round(_rss_mb())))
    writer.flush()
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "rows": args.rows,
        "rows_per_block": args.block,
        "seconds": time.time() - started,
        "rss_mb_by_rows": points,
        "growth_bytes_per_row_after_5pct": (points[-1][1] - points[1][1]) * 2**20 / (points[-1][0] - points[1][0]),
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
