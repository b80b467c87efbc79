"""Adaptive block length: the choice follows measured acceptance and costs, and
any choice (plain cycles included) keeps the output exact."""

from __future__ import annotations

import pytest

import flash
from bench.oracle import OracleDrafter
from flash.policy import BlockPolicy, expected_tokens
from tests.helpers import cases, hf_greedy


def test_expected_tokens_table():
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 1) == 1.5
    assert expected_tokens([0.5, 0.5], 2) == 1.75
    assert expected_tokens([1.0] * 4, 4) == 5.0


def _trained(policy: BlockPolicy, batch: int, accept: int, verify, draft, cycles: int = 200) -> None:
    """Feed a policy cycles where every row accepts `accept` tokens and costs follow the given functions."""
    for _ in range(cycles):
        k = policy.choose(batch)
        policy.observe(batch, k, draft(k) if k else 0.0, verify(k + 1), [min(accept, k)] * batch)


def test_high_acceptance_and_flat_verify_cost_picks_full_blocks():
    policy = BlockPolicy(max_block=4)
    _trained(policy, 1, accept=4, verify=lambda w: 0.010, draft=lambda k: 0.001 * k)
    assert max(range(5), key=lambda k: expected_tokens(policy.alphas, k) / policy.seconds_per_cycle(1, k)) == 4
    assert policy.alphas[0] > 0.95


def test_no_acceptance_falls_back_to_plain_decoding():
    policy = BlockPolicy(max_block=4)
    _trained(policy, 16, accept=0, verify=lambda w: 0.010 * w, draft=lambda k: 0.002 * k)
    picks = [policy.choose(16) for _ in range(32)]
    assert picks.count(0) >= 28  # plain, except the periodic probe of k = 1


def test_batch_sizes_are_learned_separately():
    policy = BlockPolicy(max_block=4)
    _trained(policy, 1, accept=3, verify=lambda w: 0.010, draft=lambda k: 0.001)
    assert policy.seconds_per_cycle(16, 2) is None  # nothing measured at batch 16 yet
    assert policy.choose(16) == 4  # so it starts with full blocks there


@pytest.mark.parametrize("accept_pattern", [4, 1, 0])
def test_adaptive_length_is_lossless(targets64, accept_pattern):
    target = targets64["qwen2_5_vl"]
    policy = BlockPolicy(max_block=4, explore_every=3)  # explore a lot: many different k, plain cycles included
    seen = set()
    original = policy.choose

    def spy(batch):
        k = original(batch)
        seen.add(k)
        return k

    policy.choose = spy
    for case in cases("qwen2_5_vl")[:8]:
        inputs = case.inputs(target.processor)
        ref = hf_greedy(target, inputs, 24)
        oracle = OracleDrafter([ref], target.vocab_size, 4, right_for=accept_pattern)
        assert flash.generate(target, oracle, inputs, max_new_tokens=24, block_size=policy).sequences == [ref]
        drafter = flash.FlashDrafter.for_target(target)
        assert flash.generate(target, drafter, inputs, max_new_tokens=24, block_size=policy).sequences == [ref]
    assert len(seen) >= 2


def test_adaptive_length_in_a_batch_is_lossless(targets64):
    from tests.flash.test_batched import _alone, _batch

    target = targets64["qwen2_5_vl"]
    prompts, videos = _batch("qwen2_5_vl", 5, 1)
    alone = _alone(target, prompts, videos)
    inputs = target.processor(text=prompts, videos=videos, return_tensors="pt", padding=True)
    policy = BlockPolicy(max_block=4, explore_every=2)
    for right_for in (0, 2, 4):
        oracle = OracleDrafter(alone, target.vocab_size, 4, right_for=right_for)
        out = flash.generate(target, oracle, inputs, max_new_tokens=20, block_size=policy)
        assert out.sequences == alone
    drafter = flash.FlashDrafter.for_target(target)
    assert flash.generate(target, drafter, inputs, max_new_tokens=20, block_size=policy).sequences == alone
