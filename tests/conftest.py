"""Shared fixtures: tiny checkpoints built from configs (offline), an S3 server (moto's server
mode) on 127.0.0.1 and a local Ray bound to loopback, all started here, once per session."""

from __future__ import annotations

import functools
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from demo.tiny_models import (  # noqa: E402
    build_internvl,
    build_llava_onevision,
    build_qwen2_5_vl,
    build_qwen3_5,
    build_qwen3_5_moe,
    build_qwen3_vl,
    build_qwen3_vl_moe,
)
from pipeline.faults import ENV as FAULTS_ENV  # noqa: E402

BUILDERS = {
    "qwen2_5_vl": build_qwen2_5_vl,
    "llava_onevision": build_llava_onevision,
    "qwen3_vl": build_qwen3_vl,
    # A second EOS id, as releases list several: picked so that this random model's greedy outputs end
    # at varied lengths (its <|im_end|> alone almost never comes first).
    "qwen3_5": functools.partial(build_qwen3_5, generation={"eos_token_id": [2, 549]}),
    "qwen3_vl_moe": functools.partial(build_qwen3_vl_moe, generation={"eos_token_id": [2, 15]}),
    "qwen3_5_moe": functools.partial(build_qwen3_5_moe, generation={"eos_token_id": [2, 6]}),
    "internvl": functools.partial(build_internvl, generation={"eos_token_id": [2, 53]}),
}
# Seeds picked so that some greedy outputs end at EOS inside a block and some run to the budget.
SEEDS = {"qwen2_5_vl": 0, "llava_onevision": 2, "qwen3_vl": 0, "qwen3_5": 4, "qwen3_vl_moe": 0, "qwen3_5_moe": 0}
SEEDS["internvl"] = 0


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Directories holding a tiny checkpoint of each supported family."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: str(build(root / name, seed=SEEDS[name])) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def targets64(tiny_checkpoints):
    """Every tiny target loaded through flash.load_target in float64 (the lossless contract's setting)."""
    import flash

    return {name: flash.load_target(path, dtype=torch.float64) for name, path in tiny_checkpoints.items()}


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
def ray_local(s3_server, tmp_path_factory):
    """A local Ray on this 2-core machine; started after the S3 env so workers see it."""
    import ray

    # Workers inherit this variable; the reliability tests write fault rules into the file it names.
    os.environ[FAULTS_ENV] = str(tmp_path_factory.mktemp("faults") / "rules.json")
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
