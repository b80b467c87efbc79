"""Secrets and the output prefix: credentials never reach logs, reports or Parquet;
no name can make the output leave its prefix; user:password in a URL is redacted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import redact
from pipeline.run import run_job
from pipeline.storage import OutputStore, S3Settings
from tests.pipeline.common import config_for, new_bucket, s3_client, upload_clips
from tests.pipeline.faultproxy import FaultProxy


def test_credentials_never_reach_logs_reports_or_parquet(s3_server, ray_local, pipeline_models):
    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(900, 903))
    s3 = s3_client(s3_server)
    s3.put_object(Bucket=bucket, Key="clips/broken.mp4", Body=b"not a video")
    s3.put_object(Bucket=bucket, Key="clips/denied.mp4", Body=b"x")
    proxy = FaultProxy(s3_server)
    proxy.add("403", op="get", match="denied.mp4", times=-1)  # a storage error row, with boto's message
    lines: list[str] = []
    try:
        run_job(config_for(proxy.url, bucket, pipeline_models), log=lines.append)
    finally:
        proxy.close()

    objects = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="captions/")["Contents"]]
    assert any(k.endswith(".parquet") for k in objects) and any("_report-" in k for k in objects)
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


def test_user_and_password_in_urls_are_redacted():
    assert redact("https://alice:s3cr3t@minio.example.com:9000/bucket") == "https://***@minio.example.com:9000/bucket"
    assert redact("https://minio.example.com") == "https://minio.example.com"
    assert redact("s3://bucket/prefix/") == "s3://bucket/prefix/"
