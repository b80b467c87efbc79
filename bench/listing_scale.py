"""Listing at scale: the driver's memory while `--dry-run` plans a flat input of N objects, here a
local folder of N empty files. A flat s3:// prefix takes the same path through
`inputs.list_input`; a moto server holds and lists a million keys too slowly to measure here.

    python -m bench.listing_scale [--objects 1000000] [--folder F] [--label L] [--out F]

The files are created first (or reused from --folder if it holds exactly N). Then the driver starts
Ray and plans the folder against an empty output, as `--dry-run` does, while a thread samples the
driver's RSS every 0.1 s. Reported: the RSS just before planning, its peak while planning, the
process's peak (ru_maxrss), the time, and the plan (which must list every file).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_files(folder: Path, objects: int) -> float:
    """N empty clip_*.mp4 files in one folder (flat); returns the seconds it took."""
    started = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(objects):
        os.close(os.open(folder / f"clip_{i:09d}.mp4", os.O_CREAT | os.O_WRONLY, 0o644))
    return time.time() - started


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak(threading.Thread):
    """The highest RSS of this process seen while running, sampled every `every` seconds."""

    def __init__(self, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self._done = every, rss_mb(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, rss_mb())


def plan_folder(folder: Path) -> dict:
    """Start Ray, then plan `folder` against an empty output as a dry run, sampling the RSS."""
    import ray

    from pipeline.config import load_config
    from pipeline.plan import make_plan
    from pipeline.storage import S3Settings

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = Path(tempfile.mkdtemp(prefix="flashcap-listing-out-"))
    config = load_config(input=str(folder), output=str(out), model=str(ROOT / "models" / "demo-target"), dry_run=True)
    before = rss_mb()
    sampler = RssPeak()
    sampler.start()
    started = time.time()
    plan = make_plan(config, S3Settings())
    seconds = time.time() - started
    peak = sampler.stop()
    return {
        "plan": plan.summary(),
        "planned_as": "a list on the driver" if isinstance(plan.todo, list) else "a Ray Dataset",
        "seconds": seconds,
        "driver_rss_before_plan_mb": before,
        "driver_peak_rss_in_plan_mb": peak,
        "driver_rss_growth_in_plan_mb": peak - before,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=1_000_000)
    p.add_argument("--folder", help="where the files are (created there if it does not hold exactly --objects)")
    p.add_argument("--label", default="", help="what code this measures (e.g. a commit)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="flashcap-listing-"))
    present = sum(1 for _ in os.scandir(folder)) if folder.is_dir() else 0
    created_s = make_files(folder, args.objects) if present != args.objects else 0.0
    measured = plan_folder(folder)
    report = {
        "date": datetime.now(UTC).date().isoformat(),
        "label": args.label,
        "input": f"a local folder of {args.objects} empty files, flat",
        "objects": args.objects,
        "files_created_s": created_s,
        **measured,
        "exact": measured["plan"]["listed"] == measured["plan"]["to_caption"] == args.objects,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
