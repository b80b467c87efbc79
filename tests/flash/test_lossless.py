"""The lossless contract (DESIGN.md §3): FLASH returns exactly the target's own
greedy tokens, in float64 on the CPU, on every family, whatever the drafter."""

from __future__ import annotations

import pytest
import torch

import flash
from bench.oracle import OracleDrafter
from flash.lookup import PromptLookupDrafter
from flash.suffix import SuffixDrafter
from tests.flash.test_suffix import warm_store
from tests.helpers import cases, hf_greedy

FAMILIES = ["qwen2_5_vl", "llava_onevision", "qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe", "internvl"]
MAX_NEW = 24
K = 4


@pytest.fixture(scope="module")
def references(targets64):
    """family -> [(case, inputs, reference tokens)] from HF generate(do_sample=False)."""
    out = {}
    for family in FAMILIES:
        target = targets64[family]
        rows = []
        for case in cases(family):
            inputs = case.inputs(target.processor)
            rows.append((case, inputs, hf_greedy(target, inputs, MAX_NEW)))
        out[family] = rows
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cases_are_varied(references, family):
    prompt_lengths = {inputs["input_ids"].shape[1] for _, inputs, _ in references[family]}
    assert len(references[family]) >= 20
    assert len(prompt_lengths) >= 10


@pytest.mark.parametrize("family", FAMILIES)
def test_some_references_end_at_eos(targets64, references, family):
    """EOS must fall inside blocks somewhere, so the tests below cover it."""
    eos = set(targets64[family].eos_token_ids.tolist())
    ended = [ref for _, _, ref in references[family] if ref[-1] in eos and len(ref) < MAX_NEW]
    assert len(ended) >= 2 and len({len(r) % (K + 1) for r in ended}) >= 2


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_decoding_equals_hf_generate(targets64, references, family):
    for case, inputs, ref in references[family]:
        out = flash.generate(targets64[family], None, inputs, max_new_tokens=MAX_NEW)
        assert out.sequences == [ref], case.name
        assert out.stats.acceptance_length == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_drafter_is_exact(targets64, references, family):
    target = targets64[family]
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K))
    for case, inputs, ref in references[family]:
        out = flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW)
        assert out.sequences == [ref], case.name


@pytest.mark.slow  # every family decodes with prompt-lookup proposals in test_batched too
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_lookup_drafter_is_exact(targets64, references, family):
    target = targets64[family]
    for case, inputs, ref in references[family]:
        out = flash.generate(target, PromptLookupDrafter(K), inputs, max_new_tokens=MAX_NEW)
        assert out.sequences == [ref], case.name


@pytest.mark.slow  # every family decodes with suffix proposals in test_batched too (warm, and beside FLASH)
@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_drafter_is_exact(targets64, references, family):
    """Warmed with every other case's reference: proposals right for a while, then wrong."""
    target = targets64[family]
    refs = [ref for _, _, ref in references[family]]
    accepted = 0
    for i, (case, inputs, ref) in enumerate(references[family]):
        drafter = SuffixDrafter(warm_store(refs[:i] + refs[i + 1 :]), block_size=K)
        out = flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW)
        assert out.sequences == [ref], case.name
        accepted += out.stats.accepted
    assert accepted > 0  # some proposals were right: the acceptance path ran


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_drafter_accepts_whole_blocks(targets64, references, family):
    target = targets64[family]
    long_enough = 0
    for case, inputs, ref in references[family]:
        drafter = OracleDrafter([ref], target.vocab_size, block_size=K)
        out = flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW)
        assert out.sequences == [ref], case.name
        per_cycle = [row[0] for row in out.stats.accepted_per_cycle]
        # Every cycle but the last (where the reference may end inside the block) accepts all k.
        assert all(a == K for a in per_cycle[:-1]), (case.name, per_cycle)
        if len(ref) >= 1 + 2 * (K + 1):
            long_enough += 1
            full = per_cycle[:-1]
            assert sum(a + 1 for a in full) / len(full) == K + 1
    assert long_enough >= 5


@pytest.mark.parametrize("family", FAMILIES)
# right for 1 runs by default; 0 and 2 (test_batched's oracles cover them) in the slow suite
@pytest.mark.parametrize("right_for", [pytest.param(r, marks=pytest.mark.slow) if r != 1 else r for r in (0, 1, 2)])
def test_drafter_right_then_wrong_is_exact(targets64, references, family, right_for):
    target = targets64[family]
    for case, inputs, ref in references[family]:
        drafter = OracleDrafter([ref], target.vocab_size, block_size=K, right_for=right_for)
        out = flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW)
        assert out.sequences == [ref], case.name
        per_cycle = [row[0] for row in out.stats.accepted_per_cycle]
        assert all(a == right_for for a in per_cycle[:-1]), (case.name, per_cycle)


