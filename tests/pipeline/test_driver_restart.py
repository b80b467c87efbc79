"""The driver killed mid-job (SIGKILL, as a preempted head node would): rerunning the
same command completes the output with no duplicate and no missing row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from demo.world import PROMPT, write_videos
from pipeline.faults import ENV

ROOT = Path(__file__).resolve().parents[2]


def _parts(output: Path) -> list[Path]:
    return sorted(output.glob("*.parquet"))


@pytest.mark.slow
def test_rerun_after_driver_kill_completes_exactly_once(ray_local, pipeline_models, tmp_path):
    videos, output = tmp_path / "videos", tmp_path / "captions"
    records = write_videos(videos, 24, seed=800)  # 3 read blocks of 8: the first part holds 8 rows
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "input": str(videos),
                "output": str(output),
                "model": pipeline_models["model"],
                "drafter": pipeline_models["drafter"],
                "prompt": PROMPT,
                "max_new_tokens": 8,
                "batch_size": 2,
                "flush_rows": 2,
                "cpus_per_actor": 0.5,
                "cpus_per_decode": 0.25,
            }
        )
    )
    # Slow caption batches down so that the kill lands mid-job.
    Path(os.environ[ENV]).write_text(json.dumps([{"stage": "caption", "match": "clip_", "delay_s": 0.7}]))
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    command = [sys.executable, "jobs/caption_videos.py", "--config", str(config)]
    try:
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not _parts(output) and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        Path(os.environ[ENV]).unlink(missing_ok=True)
    before = pq.read_table(str(output)).num_rows
    assert 0 < before < 24

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{before} already captioned, {24 - before} to caption" in second.stdout

    table = pq.read_table(str(output))
    uris = table.column("video_uri").to_pylist()
    assert sorted(uris) == sorted(str((videos / r["file"]).resolve()) for r in records)  # each exactly once
    assert all(e == "" for e in table.column("error").to_pylist())
