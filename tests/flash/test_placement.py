"""Targets larger than one GPU: placement plans for released shapes, computed on the meta device, and
the placed model's loading path run on one device (the CPU)."""

from __future__ import annotations

import pytest
import torch

import flash
from demo.release_configs import release_config
from flash.placement import GIB, TargetDoesNotFit, meta_model, placement_units, plan_placement
from tests.helpers import cases, hf_greedy

# What torch reports as a GPU's total memory: an 80 GB H100 / A100, a 48 GB L40S.
GPU_80GB = int(79.2 * GIB)
GPU_48GB = int(44.4 * GIB)
SLOTS, CAPACITY = 32, 4096  # 32 rows of a 64-frame clip at 448 px (Qwen: ~3,300 tokens) and its caption


def _plan(name: str, gpus: int, budget: int, slots: int = SLOTS):
    return plan_placement(
        release_config(name), gpus=gpus, budget_bytes=budget, dtype=torch.bfloat16, slots=slots, capacity=CAPACITY
    )


def _check(placement) -> None:
    """Every device within its budget less the workspace; layers in order, each device one run of them;
    the LM head (with the drafter and the logits) on the last device used."""
    usable = placement.budget * 0.9
    assert all(placement.used(d) <= usable for d in range(placement.gpus))
    assert placement.devices == sorted(placement.devices)
    assert set(placement.devices) == set(range(placement.gpus))
    head = next(u for u in placement.units if u.extra)
    assert head.name.endswith("lm_head") and placement.head_device == placement.gpus - 1


def test_qwen2_5_vl_72b_on_four_80gb_gpus():
    placement = _plan("Qwen2.5-VL-72B-Instruct", 4, GPU_80GB)
    _check(placement)
    weights = sum(u.weights for u in placement.units)
    assert 136 * GIB < weights < 138 * GIB  # 73.4B parameters in bfloat16
    layers = [u for u in placement.units if ".language_model.layers." in u.name]
    assert len(layers) == 80 and all(u.cache == 2 * SLOTS * 8 * CAPACITY * 128 * 2 for u in layers)
    shares = [placement.used(d) for d in range(4)]
    assert max(shares) - min(shares) < 0.1 * max(shares)  # an even split
    assert {d for name, d in placement.device_map.items() if name.startswith("model.visual")} == {0}


def test_qwen2_5_vl_72b_refused_on_two_80gb_gpus_with_the_sizes():
    with pytest.raises(TargetDoesNotFit) as err:
        _plan("Qwen2.5-VL-72B-Instruct", 2, GPU_80GB)
    message = str(err.value)
    assert "136.7 GiB of bfloat16 weights" in message and "2 GPU(s) of 79.2 GiB" in message
    assert "caches for 32 slots x 4096 tokens" in message and "gpus_per_actor" in message


def test_qwen3_vl_30b_a3b_on_one_80gb_gpu_and_on_two_48gb_gpus():
    one = _plan("Qwen3-VL-30B-A3B-Instruct", 1, GPU_80GB)
    _check(one)
    weights = sum(u.weights for u in one.units)
    assert 57 * GIB < weights < 59 * GIB  # 31.1B parameters, all 128 experts of every layer resident
    two = _plan("Qwen3-VL-30B-A3B-Instruct", 2, GPU_48GB)
    _check(two)
    with pytest.raises(TargetDoesNotFit):
        _plan("Qwen3-VL-30B-A3B-Instruct", 1, GPU_48GB)
    with pytest.raises(TargetDoesNotFit):  # one 80 GB GPU holds the weights, not the caches of 64 slots
        _plan("Qwen3-VL-30B-A3B-Instruct", 1, GPU_80GB, slots=64)


@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-72B-Instruct", "Qwen3-VL-30B-A3B-Instruct"])
def test_units_hold_every_weight_once(name):
    model = meta_model(release_config(name), torch.bfloat16)
    units = placement_units(model, SLOTS, CAPACITY)
    assert sum(u.weights for u in units) == sum(p.numel() * 2 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    names = [u.name for u in units]
    assert len(names) == len(set(names)) and not any(a.startswith(b + ".") for a in names for b in names)


def test_linear_attention_layers_cost_their_states_not_a_kv_cache(tiny_checkpoints):
    """Qwen3.5: full-attention layers hold keys and values for the slots' capacity; linear-attention
    layers a fixed state per slot, whatever the capacity."""
    from transformers import AutoConfig

    from flash.placement import layer_cache_bytes

    config = AutoConfig.from_pretrained(tiny_checkpoints["qwen3_5_moe"])
    short, long = (layer_cache_bytes(config, 4, c, torch.float32) for c in (100, 1000))
    kinds = config.get_text_config().layer_types
    for kind, a, b in zip(kinds, short, long):
        assert (a == b) if kind == "linear_attention" else (b == 10 * a)


def test_a_placed_target_decodes_like_the_loaded_one(tiny_checkpoints, targets64):
    """The multi-GPU loading path (a device_map from the plan, Accelerate's dispatch) on one device:
    the same tokens as HF generate, FLASH drafter included."""
    path = tiny_checkpoints["qwen3_vl_moe"]
    plan = plan_placement(
        targets64["qwen3_vl_moe"].config, gpus=1, budget_bytes=GIB, dtype=torch.float64, slots=4, capacity=512
    )
    device_map = {name: "cpu" for name in plan.device_map}
    placed = flash.load_target(path, dtype=torch.float64, device_map=device_map)
    drafter = flash.FlashDrafter.for_target(placed)
    for case in cases("qwen3_vl_moe")[::4]:
        inputs = case.inputs(placed.processor)
        ref = hf_greedy(targets64["qwen3_vl_moe"], inputs, 16)
        assert flash.generate(placed, drafter, inputs, max_new_tokens=16).sequences == [ref], case.name


def test_the_job_refuses_a_target_too_big_for_its_gpus_before_any_video(tiny_checkpoints, tmp_path):
    from demo.world import write_videos
    from pipeline.config import load_config
    from pipeline.run import run_job

    write_videos(tmp_path / "clips", 1, seed=3)
    config = load_config(
        input=str(tmp_path / "clips"),
        output=str(tmp_path / "captions"),
        model=tiny_checkpoints["qwen2_5_vl"],
        gpus_per_actor=2,
        gpu_memory_gib=0.001,
        report=False,
    )
    with pytest.raises(TargetDoesNotFit, match=r"does not fit 2 GPU\(s\) of 0\.0 GiB"):
        run_job(config, log=lambda line: None)
    assert not (tmp_path / "captions").exists()
