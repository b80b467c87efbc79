"""Caption a video collection with FLASH on Ray Data.

With no arguments this is the embedded default: it starts a local Ray, writes
sample demo videos to ./out/sample_videos, captions them with the bundled demo
target and drafter, and writes Parquet under ./out/captions/.

On a cluster:
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/caption_videos.py \\
        --input s3://bucket/clips/ --output s3://bucket/captions/ --model /models/qwen --drafter /models/drafter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_TARGET = ROOT / "models" / "demo-target"
DEMO_DRAFTER = ROOT / "models" / "demo-drafter"
SAMPLE_VIDEOS = Path("out") / "sample_videos"
SAMPLE_OUTPUT = Path("out") / "captions"
SAMPLE_COUNT = 12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with CaptionConfig fields (flags override it)")
    p.add_argument("--input", help="s3://bucket/prefix/ or a local folder of videos")
    p.add_argument("--output", help="s3://bucket/prefix/ or a local folder for Parquet")
    p.add_argument("--s3-endpoint", help="endpoint URL of an S3-compatible store")
    p.add_argument("--s3-region")
    p.add_argument("--model", help="target checkpoint directory")
    p.add_argument("--drafter", help="FLASH drafter directory")
    p.add_argument("--no-drafter", action="store_true", help="plain decoding (same captions, slower)")
    p.add_argument("--prompt")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--min-actors", type=int)
    p.add_argument("--max-actors", type=int)
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--cpus-per-actor", type=float)
    p.add_argument("--cpus-per-decode", type=float)
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    from pipeline.config import load_config

    overrides = {
        "input": args.input,
        "output": args.output,
        "s3_endpoint": args.s3_endpoint,
        "s3_region": args.s3_region,
        "model": args.model,
        "drafter": args.drafter,
        "prompt": args.prompt,
        "num_frames": args.num_frames,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
        "min_actors": args.min_actors,
        "max_actors": args.max_actors,
        "gpus_per_actor": args.gpus_per_actor,
        "cpus_per_actor": args.cpus_per_actor,
        "cpus_per_decode": args.cpus_per_decode,
    }
    embedded = args.config is None and args.input is None
    if embedded:
        from jobs.demo_world import write_videos

        if not (SAMPLE_VIDEOS / "captions.jsonl").exists():
            print(f"[flashcap] writing {SAMPLE_COUNT} sample demo videos to {SAMPLE_VIDEOS}/")
            write_videos(SAMPLE_VIDEOS, SAMPLE_COUNT, seed=0)
        overrides["input"] = str(SAMPLE_VIDEOS.resolve())
        overrides["output"] = overrides["output"] or str(SAMPLE_OUTPUT.resolve())
        overrides["model"] = overrides["model"] or str(DEMO_TARGET)
        if overrides["drafter"] is None and DEMO_DRAFTER.is_dir():
            overrides["drafter"] = str(DEMO_DRAFTER)
        cpus = os.cpu_count() or 1
        overrides["cpus_per_actor"] = overrides["cpus_per_actor"] or max(1.0, cpus - 1.0)
        overrides["cpus_per_decode"] = overrides["cpus_per_decode"] or 0.5
    if args.no_drafter:
        overrides["drafter"] = None
    config = load_config(args.config, **overrides)
    if args.no_drafter and config.drafter is not None:
        config = config.model_copy(update={"drafter": None})
    return config, embedded


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    try:
        config, _ = build_config(args)
    except ValueError as err:
        print(f"[flashcap] {err}", file=sys.stderr)
        return 2

    import ray

    from pipeline.run import run_job

    if os.environ.get("RAY_ADDRESS"):  # under `ray job submit`, or pointed at a cluster
        ray.init()
    else:  # a local Ray bound to loopback
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    from pipeline.run import JobIncomplete
    from pipeline.storage import StorageError

    try:
        report = run_job(config)
    except StorageError as err:  # permanent storage problems: say what, before any model loads
        print(f"[flashcap] {err}", file=sys.stderr)
        return 3
    except JobIncomplete as err:  # the cluster kept losing work: what was written stays; a rerun finishes
        print(f"[flashcap] {err}", file=sys.stderr)
        return 4
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "clips",
                    "errors",
                    "clips_per_s",
                    "tokens_per_s",
                    "mean_acceptance_length",
                    "rows_written",
                    "missing",
                    "rounds",
                    "worker_crashes",
                    "memory",
                    "parts",
                )
            },
            indent=2,
        )
    )
    print(f"[flashcap] captions in {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
