"""Soak: 500 generated clips through the whole pipeline on this machine, every one
written once, with the caption actors' and the driver's memory measured at the
start and the end of the run (no growth beyond a stated bound)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from demo.world import PROMPT, write_videos
from pipeline.config import load_config
from pipeline.run import run_job

pytestmark = pytest.mark.slow
CLIPS = 500
GROWTH_BOUND_MB = 64  # private memory (RssAnon) per caption actor, first vs last quarter of batches; and the driver


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def test_500_clips_exactly_once_with_bounded_memory(ray_local, pipeline_models, tmp_path):
    videos, output = tmp_path / "videos", tmp_path / "captions"
    records = write_videos(videos, CLIPS, seed=2000)
    config = load_config(
        input=str(videos),
        output=str(output),
        model=pipeline_models["model"],
        drafter=pipeline_models["drafter"],
        prompt=PROMPT,
        max_new_tokens=12,
        batch_size=4,
        flush_rows=64,
        cpus_per_actor=0.5,
        cpus_per_decode=0.25,
    )
    warm_up = tmp_path / "warm-up"  # first use imports Ray Data's driver side, matplotlib, ...: not growth
    write_videos(warm_up, 4, seed=3000)
    run_job(config.model_copy(update={"input": str(warm_up), "output": str(tmp_path / "warm-up-out")}))
    driver_before = _rss_mb()
    report = run_job(config)
    driver_after = _rss_mb()

    table = pq.read_table(str(output))
    uris = table.column("video_uri").to_pylist()
    assert sorted(uris) == sorted(str((videos / r["file"]).resolve()) for r in records)
    assert report["rows_written"] == CLIPS and report["missing"] == 0 and report["errors"] == 0
    memory = report["memory"]
    print(f"\nsoak: {CLIPS} clips, memory {memory}, driver {driver_before:.0f} -> {driver_after:.0f} MB")
    assert memory["actor_rss_mb_start"] > 0
    assert memory["actor_rss_growth_mb"] < GROWTH_BOUND_MB, memory
    assert driver_after - driver_before < GROWTH_BOUND_MB
