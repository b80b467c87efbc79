"""Batches: every row's tokens equal the same row decoded alone (float64), with
ragged acceptance, rows finishing at different cycles, and heavy padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flash
from bench.oracle import OracleDrafter
from flash.lookup import PromptLookupDrafter
from flash.suffix import SuffixDrafter, WithSuffix
from tests.flash.test_suffix import warm_store
from tests.helpers import PROMPT_TEXTS, chat, hf_greedy

FAMILIES = ["qwen2_5_vl", "llava_onevision", "qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe", "internvl"]
K = 4
MAX_NEW = 20


def _batch(family: str, n: int, seed: int):
    rng = np.random.RandomState(seed)
    prompts, videos = [], []
    for i in range(n):
        frames = 2 * (1 + i % 3) if family.startswith("qwen") else 4  # LLaVA and InternVL stack equal frame counts
        h, w = [(56, 56), (56, 84), (84, 56), (112, 112)][i % 4]
        videos.append(rng.randint(0, 256, (frames, h, w, 3), dtype=np.uint8))
        prompts.append(chat(family, PROMPT_TEXTS[(3 * i + seed) % len(PROMPT_TEXTS)], "video"))
    return prompts, videos


def _alone(target, prompts, videos, max_new=MAX_NEW):
    return [
        hf_greedy(target, target.processor(text=[p], videos=[v], return_tensors="pt"), max_new)
        for p, v in zip(prompts, videos)
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_batched_rows_equal_rows_alone(targets64, family, seed):
    target = targets64[family]
    prompts, videos = _batch(family, 6, seed)
    alone = _alone(target, prompts, videos)
    assert len({len(a) for a in alone}) >= 2  # rows finish at different cycles
    inputs = target.processor(text=prompts, videos=videos, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # mixed prompt lengths: real padding
    drafters = [
        None,
        flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K)),
        OracleDrafter(alone, target.vocab_size, K),
        OracleDrafter(alone, target.vocab_size, K, right_for=1),
        OracleDrafter(alone, target.vocab_size, K, right_for=3),
        PromptLookupDrafter(K),
        SuffixDrafter(warm_store(alone), block_size=K),  # right up to where the rows differ
        WithSuffix(
            flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K)),
            SuffixDrafter(warm_store(alone[:3])),
        ),
    ]
    for drafter in drafters:
        out = flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW)
        assert out.sequences == alone, type(drafter).__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_in_a_batch_accepts_whole_blocks(targets64, family):
    target = targets64[family]
    prompts, videos = _batch(family, 5, 2)
    alone = _alone(target, prompts, videos)
    inputs = target.processor(text=prompts, videos=videos, return_tensors="pt", padding=True)
    out = flash.generate(target, OracleDrafter(alone, target.vocab_size, K), inputs, max_new_tokens=MAX_NEW)
    assert out.sequences == alone
    for row, ref in enumerate(alone):
        cycles = out.stats.row_cycle_count[row]
        # all cycles but the row's last accept k; the last may stop at EOS or the budget
        assert out.stats.row_accepted[row] >= K * (cycles - 1), (row, out.stats.row_accepted[row], cycles)
        assert cycles == -(-(len(ref) - 1) // (K + 1))  # ceil((tokens after the first) / (k+1))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5"])
@pytest.mark.parametrize("budget", [1, 3, 7, 11])
def test_max_new_tokens_inside_a_block_in_a_batch(targets64, budget, family):
    target = targets64[family]
    prompts, videos = _batch(family, 4, 3)
    alone = _alone(target, prompts, videos, max_new=budget)
    inputs = target.processor(text=prompts, videos=videos, return_tensors="pt", padding=True)
    oracle = OracleDrafter(_alone(target, prompts, videos), target.vocab_size, K)
    assert flash.generate(target, oracle, inputs, max_new_tokens=budget).sequences == alone


@pytest.mark.parametrize("family", FAMILIES)
def test_heavily_padded_row_is_unchanged(targets64, family):
    target = targets64[family]
    rng = np.random.RandomState(9)
    frames = [rng.randint(0, 256, (4, 56, 56, 3), dtype=np.uint8) for _ in range(2)]
    long_text = " ".join(PROMPT_TEXTS * 4)
    prompts = [chat(family, "what", "video"), chat(family, long_text, "video")]
    alone = _alone(target, prompts, frames)
    inputs = target.processor(text=prompts, videos=frames, return_tensors="pt", padding=True)
    pad = int((inputs["attention_mask"][0] == 0).sum())
    assert pad > 100  # the short row sits behind heavy padding
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K))
    for d in (None, drafter, OracleDrafter(alone, target.vocab_size, K, right_for=2)):
        assert flash.generate(target, d, inputs, max_new_tokens=MAX_NEW).sequences == alone


def test_batched_sampling_runs(targets64):
    target = targets64["qwen2_5_vl"]
    prompts, videos = _batch("qwen2_5_vl", 3, 4)
    inputs = target.processor(text=prompts, videos=videos, return_tensors="pt", padding=True)
    drafter = flash.FlashDrafter.for_target(target)
    out = flash.generate(
        target,
        drafter,
        inputs,
        max_new_tokens=8,
        temperature=0.8,
        top_p=0.9,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(out.sequences) == 3 and all(1 <= len(s) <= 8 for s in out.sequences)
