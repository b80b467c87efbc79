"""Suffix decoding through the whole Ray Data job, as a user runs it: unseen demo clips captioned
in batches of `--batch-size` with `--no-drafter`, `--drafter suffix` (the actor's store starts
empty and learns every caption it writes), the FLASH drafter, and the FLASH drafter with
`--suffix`; per method the rows' mean acceptance length, which proposer drafted the accepted
tokens, and whether every caption equals `--no-drafter`'s.

    python -m bench.suffix_job [--clips 64] [--batch-size 8] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_DRAFTER = str(ROOT / "models" / "demo-drafter")
METHODS = {
    "plain": {"drafter": None},
    "suffix": {"drafter": "suffix"},
    "flash": {"drafter": DEMO_DRAFTER},
    "flash_suffix": {"drafter": DEMO_DRAFTER, "suffix": True},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=700_000, help="first scene seed (held out: < 1,000,000)")
    p.add_argument("--out", default="suffix_job.json")
    args = p.parse_args(argv)

    import pyarrow.parquet as pq
    import ray

    from demo.world import PROMPT, write_videos
    from pipeline.config import load_config
    from pipeline.run import run_job

    work = Path(tempfile.mkdtemp(prefix="flashcap-suffix-job-"))
    write_videos(work / "clips", args.clips, seed=args.seed)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    results, captions = {}, {}
    for method, extra in METHODS.items():
        config = load_config(
            input=str(work / "clips"),
            output=str(work / method),
            model=str(ROOT / "models" / "demo-target"),
            drafter=extra["drafter"],
            suffix=extra.get("suffix", False),
            prompt=PROMPT,
            max_new_tokens=64,
            batch_size=args.batch_size,
            cpus_per_actor=1.0,
            cpus_per_decode=0.5,
            report=False,
        )
        report = run_job(config, log=lambda line: None)
        rows = [r for r in pq.read_table(work / method).to_pylist() if not r["error"]]
        captions[method] = {r["video_uri"]: r["caption"] for r in rows}
        results[method] = {
            "rows": len(rows),
            "mean_acceptance_length": statistics.fmean(r["acceptance_length"] for r in rows),
            "accepted_tokens": report["accepted_tokens"],
            "model_clips_per_s": len(rows) / max(report["actor_busy_s"], 1e-9),
        }
        print(method, json.dumps(results[method]), flush=True)
    for method in METHODS:
        results[method]["identical_to_plain"] = captions[method] == captions["plain"]
    ray.shutdown()
    out = {"date": str(date.today()), "clips": args.clips, "batch_size": args.batch_size, "methods": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