@pytest.mark.parametrize("family", FAMILIES)
def test_max_new_tokens_inside_a_block(targets64, references, family):
    target = targets64[family]
    case, inputs, ref = next(r for r in references[family] if len(r[2]) == MAX_NEW)
    for budget in (1, 2, 3, 7, 10):
        drafter = OracleDrafter([ref], target.vocab_size, block_size=K)
        out = flash.generate(target, drafter, inputs, max_new_tokens=budget)
        assert out.sequences == [ref[:budget]], (case.name, budget)


def test_rollback_matters(targets64, references, monkeypatch):
    """A session that forgets to roll back rejected tokens breaks the output: the test above would notice."""
    target = targets64["qwen2_5_vl"]
    original = flash.TargetSession.commit

    def no_rollback(self, n_kept, kept_max=None, kept=None):
        original(self, torch.full_like(n_kept, self._pending), self._pending)

    monkeypatch.setattr(flash.TargetSession, "commit", no_rollback)
    broken = 0
    for _case, inputs, ref in references["qwen2_5_vl"]:
        drafter = OracleDrafter([ref], target.vocab_size, block_size=K, right_for=1)
        broken += flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW).sequences != [ref]
    assert broken > 0


def test_mrope_positions_matter(targets64, references, monkeypatch):
    """Decoding after a video at positions without Qwen's rope delta changes the output."""
    target = targets64["qwen2_5_vl"]
    original = flash.TargetSession.load

    def without_delta(self, slots, prompt, rows=None):
        original(self, slots, prompt, rows)
        self.rope_deltas.zero_()

    video_cases = [r for r in references["qwen2_5_vl"] if r[0].videos is not None]
    monkeypatch.setattr(flash.TargetSession, "load", without_delta)
    differ = sum(
        flash.generate(target, None, inputs, max_new_tokens=MAX_NEW).sequences != [ref]
        for _, inputs, ref in video_cases
    )
    assert differ > 0


def _plain_untrained_and_partly_right_are_exact(target, some_cases) -> None:
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K))
    for case in some_cases:
        inputs = case.inputs(target.processor)
        ref = hf_greedy(target, inputs, MAX_NEW)
        assert flash.generate(target, None, inputs, max_new_tokens=MAX_NEW).sequences == [ref], case.name
        assert flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW).sequences == [ref], case.name
        oracle = OracleDrafter([ref], target.vocab_size, block_size=K, right_for=2)
        assert flash.generate(target, oracle, inputs, max_new_tokens=MAX_NEW).sequences == [ref], case.name


def test_qwen2_vl_shares_the_adapter(tmp_path):
    """Qwen2-VL (the 2.5 adapter, its own HF class): plain, untrained and oracle drafts are exact."""
    from demo.tiny_models import build_qwen2_vl

    target = flash.load_target(build_qwen2_vl(tmp_path / "q2", seed=0), dtype=torch.float64)
    assert target.family == "qwen" and target.model_type == "qwen2_vl"
    _plain_untrained_and_partly_right_are_exact(target, cases("qwen2_5_vl")[::3])


def test_internvl_over_a_qwen3_moe_decoder(tmp_path):
    """InternVL3.5-30B-A3B's layout (InternViT, pixel shuffle, a Qwen3-MoE decoder): loads in float64 on
    the eager experts; plain, untrained and partly right drafts are exact."""
    from demo.tiny_models import build_internvl

    target = flash.load_target(build_internvl(tmp_path / "ivl", moe=True), dtype=torch.float64)
    assert target.config.get_text_config().model_type == "qwen3_moe"
    assert set(target.model.get_experts_implementation().values()) == {"eager"}
    _plain_untrained_and_partly_right_are_exact(target, cases("internvl")[::4])


# Qwen3.5-MoE runs the same rollback code (its exactness is tested above): its negative control is slow
@pytest.mark.parametrize("family", ["qwen3_5", pytest.param("qwen3_5_moe", marks=pytest.mark.slow)])
def test_linear_attention_rollback_matters(targets64, references, monkeypatch, family):
    """Qwen3.5's linear-attention layers (dense and MoE): a session that keeps the recurrent state and
    convolution window of the whole block instead of each row's accepted length must lose exactness."""
    import flash.target
    from flash.hybrid import LinearStates

    class NoRestore(LinearStates):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.restore = False

    target = targets64[family]
    rows = references[family]
    exact = [
        flash.generate(
            target, OracleDrafter([r], target.vocab_size, K, right_for=1), i, max_new_tokens=MAX_NEW
        ).sequences[0]
        == r
        for _, i, r in rows
    ]
    assert all(exact)
    monkeypatch.setattr(flash.target, "LinearStates", NoRestore)
    broken = [
        flash.generate(
            target, OracleDrafter([r], target.vocab_size, K, right_for=1), i, max_new_tokens=MAX_NEW
        ).sequences[0]
        == r
        for _, i, r in rows
    ]
    assert not all(broken)
