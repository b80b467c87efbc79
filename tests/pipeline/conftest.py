"""Real parts for pipeline tests: an S3 server (moto's server mode) on 127.0.0.1
and a local Ray cluster bound to loopback, both started here."""

from __future__ import annotations

import os
import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3-protocol endpoint URL; credentials are set in the environment (workers inherit them)."""
    from moto.server import ThreadedMotoServer

    os.environ.update(
        AWS_ACCESS_KEY_ID="flashcap-test", AWS_SECRET_ACCESS_KEY="flashcap-test-secret", AWS_DEFAULT_REGION="us-east-1"
    )
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray on this 2-core machine; started after the S3 env so workers see it."""
    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def pipeline_models(tiny_checkpoints, tmp_path_factory):
    """The tiny Qwen2.5-VL target and an untrained drafter saved for it."""
    import flash

    target = flash.load_target(tiny_checkpoints["qwen2_5_vl"], dtype=torch.float64)
    drafter_dir = tmp_path_factory.mktemp("drafter")
    flash.FlashDrafter.for_target(target).save_pretrained(drafter_dir)
    return {"model": tiny_checkpoints["qwen2_5_vl"], "drafter": str(drafter_dir), "target": target}
