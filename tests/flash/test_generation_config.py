"""The checkpoint's generation config: flash.generate decodes as `model.generate()` does with
the checkpoint's own `generation_config.json` (repetition penalty, do_sample, top-k, ...),
token for token in float64, alone and batched, whatever the drafter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import GenerationConfig

import flash
from bench.oracle import OracleDrafter
from flash.lookup import PromptLookupDrafter
from flash.sampling import SamplingParams, choose, mark_seen, penalize, seen_ids
from flash.suffix import SuffixDrafter
from tests.flash.test_batched import _batch
from tests.flash.test_suffix import warm_store
from tests.helpers import cases

FAMILIES = ["qwen2_5_vl", "llava_onevision", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe", "internvl"]
# The default suite decodes rows alone with the penalty on these, batches on every family but the Qwen3.5
# ones (their penalty under continuous batching: test_engine); every family in the slow suite.
DEFAULT = ("qwen2_5_vl", "internvl")
MAX_NEW = 24
K = 4
PENALTY = 1.5  # large enough that a tiny random model's output changes when it is applied
# Every fourth case, from this offset: cases whose greedy output the penalty changes in 3 of 5 (qwen3_5
# from 0 has only 2).
CASE_OFFSET = {"qwen3_5": 3}
# What Qwen2.5-VL-7B-Instruct's generation_config.json says.
QWEN_RELEASE = {"do_sample": True, "temperature": 0.1, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05}


def _with_generation_config(src: str, dst, settings: dict) -> flash.Target:
    """A copy of a checkpoint whose generation_config.json also holds `settings`, loaded in float64."""
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    config = json.loads(path.read_text())
    config.update(settings)
    path.write_text(json.dumps(config))
    return flash.load_target(dst, dtype=torch.float64)


@pytest.fixture(scope="module")
def penalized(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("penalized")
    return {
        family: _with_generation_config(tiny_checkpoints[family], root / family, {"repetition_penalty": PENALTY})
        for family in FAMILIES
    }


def _hf(target: flash.Target, inputs, max_new: int = MAX_NEW) -> list[list[int]]:
    """`model.generate()` with the checkpoint's own generation config: new tokens per row, up to EOS."""
    with torch.inference_mode():
        out = target.model.generate(**inputs, max_new_tokens=max_new)
    eos = set(target.eos_token_ids.tolist())
    rows = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


def test_checkpoint_penalty_is_loaded(penalized):
    params = SamplingParams.from_generation_config(penalized["qwen2_5_vl"].model.generation_config)
    assert params == SamplingParams(temperature=0.0, repetition_penalty=PENALTY)


@pytest.mark.parametrize("family", [f if f in DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_penalized_decoding_equals_hf_generate(penalized, targets64, family):
    target = penalized[family]
    changed = 0
    for case in cases(family)[CASE_OFFSET.get(family, 0) :: 4]:
        inputs = case.inputs(target.processor)
        (ref,) = _hf(target, inputs)
        (unpenalized,) = _hf(targets64[family], inputs)
        changed += ref != unpenalized
        drafters = [
            None,
            flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K)),
            flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K, refine=False)),
            OracleDrafter([ref], target.vocab_size, K),
            OracleDrafter([ref], target.vocab_size, K, right_for=2),
            PromptLookupDrafter(K),
            SuffixDrafter(warm_store([ref, unpenalized]), block_size=K),
        ]
        for drafter in drafters:
            out = flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW)
            assert out.sequences == [ref], (case.name, type(drafter).__name__)
    assert changed >= 3  # the penalty is applied, not ignored


def test_oracle_accepts_whole_blocks_under_the_penalty(penalized):
    """Verify applies the penalty with the block's own tokens counted at each later position."""
    target = penalized["qwen2_5_vl"]
    inputs = cases("qwen2_5_vl")[1].inputs(target.processor)
    (ref,) = _hf(target, inputs)
    out = flash.generate(target, OracleDrafter([ref], target.vocab_size, K), inputs, max_new_tokens=MAX_NEW)
    assert out.sequences == [ref]
    assert [row[0] for row in out.stats.accepted_per_cycle][:-1] == [K] * (out.stats.cycles - 1)


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if "3_5" in f else f for f in FAMILIES])
def test_penalized_batch_equals_rows_alone(penalized, family):
    """Left padding is not a seen token: each row of a padded batch equals the row decoded alone."""
    target = penalized[family]
    prompts, videos = _batch(family, 5, seed=3)
    alone = [
        _hf(target, target.processor(text=[p], videos=[v], return_tensors="pt"))[0] for p, v in zip(prompts, videos)
    ]
    inputs = target.processor(text=prompts, videos=videos, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()
    assert _hf(target, inputs) == alone
    for drafter in (
        None,
        flash.FlashDrafter.for_target(target),
        OracleDrafter(alone, target.vocab_size, K, right_for=3),
    ):
        assert flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW).sequences == alone


