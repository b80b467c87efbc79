"""The drafter: configuration, latent sizing, save/load, and its own KV cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import flash
from flash.drafter import CONFIG_NAME, WEIGHTS_NAME
from flash.sampling import SamplingParams
from tests.helpers import chat

GREEDY = SamplingParams()


def _prefill(target, frames=4):
    video = np.random.RandomState(3).randint(0, 256, (frames, 56, 56, 3), dtype=np.uint8)
    inputs = target.processor(
        text=[chat("qwen2_5_vl", "describe the video in detail", "video")], videos=[video], return_tensors="pt"
    )
    return target.prefill(inputs)


def test_latent_count_follows_compression_and_cap():
    config = flash.DrafterConfig(compression=9, max_latents=64)
    assert [config.num_latents(n) for n in (0, 1, 9, 10, 324, 5000)] == [0, 1, 1, 2, 36, 64]
    assert flash.DrafterConfig(use_visual_latents=False).num_latents(324) == 0


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(num_layers=0), dict(compression=0)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        flash.DrafterConfig(**bad)


def test_save_load_round_trip_gives_identical_drafts(targets64, tmp_path):
    target = targets64["qwen2_5_vl"]
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=3, num_layers=2))
    drafter.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    loaded = flash.FlashDrafter.from_pretrained(tmp_path, target)
    assert loaded.config == drafter.config
    # The target's embedding and LM head are shared, never saved.
    assert not any("embed" in k or "lm_head" in k for k in loaded.state_dict())
    _, prefill = _prefill(target)
    first = prefill.last_logits.argmax(-1)
    a = drafter.start(prefill, first, GREEDY)
    b = loaded.start(prefill, first, GREEDY)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.features, b.features)


def test_from_pretrained_refuses_another_target(targets64, tmp_path):
    flash.FlashDrafter.for_target(targets64["qwen2_5_vl"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained for a 'qwen2_5_vl' target"):
        flash.FlashDrafter.from_pretrained(tmp_path, targets64["llava_onevision"])
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config.update(target_model_type="", hidden_size=32)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="built for hidden_size=32"):
        flash.FlashDrafter.from_pretrained(tmp_path, targets64["qwen2_5_vl"])


def test_drafter_cache_equals_full_recompute(targets64):
    """Drafting with the cache after two steps equals a fresh drafter fed the same rows at once."""
    target = targets64["qwen2_5_vl"]
    torch.manual_seed(0)
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=4))
    _, prefill = _prefill(target)
    first = prefill.last_logits.argmax(-1)
    drafter.start(prefill, first, GREEDY)
    feats = torch.randn(1, 3, target.hidden_size, dtype=target.dtype)
    toks = torch.tensor([[5, 6, 7]])
    drafter.step(feats[:, :2], toks[:, :2], torch.tensor([2]), 2, GREEDY)
    incremental = drafter.step(feats[:, 2:], toks[:, 2:], torch.tensor([1]), 1, GREEDY)

    drafter.start(prefill, first, GREEDY)
    at_once = drafter.step(feats, toks, torch.tensor([3]), 3, GREEDY)
    assert torch.equal(incremental.tokens, at_once.tokens)
    assert torch.allclose(incremental.features, at_once.features, atol=1e-10)


def test_visual_latents_reach_the_drafts(targets64):
    """The text-only ablation ignores the video; the full drafter does not."""
    target = targets64["qwen2_5_vl"]
    torch.manual_seed(0)
    drafter = flash.FlashDrafter.for_target(target)
    _, prefill = _prefill(target)
    first = prefill.last_logits.argmax(-1)
    with_latents = drafter.start(prefill, first, GREEDY).features
    drafter.config.use_visual_latents = False
    without = drafter.start(prefill, first, GREEDY).features
    assert not torch.allclose(with_latents, without)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0.8, top_k=20)])
def test_block_without_refinement_equals_the_slot_loop(targets64, params):
    """With refinement off a block is drafted in one pass: the same block as the slot-by-slot loop
    of a drafter whose refinement adds nothing."""
    target = targets64["qwen2_5_vl"]
    torch.manual_seed(0)
    looped = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=4))
    torch.nn.init.zeros_(looped.refine[-1].weight)
    torch.nn.init.zeros_(looped.refine[-1].bias)
    one_pass = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=4, refine=False))
    one_pass.load_state_dict(looped.state_dict())
    _, prefill = _prefill(target)
    first = prefill.last_logits.argmax(-1)
    a = looped.start(prefill, first, params, torch.Generator().manual_seed(1))
    b = one_pass.start(prefill, first, params, torch.Generator().manual_seed(1))
    assert a.features.shape == b.features.shape == (1, 4, target.hidden_size)
    assert torch.allclose(a.features, b.features, atol=1e-12)
    if params.greedy:
        assert torch.equal(a.tokens, b.tokens) and a.probs is None and b.probs is None
    else:
        assert b.tokens.shape == (1, 4) and torch.allclose(a.probs, b.probs, atol=1e-12)
