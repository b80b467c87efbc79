"""`ray job submit` against a local `ray start --head` runs the captioning job to success."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.demo_world import PROMPT, write_videos
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_head(tmp_path):
    gcs, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"rayjob-{os.getpid()}"  # short: unix socket paths have a length limit
    env = dict(os.environ, RAY_AUTH_MODE="token")
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--num-cpus",
            "2",
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_the_job(ray_head, tmp_path, pipeline_models):
    address, env = ray_head
    videos, output = tmp_path / "videos", tmp_path / "captions"
    write_videos(videos, 3, seed=300)
    entry = [
        sys.executable,
        "jobs/caption_videos.py",
        "--input",
        str(videos),
        "--output",
        str(output),
        "--model",
        pipeline_models["model"],
        "--drafter",
        pipeline_models["drafter"],
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
        "--cpus-per-actor",
        "0.5",
        "--cpus-per-decode",
        "0.25",
    ]
    result = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--", *entry],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    table = pq.read_table(str(output))
    assert table.num_rows == 3 and all(e == "" for e in table.column("error").to_pylist())
