"""Secrets and the output prefix: credentials never reach logs, reports or Parquet;
no name can make the output leave its prefix; user:password in a URL is redacted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import redact
from pipeline.run import run_job
from pipeline.storage import OutputStore, S3Settings
from tests.pipeline.common import config_for, new_bucket, read_output, s3_client, upload_clips
from tests.pipeline.faultproxy import FaultProxy


def test_credentials_never_reach_logs_reports_or_parquet(s3_server, ray_local, pipeline_models):
    """The AWS keys, and a password in the endpoint URL (user:password@), which botocore quotes in its
    connection errors: the error rows still say what failed, with the URL redacted."""
    password = "pa55-W0RD-in-the-endpoint"
    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], password]
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(900, 903))
    s3 = s3_client(s3_server)
    s3.put_object(Bucket=bucket, Key="clips/broken.mp4", Body=b"not a video")
    s3.put_object(Bucket=bucket, Key="clips/denied.mp4", Body=b"x")
    s3.put_object(Bucket=bucket, Key="clips/dropped.mp4", Body=b"x")
    proxy = FaultProxy(s3_server)
    proxy.add("403", op="get", match="denied.mp4", times=-1)  # a storage error row, with boto's message
    proxy.add("reset", op="get", match="dropped.mp4", times=-1)  # botocore quotes the endpoint URL
    endpoint = proxy.url.replace("http://", f"http://admin:{password}@")
    lines: list[str] = []
    try:
        run_job(config_for(endpoint, bucket, pipeline_models, s3_max_attempts=2), log=lines.append)
    finally:
        proxy.close()

    objects = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="captions/")["Contents"]]
    assert any(k.endswith(".parquet") for k in objects) and any("_report-" in k for k in objects)
    rows, _ = read_output(s3_server, bucket)
    (dropped,) = [r for r in rows if r["video_uri"].endswith("dropped.mp4")]
    assert dropped["error"].startswith("decode failed: StorageError: cannot read s3://"), dropped["error"]
    assert 'endpoint URL: "http://***@127.0.0.1:' in dropped["error"], dropped["error"]
    blobs = {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in objects}
    blobs["driver log"] = "\n".join(lines).encode()
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            blobs[str(path)] = path.read_bytes()
    assert len(blobs) > 10
    for secret in secrets:
        leaks = [name for name, data in blobs.items() if secret.encode() in data]
        assert not leaks, f"{secret!r} found in {leaks}"


@pytest.mark.parametrize("name", ["../escape.parquet", "a/b.parquet", ".hidden", "", "a\\b", "x\x00y"])
def test_output_names_cannot_leave_the_prefix(tmp_path, name):
    store = OutputStore(str(tmp_path / "out"), S3Settings())
    with pytest.raises(ValueError, match="would leave the output prefix"):
        store.write_bytes(name, b"x")
    assert not (tmp_path / "escape.parquet").exists()


PRESIGNED = (
    "https://b.s3.amazonaws.com/clips/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20250101"
    "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE&X-Amz-Signature=0123abcd"
)
PRESIGNED_REDACTED = (
    "https://b.s3.amazonaws.com/clips/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
    "&X-Amz-Date=20250101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=***&X-Amz-Signature=***"
)


@pytest.mark.parametrize(
    "text, redacted",
    [
        ("https://alice:s3cr3t@minio.example.com:9000/bucket", "https://***@minio.example.com:9000/bucket"),
        ("http://admin:p@ss@10.0.0.1:9000", "http://***@10.0.0.1:9000"),  # an "@" in the password
        ("http://token@host/x?a=1", "http://***@host/x?a=1"),
        (
            'Could not connect to the endpoint URL: "http://admin:PASSWORD@127.0.0.1:9/b?list-type=2&prefix=out%2F"',
            'Could not connect to the endpoint URL: "http://***@127.0.0.1:9/b?list-type=2&prefix=out%2F"',
        ),
        (PRESIGNED, PRESIGNED_REDACTED),
        (
            "https://b.s3.amazonaws.com/k.mp4?AWSAccessKeyId=AKIAEXAMPLE&Expires=1700000000&Signature=abc%2Bdef",
            "https://b.s3.amazonaws.com/k.mp4?AWSAccessKeyId=***&Expires=1700000000&Signature=***",
        ),
        ("https://h/v.mp4?sv=2022-11-02&sig=AbC%3D&se=2025", "https://h/v.mp4?sv=2022-11-02&sig=***&se=2025"),
        ("https://h/x?token=t0k&password=pw&page=2", "https://h/x?token=***&password=***&page=2"),
        (
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIA/20250101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host, Signature=0123",
            "Authorization: AWS4-HMAC-SHA256 Credential=***, SignedHeaders=host, Signature=***",
        ),
        ("https://minio.example.com", "https://minio.example.com"),
        ("s3://bucket/prefix/", "s3://bucket/prefix/"),
        ("s3://bucket/clips/a@b.mp4", "s3://bucket/clips/a@b.mp4"),  # an "@" in a key is no user
        ("/data/clips/user@host/a=1.mp4", "/data/clips/user@host/a=1.mp4"),
        ("max_new_tokens=512 num_tokens=3", "max_new_tokens=512 num_tokens=3"),
        ("decode failed: 0 bytes", "decode failed: 0 bytes"),
    ],
)
def test_redact(text, redacted):
    assert redact(text) == redacted


def test_redact_reaches_into_reports_and_leaves_other_values():
    report = {"round_errors": ["x http://u:pw@h/ y"], "parts": ("s3://b/p.parquet",), "rows": 3, "drafter": None}
    assert redact(report) == {
        "round_errors": ["x http://***@h/ y"],
        "parts": ("s3://b/p.parquet",),
        "rows": 3,
        "drafter": None,
    }


def test_storage_errors_say_what_failed_without_the_password():
    from botocore.exceptions import EndpointConnectionError

    from pipeline.storage import _explain

    err = _explain(
        EndpointConnectionError(endpoint_url="http://admin:PASSWORD@127.0.0.1:9/b?list-type=2"), "list s3://b/"
    )
    assert str(err) == (
        "cannot list s3://b/: EndpointConnectionError: "
        'Could not connect to the endpoint URL: "http://***@127.0.0.1:9/b?list-type=2"'
    )
    assert err.transient
