"""Planning at scale: a manifest of N objects against an output of about N/2 rows, as `--dry-run`
plans it, with the driver's peak memory and the time.

    python -m bench.plan_scale [--objects 2000000] [--out F]

The data is generated first, in a child process (so it does not count in the driver's peak): a
Parquet manifest (video_uri, etag, size) and output parts in flashcap's schema holding rows for half
the manifest's keys, of which 2% carry an older etag (the object changed since: to caption again),
plus rows for objects no longer in the manifest (10% of the output), and 1% transient error rows;
1% of the manifest's keys are listed twice. The plan must come out exactly as the generator counts.

Then the writer's side: the keys of `to_caption` rows go through the driver's KeySet (what a run
keeps of the rows it writes), with the memory it takes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PART_ROWS = 50_000


def generate(root: Path, objects: int) -> dict:
    """Write the manifest and the output; return the plan they must give."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.storage import OUTPUT_SCHEMA

    rng = np.random.default_rng(0)
    uris = np.array([f"s3://bucket/videos/{i:09d}.mp4" for i in range(objects)], dtype=object)
    etags = np.array([f"{i * 2654435761 % 2**32:08x}" for i in range(objects)], dtype=object)
    twice = rng.choice(objects, size=objects // 100, replace=False)  # listed twice: planned once
    listed_uris, listed_etags = np.concatenate([uris, uris[twice]]), np.concatenate([etags, etags[twice]])
    pq.write_table(
        pa.table({"video_uri": listed_uris, "etag": listed_etags, "size": np.full(len(listed_uris), 1 << 20)}),
        root / "manifest.parquet",
    )
    in_output = rng.random(objects) < 0.5
    changed = in_output & (rng.random(objects) < 0.02)
    transient = in_output & ~changed & (rng.random(objects) < 0.01)
    out_uris = list(uris[in_output])
    out_etags = [("old-" + e) if c else e for e, c in zip(etags[in_output], changed[in_output])]
    out_transient = list(transient[in_output])
    gone = int(0.1 * len(out_uris))
    out_uris += [f"s3://bucket/deleted/{i:09d}.mp4" for i in range(gone)]
    out_etags += ["x"] * gone
    out_transient += [False] * gone
    (root / "out").mkdir()
    now = datetime.now(UTC)
    n = len(out_uris)
    for p, start in enumerate(range(0, n, PART_ROWS)):
        stop = min(n, start + PART_ROWS)
        k = stop - start
        error = ["decode failed: SlowDown" if t else "" for t in out_transient[start:stop]]
        table = pa.table(
            {
                "video_uri": out_uris[start:stop],
                "etag": out_etags[start:stop],
                "size": [1] * k,
                "caption": ["" if e else "a caption" for e in error],
                "num_tokens": [3] * k,
                "acceptance_length": [1.0] * k,
                "decode_s": [0.0] * k,
                "generate_s": [0.0] * k,
                "model": ["m"] * k,
                "drafter": [""] * k,
                "error": error,
                "error_kind": ["transient" if e else "" for e in error],
                "worker_node": ["n"] * k,
                "finished_at": [now] * k,
            },
            schema=OUTPUT_SCHEMA,
        )
        pq.write_table(table, root / "out" / f"part-{p:05d}.parquet", compression="zstd")
    done = int((in_output & ~changed).sum())
    return {
        "listed": objects,
        "already_done": done,
        "to_caption": objects - done,
        "to_retry": 0,
        "output_rows": n,
        "retry_errors": {"already_done": done - int(transient.sum()), "to_retry": int(transient.sum())},
    }


def _rss_mb() -> float:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def writer_keys(n: int) -> dict:
    """The driver's KeySet holding n keys (a run's writes): memory and time."""
    from pipeline.run import KeySet

    before, started = _rss_mb(), time.time()
    keys = KeySet()
    for i in range(n):
        keys.add((f"s3://bucket/videos/{i:09d}.mp4", f"{i * 2654435761 % 2**32:08x}"))
    return {"keys": len(keys), "seconds": time.time() - started, "rss_growth_mb": _rss_mb() - before}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=2_000_000)
    p.add_argument("--root", help="(internal) generate the data here and print what the plan must be")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.root:
        print(json.dumps(generate(Path(args.root), args.objects)))
        return
    root = Path(tempfile.mkdtemp(prefix="flashcap-plan-"))
    started = time.time()
    gen = subprocess.run(
        [sys.executable, __file__, "--objects", str(args.objects), "--root", str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    want = json.loads(gen.stdout.strip().splitlines()[-1])
    generated_s = time.time() - started

    import ray

    from pipeline.config import load_config
    from pipeline.plan import make_plan
    from pipeline.storage import S3Settings

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    for retry in (False, True):
        config = load_config(
            manifest=str(root / "manifest.parquet"),
            output=str(root / "out"),
            model=str(ROOT / "models" / "demo-target"),
            dry_run=True,
            retry_errors=retry,
        )
        started = time.time()
        plan = make_plan(config, S3Settings())
        results["retry_errors" if retry else "plain"] = {**plan.summary(), "seconds": time.time() - started}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plain, retried = results["plain"], results["retry_errors"]
    exact = {k: plain[k] for k in ("listed", "already_done", "to_caption", "to_retry")} == {
        k: want[k] for k in ("listed", "already_done", "to_caption", "to_retry")
    } and (retried["already_done"], retried["to_retry"]) == (
        want["retry_errors"]["already_done"],
        want["retry_errors"]["to_retry"],
    )
    writer = writer_keys(plain["to_caption"])
    report = {
        "date": datetime.now(UTC).date().isoformat(),
        "objects": args.objects,
        "output_rows": want["output_rows"],
        "generated_s": generated_s,
        "plans": results,
        "expected": want,
        "exact": exact,
        "driver_peak_rss_mb": peak_mb,
        "writer": writer,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
