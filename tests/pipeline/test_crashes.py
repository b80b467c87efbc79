"""Worker processes that die: restarted, their in-flight rows retried and never
duplicated; a video that kills its worker every time ends as an error row after
max_worker_crashes deaths instead of stalling the job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.faults import ENV
from pipeline.run import run_job
from tests.pipeline.common import config_for, direct_caption, new_bucket, read_output, s3_client, upload_clips


@pytest.fixture
def faults(ray_local):
    """Write fault rules into the file the Ray workers watch; removed afterwards."""
    path = Path(os.environ[ENV])

    def arm(rules: list[dict]) -> None:
        path.write_text(json.dumps(rules))

    yield arm
    path.unlink(missing_ok=True)


def test_crashed_workers_lose_nothing_and_poison_pills_become_error_rows(s3_server, ray_local, pipeline_models, faults):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(700, 710))
    s3 = s3_client(s3_server)
    good = s3.get_object(Bucket=bucket, Key="clips/clip_000700.mp4")["Body"].read()
    s3.put_object(Bucket=bucket, Key="clips/poison_caption.mp4", Body=good)
    s3.put_object(Bucket=bucket, Key="clips/poison_decode.mp4", Body=good)
    faults(
        [
            {"stage": "caption", "match": "clip_000701", "times": 1},  # dies once, then fine
            {"stage": "caption", "match": "clip_000706", "times": 2},  # dies twice, then fine
            {"stage": "decode", "match": "clip_000703", "times": 1},
            {"stage": "caption", "match": "poison_caption", "times": -1},  # kills its actor every time
            {"stage": "decode", "match": "poison_decode", "times": -1},  # kills its decode task every time
        ]
    )
    report = run_job(config_for(s3_server, bucket, pipeline_models))

    rows, _ = read_output(s3_server, bucket)
    by_name = {r["video_uri"].rsplit("/", 1)[1]: r for r in rows}
    assert len(rows) == len(by_name) == 12 and report["rows_written"] == 12 and report["missing"] == 0
    for s in range(700, 710):
        r = by_name[f"clip_{s:06d}.mp4"]
        assert r["error"] == "" and r["caption"], r
    # Rows retried after a crash carry the caption the target gives those frames (float64).
    for name in ("clip_000701.mp4", "clip_000703.mp4", "clip_000706.mp4"):
        data = s3.get_object(Bucket=bucket, Key=f"clips/{name}")["Body"].read()
        assert by_name[name]["caption"] == direct_caption(pipeline_models["target"], data)
    assert by_name["poison_caption.mp4"]["caption"] == ""
    assert by_name["poison_caption.mp4"]["error"].startswith("caption failed: the worker process died 3 times")
    assert by_name["poison_decode.mp4"]["error"].startswith("decode failed: the worker process died 3 times")
    assert report["worker_crashes"]["caption"] >= 3 + 1 + 2 and report["worker_crashes"]["decode"] >= 3 + 1
    assert report["duplicates_dropped"] == 0
