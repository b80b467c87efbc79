"""Pipeline efficiency: the Ray Data job's steady-state throughput against one
caption actor fed pre-decoded frames from memory (its ceiling), same clips,
same model, same batch size, one run.

    python jobs/bench_pipeline.py [--clips N] [--model DIR] [--drafter DIR] [--batch-size B] [--out report.json]

Steady state excludes start-up (Ray, actor model load): clips after the first
batch over the time from the first to the last batch, on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--model", default=str(ROOT / "models" / "demo-target"))
    p.add_argument("--drafter", default=str(ROOT / "models" / "demo-drafter"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--cpus-per-decode", type=float, default=0.5)
    p.add_argument("--out", default="pipeline_report.json")
    args = p.parse_args(argv)

    import ray

    from actors.caption import CaptionActor
    from jobs.demo_world import SAMPLED_FRAMES, write_videos
    from pipeline.config import load_config
    from pipeline.decode import decode_video
    from pipeline.run import run_job

    work = Path(tempfile.mkdtemp(prefix="flashcap-pipebench-"))
    videos = work / "videos"
    write_videos(videos, args.clips, seed=700)
    config = load_config(
        input=str(videos),
        output=str(work / "captions"),
        model=args.model,
        drafter=args.drafter if Path(args.drafter).is_dir() else None,
        batch_size=args.batch_size,
        cpus_per_actor=args.cpus_per_actor,
        cpus_per_decode=args.cpus_per_decode,
        report=False,
    )

    # Ceiling: one actor, frames already decoded in memory.
    actor = CaptionActor(config.model_dump())
    rows = []
    for clip in sorted(videos.glob("*.mp4")):
        frames, info = decode_video(clip.read_bytes(), SAMPLED_FRAMES)
        rows.append(
            {
                "video_total_frames": info.total_frames,
                "video_fps": info.fps,
                "frame_indices": list(info.indices),
                "video_uri": str(clip),
                "etag": "",
                "size": 0,
                "frames": frames.tobytes(),
                "frames_shape": list(frames.shape),
                "error": "",
                "decode_s": 0.0,
            }
        )
    import pyarrow as pa

    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    actor(pa.Table.from_pylist(batches[0]))  # warm-up
    started = time.perf_counter()
    tokens = 0
    for b in batches[1:]:
        tokens += sum(actor(pa.Table.from_pylist(b)).column("num_tokens").to_pylist())
    memory_s = time.perf_counter() - started
    memory_clips = sum(len(b) for b in batches[1:])
    del actor

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    report = run_job(config, log=lambda line: None)
    ray.shutdown()

    result = {
        "clips": args.clips,
        "batch_size": args.batch_size,
        "memory_clips_per_s": memory_clips / memory_s,
        "memory_tokens_per_s": tokens / memory_s,
        "pipeline_clips_per_s": report["steady_clips_per_s"],
        "pipeline_tokens_per_s": report["steady_tokens_per_s"],
        "pipeline_wall_clips_per_s": report["clips_per_s"],
        "errors": report["errors"],
        "mean_acceptance_length": report["mean_acceptance_length"],
    }
    result["pipeline_share_of_memory"] = result["pipeline_clips_per_s"] / result["memory_clips_per_s"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
