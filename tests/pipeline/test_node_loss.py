"""Node loss: a worker node holding a caption actor is killed mid-job (several
raylets on this machine); the job finishes and every input is in the output
exactly once, captioned as a healthy cluster would caption it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from demo.world import write_videos

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("node_loss_job.py")


def test_killing_a_worker_node_mid_job_loses_and_duplicates_nothing(pipeline_models, tmp_path):
    videos, output = tmp_path / "videos", tmp_path / "captions"
    records = write_videos(videos, 48, seed=1000)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"stage": "caption", "match": "clip_", "delay_s": 0.3}]))
    args = [str(videos), str(output), pipeline_models["model"], pipeline_models["drafter"], str(faults)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
    assert "report" in out, out.get("error")
    report, killed = out["report"], out["killed"]
    assert killed, "no node was killed: " + result.stderr[-3000:]
    print(f"\nnode loss: killed {killed}, rounds {report['rounds']}, rows {report['rows_written']}/48")

    table = pq.read_table(str(output))
    uris = table.column("video_uri").to_pylist()
    assert sorted(uris) == sorted(str((videos / r["file"]).resolve()) for r in records)  # exactly once
    assert all(e == "" for e in table.column("error").to_pylist())
    assert report["missing"] == 0 and report["rows_written"] == 48
    # The killed node captioned before it died, and the job finished on others.
    nodes = [n.split("@")[0] for n in table.column("worker_node").to_pylist()]
    assert killed["node"] in nodes and len(set(nodes) - {killed["node"]}) >= 1
    assert killed["rows_before"] < 48
    # The videos in flight on the lost node are not charged as crashes (the node died, not the video).
    assert report["videos_in_flight_at_a_crash"] == 0 and report["videos_lost_with_a_node"] >= 1, report
