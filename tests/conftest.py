"""Shared fixtures: tiny checkpoints built from configs, offline, once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from flash.build import build_llava_onevision, build_qwen2_5_vl  # noqa: E402

BUILDERS = {"qwen2_5_vl": build_qwen2_5_vl, "llava_onevision": build_llava_onevision}
# Seeds picked so that some greedy outputs end at EOS inside a block and some run to the budget.
SEEDS = {"qwen2_5_vl": 0, "llava_onevision": 2}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Directories holding a tiny Qwen2.5-VL and a tiny LLaVA-OneVision checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: str(build(root / name, seed=SEEDS[name])) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def targets64(tiny_checkpoints):
    """Both tiny targets loaded through flash.load_target in float64 (the lossless contract's setting)."""
    import flash

    return {name: flash.load_target(path, dtype=torch.float64) for name, path in tiny_checkpoints.items()}
