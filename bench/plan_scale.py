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


def write_manifest(root: Path, objects: int, rng) -> tuple:
    """The manifest: `objects` keys, 1% of them listed twice (planned once). Returns (uris, etags)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    uris = np.array([f"s3://bucket/videos/{i:09d}.mp4" for i in range(objects)], dtype=object)
    etags = np.array([f"{i * 2654435761 % 2**32:08x}" for i in range(objects)], dtype=object)
    twice = rng.choice(objects, size=objects // 100, replace=False)
    listed_uris, listed_etags = np.concatenate([uris, uris[twice]]), np.concatenate([etags, etags[twice]])
    pq.write_table(
        pa.table({"video_uri": listed_uris, "etag": listed_etags, "size": np.full(len(listed_uris), 1 << 20)}),
        root / "manifest.parquet",
    )
    return uris, etags


def write_parts(out: Path, uris: list, etags: list, transient: list) -> None:
    """Output rows in flashcap's schema, PART_ROWS a part; a transient row is an error of that kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.storage import OUTPUT_SCHEMA

    out.mkdir()
    now = datetime.now(UTC)
    for p, start in enumerate(range(0, len(uris), PART_ROWS)):
        stop = min(len(uris), start + PART_ROWS)
        k = stop - start
        error = ["decode failed: SlowDown" if t else "" for t in transient[start:stop]]
        columns = {
            "video_uri": uris[start:stop],
            "etag": etags[start:stop],
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
        }
        pq.write_table(pa.table(columns, schema=OUTPUT_SCHEMA), out / f"part-{p:05d}.parquet", compression="zstd")


def generate(root: Path, objects: int) -> dict:
    """Write the manifest and the output; return the plan they must give."""
    import numpy as np

    rng = np.random.default_rng(0)
    uris, etags = write_manifest(root, objects, rng)
    in_output = rng.random(objects) < 0.5
    changed = in_output & (rng.random(objects) < 0.02)
    transient = in_output & ~changed & (rng.random(objects) < 0.01)
    out_uris = list(uris[in_output])
    out_etags = [("old-" + e) if c else e for e, c in zip(etags[in_output], changed[in_output])]
    gone = int(0.1 * len(out_uris))
    out_uris += [f"s3://bucket/deleted/{i:09d}.mp4" for i in range(gone)]
    out_etags += ["x"] * gone
    write_parts(root / "out", out_uris, out_etags, list(transient[in_output]) + [False] * gone)
    done = int((in_output & ~changed).sum())
    return {
        "listed": objects,
        "already_done": done,
        "to_caption": objects - done,
        "to_retry": 0,
        "output_rows": len(out_uris),
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


def generate_in_child(objects: int) -> tuple[Path, dict, float]:
    """(root, the plan it must give, seconds): generated by a child process, so that its memory does
    not count in this process's peak."""
    root = Path(tempfile.mkdtemp(prefix="flashcap-plan-"))
    started = time.time()
    gen = subprocess.run(
        [sys.executable, __file__, "--objects", str(objects), "--root", str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    return root, json.loads(gen.stdout.strip().splitlines()[-1]), time.time() - started


def plan_both_ways(root: Path) -> dict:
    """The dry-run plan of the generated data, without and with --retry-errors, timed."""
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
    return results


def is_exact(results: dict, want: dict) -> bool:
    """Whether both plans came out exactly as the generator counts."""
    plain, retried = results["plain"], results["retry_errors"]
    counts = ("listed", "already_done", "to_caption", "to_retry")
    retry_counts = (retried["already_done"], retried["to_retry"])
    return {k: plain[k] for k in counts} == {k: want[k] for k in counts} and retry_counts == (
        want["retry_errors"]["already_done"],
        want["retry_errors"]["to_retry"],
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=2_000_000)
    p.add_argument("--root", help="(internal) generate the data here and print what the plan must be")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.root:
        print(json.dumps(generate(Path(args.root), args.objects)))
        return
    root, want, generated_s = generate_in_child(args.objects)
    results = plan_both_ways(root)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "date": datetime.now(UTC).date().isoformat(),
        "objects": args.objects,
        "output_rows": want["output_rows"],
        "generated_s": generated_s,
        "plans": results,
        "expected": want,
        "exact": is_exact(results, want),
        "driver_peak_rss_mb": peak_mb,
        "writer": writer_keys(results["plain"]["to_caption"]),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
