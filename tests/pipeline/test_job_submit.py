"""`ray job submit` against a local `ray start --head` runs the captioning job to success."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from demo.world import PROMPT, write_videos
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` as a child process: stopping it stops this head only (`ray stop`
    would kill every Ray on the machine, the test session's own included)."""
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    temp = Path("/tmp") / f"rayjob-{os.getpid()}"  # short: unix socket paths have a length limit
    env = dict(os.environ, RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--dashboard-agent-listen-port",
            str(agent),
            "--num-cpus",
            "2",
            "--temp-dir",
            str(temp),
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _submit(command: list[str], env: dict, deadline_s: float = 240) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head is still starting (no dashboard yet, or its job agent
    not registered: Ray answers "No available agent to submit job, please try again later")."""
    started = time.time()
    while True:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        starting = any(
            s in result.stdout + result.stderr
            for s in ("No available agent", "Connection refused", "Failed to connect", "ConnectionError")
        )
        if result.returncode == 0 or not starting or time.time() - started > deadline_s:
            return result
        time.sleep(3)


@pytest.mark.slow
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
    result = _submit([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--", *entry], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    table = pq.read_table(str(output))
    assert table.num_rows == 3 and all(e == "" for e in table.column("error").to_pylist())
