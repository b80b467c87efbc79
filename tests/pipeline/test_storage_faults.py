"""Storage faults, injected by a proxy in front of the real S3 server: transient ones
(throttling, resets, stalls, bodies cut mid-stream) are retried on list, read and
write; permanent ones fail fast with a clear message, before any model loads."""

from __future__ import annotations

import pytest

import pipeline.run
from pipeline.inputs import list_videos
from pipeline.run import run_job
from pipeline.storage import OutputStore, S3Settings, StorageError, read_object
from tests.pipeline.common import config_for, new_bucket, read_output, s3_client, upload_clips
from tests.pipeline.faultproxy import FaultProxy


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server, stall_s=3.0)
    yield p
    p.close()


def _settings(proxy, attempts=6):
    return S3Settings(endpoint=proxy.url, max_attempts=attempts, timeout_s=1.0)


def test_transient_faults_on_list_read_and_write_are_retried(s3_server, proxy):
    bucket = new_bucket(s3_server)
    s3 = s3_client(s3_server)
    payload = bytes(range(256)) * 400
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        s3.put_object(Bucket=bucket, Key=f"in/{name}", Body=payload)
    settings = _settings(proxy)

    proxy.add("503", op="list", times=2)
    proxy.add("reset", op="list", times=1)
    listed = list_videos(f"s3://{bucket}/in/", ("*.mp4",), settings)
    assert [o.uri.rsplit("/", 1)[1] for o in listed] == ["a.mp4", "b.mp4", "c.mp4"]

    for fault in ("503", "500", "reset", "stall", "cut"):
        proxy.add(fault, op="get", match="b.mp4", times=1)
    assert read_object(f"s3://{bucket}/in/b.mp4", settings) == payload

    proxy.add("503", op="put", times=1)
    proxy.add("reset", op="put", times=1)
    store = OutputStore(f"s3://{bucket}/out", settings)
    store.write_part([], "part-x.parquet")
    assert store.parts() == [f"s3://{bucket}/out/part-x.parquet"]

    assert proxy.injected == {
        "list:503": 2,
        "list:reset": 1,
        "get:503": 1,
        "get:500": 1,
        "get:reset": 1,
        "get:stall": 1,
        "get:cut": 1,
        "put:503": 1,
        "put:reset": 1,
    }


def test_retries_are_bounded(s3_server, proxy):
    bucket = new_bucket(s3_server)
    s3_client(s3_server).put_object(Bucket=bucket, Key="in/a.mp4", Body=b"x" * 1000)
    proxy.add("503", op="get", times=-1)
    with pytest.raises(StorageError, match=r"cannot read s3://.*/in/a.mp4: SlowDown: Please reduce your request rate"):
        read_object(f"s3://{bucket}/in/a.mp4", _settings(proxy, attempts=3))
    assert proxy.requests["get"] == 3


def test_permanent_errors_are_not_retried(s3_server, proxy):
    bucket = new_bucket(s3_server)
    proxy.add("403", op="list", times=-1)
    with pytest.raises(StorageError, match=r"cannot list s3://.*/in/: AccessDenied: Access Denied"):
        list_videos(f"s3://{bucket}/in/", ("*.mp4",), _settings(proxy))
    assert proxy.requests["list"] == 1
    with pytest.raises(StorageError, match="NoSuchBucket"):
        list_videos("s3://flashcap-no-such-bucket/in/", ("*.mp4",), S3Settings(endpoint=s3_server))


@pytest.mark.slow
def test_job_under_faults_writes_every_row_once(s3_server, ray_local, pipeline_models, proxy):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(600, 608))
    s3_client(s3_server).put_object(Bucket=bucket, Key="clips/throttled.mp4", Body=b"never readable")
    proxy.add("503", op="list", times=2)
    proxy.add("reset", op="list", times=1)
    for i, fault in enumerate(("503", "reset", "stall", "cut", "500", "503")):
        proxy.add(fault, op="get", match=f"clip_{600 + i:06d}", times=1)
    proxy.add("503", op="get", match="throttled.mp4", times=-1)
    proxy.add("503", op="put", match="part-", times=1)
    proxy.add("reset", op="put", match="part-", times=1)
    config = config_for(proxy.url, bucket, pipeline_models, s3_timeout_s=1.0, s3_max_attempts=4)

    report = run_job(config)

    rows, _ = read_output(s3_server, bucket)
    assert report["to_caption"] == report["rows_written"] == len(rows) == 9 and report["missing"] == 0
    assert len({r["video_uri"] for r in rows}) == 9
    by_name = {r["video_uri"].rsplit("/", 1)[1]: r for r in rows}
    assert all(by_name[f"clip_{s:06d}.mp4"]["error"] == "" for s in range(600, 608))
    assert "SlowDown" in by_name["throttled.mp4"]["error"] and "4 attempts" not in by_name["throttled.mp4"]["error"]
    assert sum(proxy.injected.values()) >= 13, proxy.injected
    # Throttling that outlasted the retries is transient; the clips captioned have no kind.
    assert by_name["throttled.mp4"]["error_kind"] == "transient"
    assert {by_name[f"clip_{s:06d}.mp4"]["error_kind"] for s in range(600, 608)} == {""}

    # The store recovers: a rerun plans nothing; with --retry-errors it tries the transient row again,
    # whose new row (the object is not a video: a permanent error) is the current one.
    proxy.clear()
    assert run_job(config)["to_caption"] == 0
    again = run_job(config.model_copy(update={"retry_errors": True}))
    assert again["to_caption"] == again["retried"] == again["rows_written"] == 1
    rows, _ = read_output(s3_server, bucket)
    newest = max((r for r in rows if r["video_uri"].endswith("throttled.mp4")), key=lambda r: r["finished_at"])
    assert newest["error_kind"] == "permanent" and "decode failed" in newest["error"]
    assert run_job(config.model_copy(update={"retry_errors": True}))["to_caption"] == 0


def test_permanent_error_fails_before_any_model_loads(s3_server, ray_local, pipeline_models, proxy, monkeypatch):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(2))
    proxy.add("403", op="list", match="clips", times=-1)

    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset (and so the models) must not be built")

    monkeypatch.setattr(pipeline.run, "_build_dataset", no_dataset)
    with pytest.raises(StorageError, match="AccessDenied"):
        run_job(config_for(proxy.url, bucket, pipeline_models))
