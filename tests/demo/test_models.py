"""The shipped demo target and drafter (models/): they load, the target reads the
video, and the drafter is lossless on held-out clips and earns its keep there."""

from __future__ import annotations

from pathlib import Path

import torch

import flash
from demo.world import COLOURS, PROMPT, decode_frames, encode_mp4, model_inputs, render, scene_for_seed

ROOT = Path(__file__).resolve().parents[2]
TARGET, DRAFTER = ROOT / "models" / "demo-target", ROOT / "models" / "demo-drafter"
HELD_OUT = range(0, 8)  # training used seeds >= 1,000,000
# An untrained drafter gets ~1.0 here; the shipped one 5.07 (2026-11-27 night, k=5). Drafters trained with the
# refinement reading the wrong token reached only 3.1-3.2, so the floor sits above that.
ACCEPTANCE_FLOOR = 3.8


def _inputs(target, seed: int):
    frames = decode_frames(encode_mp4(render(scene_for_seed(seed))))
    return model_inputs(target.processor, [PROMPT], [frames])


def _text(target, tokens: list[int]) -> str:
    eos = set(target.eos_token_ids.tolist())
    return target.processor.tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()


# Measured 2026-11-27 (fifth training run): the shipped target captions 29 of the held-out clips 0-31
# exactly (95% on 0-99, 95.7% on 100-399, 91.75% on 600-999); these three it gets wrong (15, 17: one
# shape word; 22: the motion word). Every other clip of the 32 is a fixed exact-caption check.
KNOWN_WRONG = {15, 17, 22}


def test_shipped_target_captions_held_out_clips():
    """29 fixed held-out clips captioned exactly; on the rest it still reads count, background,
    template and every colour off the video."""
    target = flash.load_target(TARGET)
    assert target.model_type == "qwen2_5_vl" and target.config.get_text_config().num_hidden_layers >= 8
    wrong = []
    for seed in range(32):
        want = scene_for_seed(seed).caption()
        got = _text(target, flash.generate(target, None, _inputs(target, seed), max_new_tokens=64).sequences[0])
        if got != want:
            wrong.append(seed)
            assert got.split(" . ")[0] == want.split(" . ")[0], (seed, got)
            assert [w for w in got.split() if w in COLOURS] == [w for w in want.split() if w in COLOURS], (seed, got)
    assert set(wrong) <= KNOWN_WRONG, wrong


def test_shipped_drafter_is_lossless_and_accepts_above_the_floor():
    target = flash.load_target(TARGET, dtype=torch.float64)
    drafter = flash.FlashDrafter.from_pretrained(DRAFTER, target)
    untrained = flash.FlashDrafter.for_target(target, drafter.config)
    lengths = {"trained": [], "untrained": []}
    for seed in HELD_OUT:
        inputs = _inputs(target, seed)
        plain = flash.generate(target, None, inputs, max_new_tokens=64).sequences
        for name, d in (("trained", drafter), ("untrained", untrained)):
            out = flash.generate(target, d, inputs, max_new_tokens=64)
            assert out.sequences == plain, (name, seed)
            lengths[name].append(out.stats.acceptance_length)
    trained = sum(lengths["trained"]) / len(HELD_OUT)
    untrained_mean = sum(lengths["untrained"]) / len(HELD_OUT)
    assert trained >= ACCEPTANCE_FLOOR > untrained_mean, lengths
