"""The MoE verify-cost bench: the expected-experts formula, the roofline's behaviour at a released
shape, the policy's choices from those costs, and the measured part run tiny."""

from __future__ import annotations

import random

import pytest
import torch

from bench.moe_verify import (
    distinct_experts,
    draft_seconds,
    measure,
    pass_seconds,
    policy_choice,
    shape_costs,
    tiny_pair,
)


def test_distinct_experts_matches_routing_at_random():
    assert distinct_experts(1, 128, 8) == pytest.approx(8)
    assert distinct_experts(10_000, 128, 8) == pytest.approx(128)
    rng = random.Random(0)
    for tokens in (5, 40):
        trials = [len({e for _ in range(tokens) for e in rng.sample(range(128), 8)}) for _ in range(2000)]
        assert sum(trials) / len(trials) == pytest.approx(distinct_experts(tokens, 128, 8), rel=0.02)


@pytest.fixture(scope="module")
def shapes():
    return {name: shape_costs(name) for name in ("Qwen3-VL-30B-A3B-Instruct", "Qwen2.5-VL-7B-Instruct")}


def test_moe_verify_is_dear_at_small_batch_and_free_at_large(shapes):
    moe, dense = shapes["Qwen3-VL-30B-A3B-Instruct"], shapes["Qwen2.5-VL-7B-Instruct"]
    assert moe["experts"] == 128 and moe["active"] == 8 and moe["expert_params"] == 3 * 2048 * 768

    def ratio(shape, batch):
        return pass_seconds(shape, batch, 5, 2048) / pass_seconds(shape, batch, 1, 2048)

    assert ratio(moe, 1) > 2.5 and ratio(dense, 1) < 1.05  # 35 experts read instead of 8
    assert ratio(moe, 64) < 1.05  # every expert is read by the step already


def test_the_policy_picks_shorter_blocks_where_verify_is_dear(shapes):
    """Fed the modelled costs, at equal acceptance: the MoE target gets a shorter block than the
    dense one at batch 1, the same full block at batch 64, each within a few percent of the best rate."""
    picks = {}
    for name, shape in shapes.items():
        for batch in (1, 64):
            verify = lambda w, s=shape, b=batch: pass_seconds(s, b, w, 2048)  # noqa: E731
            k, best, rate = policy_choice(verify, draft_seconds(shape), 0.8)
            picks[name, batch] = k
            assert rate > 0.95, (name, batch, k, best)
    assert picks["Qwen3-VL-30B-A3B-Instruct", 1] < picks["Qwen2.5-VL-7B-Instruct", 1] == 4
    assert picks["Qwen3-VL-30B-A3B-Instruct", 64] == picks["Qwen2.5-VL-7B-Instruct", 64] == 4


def test_measured_part_counts_the_experts_each_pass_reads():
    pair = tiny_pair(hidden=128, layers=1, experts=8, active=2, expert=32, device="cpu", dtype=torch.float32)
    rows = measure(pair, [1, 4], repeats=1, prompt=16)
    by = {(r["batch"], r["width"]): r for r in rows}
    assert by[1, 1]["moe_experts"] == 2  # one token: exactly its top-2
    assert 2 <= by[1, 5]["moe_experts"] <= 8 and by[4, 5]["moe_experts"] >= by[1, 5]["moe_experts"]
    assert all(r["moe_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
