"""Prompt-lookup drafting (the benchmark's model-free peer): what it proposes, that it
never copies visual placeholders, and that on demo clips it is lossless (float64,
batched) and accepts some drafts; it runs under sampling too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import flash
from demo.world import PROMPT, decode_frames, encode_mp4, model_inputs, render, scene_for_seed
from flash.lookup import _NO_TOKEN, PromptLookupDrafter

TARGET = Path(__file__).resolve().parents[2] / "models" / "demo-target"


def test_proposes_what_followed_the_latest_longest_match():
    lookup = PromptLookupDrafter(block_size=3, max_ngram=2)
    # suffix [7, 8] occurred twice; the latest occurrence (index 4) is followed by 5, 6, 1
    assert lookup.propose([7, 8, 9, 9, 7, 8, 5, 6, 1, 7, 8], 3) == [5, 6, 1]
    # no 2-gram match: fall back to the 1-gram [8], latest earlier occurrence at index 1
    assert lookup.propose([3, 8, 4, 2, 8], 3) == [4, 2, 8]
    assert lookup.propose([1, 2, 3], 3) == []  # nothing repeats
    assert lookup.propose([4, 1, 2], 2) == []  # no earlier occurrence of [2]
    with pytest.raises(ValueError):
        PromptLookupDrafter(block_size=0)


def test_never_matches_or_proposes_visual_placeholders():
    lookup = PromptLookupDrafter(block_size=4, max_ngram=2)
    assert lookup.propose([5, 6, _NO_TOKEN, _NO_TOKEN, 9, 5, 6], 4) == [_NO_TOKEN][:0]  # the copy stops at the video
    assert lookup.propose([5, 6, 2, _NO_TOKEN, 9, 5, 6], 4) == [2]
    assert lookup.propose([_NO_TOKEN, 4, 1, _NO_TOKEN], 4) == []


def _inputs(target, seeds):
    videos = [decode_frames(encode_mp4(render(scene_for_seed(s)))) for s in seeds]
    return model_inputs(target.processor, [PROMPT] * len(seeds), videos)


def test_on_demo_captions_it_is_lossless_and_accepts_drafts():
    target = flash.load_target(TARGET, dtype=torch.float64)
    seeds = [40, 41, 42, 43]
    alone = [flash.generate(target, None, _inputs(target, [s]), max_new_tokens=64).sequences[0] for s in seeds]
    out = flash.generate(target, PromptLookupDrafter(4), _inputs(target, seeds), max_new_tokens=64)
    assert out.sequences == alone
    # Measured 1.056 (5 drafts accepted in 89 row-cycles): captions repeat few n-grams beyond "a" and
    # ".", so lookup is a weak peer here; proposals of random tokens would score about 1.016.
    assert out.stats.acceptance_length > 1.03
    # Sampling: proposals are one-hot draft distributions, so speculative sampling stays exact.
    sampled = flash.generate(
        target,
        PromptLookupDrafter(4),
        _inputs(target, seeds[:1]),
        max_new_tokens=64,
        temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    assert sampled.sequences[0] and sampled.stats.cycles > 0