def test_release_sampling_settings_decode_like_generate(tiny_checkpoints, tmp_path):
    """Qwen2.5-VL's release config samples with top_k 1: generate() is deterministic, and so is flashcap."""
    target = _with_generation_config(tiny_checkpoints["qwen2_5_vl"], tmp_path / "release", QWEN_RELEASE)
    for case in cases("qwen2_5_vl")[:6]:
        inputs = case.inputs(target.processor)
        ref = _hf(target, inputs)
        assert (
            flash.generate(target, flash.FlashDrafter.for_target(target), inputs, max_new_tokens=MAX_NEW).sequences
            == ref
        )


def penalized_first_block(target, drafter, prefill, penalty: float = 3.0):
    """The drafter's first block under a repetition penalty, with 20 random ids seen besides the prompt
    (as if emitted). Returns (block, the seen ids its first slot used)."""
    params = SamplingParams(repetition_penalty=penalty)
    seen = seen_ids(prefill.input_ids, prefill.attention_mask, target.vocab_size)
    extra = torch.randint(0, target.vocab_size, (seen.shape[0], 20), generator=torch.Generator().manual_seed(0))
    seen = torch.cat([seen, extra], dim=1)
    first, _ = choose(prefill.last_logits, params, seen=seen)
    seen = mark_seen(seen, first.unsqueeze(1), torch.ones_like(first))
    return drafter.start(prefill, first, params, seen=seen), seen


def test_drafter_proposals_use_the_penalty(penalized):
    """Each drafted token is the argmax of the penalized drafter logits, earlier slots counted as seen."""
    target = penalized["qwen2_5_vl"]
    torch.manual_seed(0)
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=5))
    inputs = target.processor(text=[c.prompt for c in cases("qwen2_5_vl")[17:20]], return_tensors="pt", padding=True)
    _, prefill = target.prefill(inputs)
    block, seen = penalized_first_block(target, drafter, prefill)
    logits = drafter.lm_head(block.features).float()  # [B, k, V]
    context, differs = seen, 0
    for i in range(block.tokens.shape[1]):
        expected = penalize(logits[:, i], context, 3.0).argmax(-1)
        assert torch.equal(block.tokens[:, i], expected)
        differs += int((logits[:, i].argmax(-1) != expected).sum())
        context = torch.cat([context, block.tokens[:, i : i + 1]], dim=1)
    assert differs > 0


@pytest.mark.parametrize(
    ("settings", "overrides", "expected"),
    [
        ({}, {}, SamplingParams()),
        ({"repetition_penalty": 1.05}, {}, SamplingParams(repetition_penalty=1.05)),
        ({"do_sample": True}, {}, SamplingParams(temperature=1.0, top_k=50)),  # generate()'s default top_k
        ({"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8}, {}, SamplingParams(0.7, 20, 0.8)),
        (QWEN_RELEASE, {}, SamplingParams(repetition_penalty=1.05)),
        (QWEN_RELEASE, {"temperature": 0.0}, SamplingParams(repetition_penalty=1.05)),
        ({"do_sample": True, "top_k": 20}, {"temperature": 0.0}, SamplingParams()),
        ({}, {"temperature": 0.8}, SamplingParams(0.8, top_k=50)),
        ({"top_k": 20}, {"temperature": 0.8, "top_k": 0, "top_p": 0.9}, SamplingParams(0.8, 0, 0.9)),
        ({"repetition_penalty": 1.05}, {"repetition_penalty": 1.0}, SamplingParams()),
    ],
)
def test_params_from_generation_config(settings, overrides, expected):
    assert SamplingParams.from_generation_config(GenerationConfig(**settings), **overrides) == expected


@pytest.mark.parametrize(
    "settings",
    [{"no_repeat_ngram_size": 3}, {"num_beams": 4}, {"suppress_tokens": [5]}, {"do_sample": True, "min_p": 0.1}],
)
def test_settings_flashcap_cannot_apply_are_refused(settings):
    with pytest.raises(ValueError, match=next(iter(s for s in settings if s != "do_sample"))):
        SamplingParams.from_generation_config(GenerationConfig(**settings))
