"""End to end on real parts: demo videos in an S3 bucket (moto server on
127.0.0.1) -> Ray Data on a local Ray -> caption actors -> Parquet in the bucket."""

from __future__ import annotations

import pytest
import torch

from demo.world import encode_mp4, render, scene_for_seed
from pipeline.run import run_job
from pipeline.storage import StorageError
from tests.pipeline.common import config_for, direct_caption, new_bucket, read_output, s3_client, upload_clips


def test_bucket_to_parquet_end_to_end(s3_server, ray_local, pipeline_models):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(20))
    report = run_job(config_for(s3_server, bucket, pipeline_models))
    rows, keys = read_output(s3_server, bucket)
    assert report["rows_written"] == 20 and len(rows) == 20
    assert len({r["video_uri"] for r in rows}) == 20 and not any(r["error"] for r in rows)
    assert any(k.startswith("captions/_report-") for k in keys) and any(k.endswith(".png") for k in keys)

    # Captions equal calling flash.generate directly on the same frames (float64).
    target = pipeline_models["target"]
    s3 = s3_client(s3_server)
    for r in rows[:8]:
        data = s3.get_object(Bucket=bucket, Key=r["video_uri"].split("/", 3)[3])["Body"].read()
        assert r["caption"] == direct_caption(target, data), r["video_uri"]
        assert r["num_tokens"] > 0 and r["acceptance_length"] >= 1.0 and r["drafter"]

    # The same job without a drafter gives the same captions.
    run_job(config_for(s3_server, bucket, pipeline_models, output="plain/", use_drafter=False))
    plain, _ = read_output(s3_server, bucket, "plain/")
    assert {r["video_uri"]: r["caption"] for r in plain} == {r["video_uri"]: r["caption"] for r in rows}
    assert all(r["drafter"] == "" for r in plain)

    # Suffix decoding (no drafter model) gives them too.
    run_job(config_for(s3_server, bucket, pipeline_models, output="suffix/", drafter="suffix"))
    suffix, _ = read_output(s3_server, bucket, "suffix/")
    assert {r["video_uri"]: r["caption"] for r in suffix} == {r["video_uri"]: r["caption"] for r in rows}
    assert all(r["drafter"] == "suffix" and r["acceptance_length"] >= 1.0 for r in suffix)


def test_bad_objects_become_error_rows(s3_server, ray_local, pipeline_models):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(100, 104))
    s3 = s3_client(s3_server)
    good = encode_mp4(render(scene_for_seed(7)))
    s3.put_object(Bucket=bucket, Key="clips/empty.mp4", Body=b"")
    s3.put_object(Bucket=bucket, Key="clips/random.mp4", Body=bytes(range(256)) * 40)
    s3.put_object(Bucket=bucket, Key="clips/truncated.mp4", Body=good[: len(good) // 3])
    s3.put_object(Bucket=bucket, Key="clips/notes.mp4", Body=b"this is a text file, not a video\n")
    s3.put_object(Bucket=bucket, Key="clips/readme.txt", Body=b"not listed: not a video name")
    run_job(config_for(s3_server, bucket, pipeline_models))
    rows, _ = read_output(s3_server, bucket)
    by_name = {r["video_uri"].rsplit("/", 1)[-1]: r for r in rows}
    assert len(rows) == 8 and "readme.txt" not in by_name
    for bad in ("empty.mp4", "random.mp4", "truncated.mp4", "notes.mp4"):
        assert by_name[bad]["error"].startswith("decode failed:"), by_name[bad]
        assert by_name[bad]["caption"] == ""
    assert "0 bytes" in by_name["empty.mp4"]["error"]
    for s in range(100, 104):
        r = by_name[f"clip_{s:06d}.mp4"]
        assert r["error"] == "" and r["caption"]


@pytest.mark.slow
def test_rerun_adds_only_new_objects(s3_server, ray_local, pipeline_models):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(200, 206))
    config = config_for(s3_server, bucket, pipeline_models)
    assert run_job(config)["rows_written"] == 6
    again = run_job(config)
    assert again["rows_written"] == 0 and again["already_done"] == 6
    upload_clips(s3_server, bucket, range(206, 209))
    third = run_job(config)
    assert third["rows_written"] == 3
    rows, _ = read_output(s3_server, bucket)
    assert len(rows) == 9 and len({r["video_uri"] for r in rows}) == 9
    new = {
        r["video_uri"].rsplit("/", 1)[-1] for r in rows if r["video_uri"].endswith(("206.mp4", "207.mp4", "208.mp4"))
    }
    assert new == {"clip_000206.mp4", "clip_000207.mp4", "clip_000208.mp4"}


def test_missing_bucket_fails_before_any_model_loads(s3_server, ray_local, pipeline_models):
    config = config_for(s3_server, "no-such-bucket-flashcap", pipeline_models)
    with pytest.raises(StorageError, match="cannot list the output s3://no-such-bucket-flashcap/captions: NoSuch"):
        run_job(config)


@pytest.fixture(autouse=True)
def _no_torch_threads_fight():
    torch.set_num_threads(1)
    yield
