"""Continuous batching (flash.Engine): rows admitted while others decode, rows finishing in
different cycles, block lengths changing, plain cycles (k = 0) — every row's tokens equal the
target decoding it alone (float64), for every drafter, with and without a repetition penalty."""

from __future__ import annotations

import itertools

import pytest
import torch

import flash
from bench.oracle import OracleDrafter
from flash.generate import bucket_for
from flash.lookup import PromptLookupDrafter
from tests.flash.test_batched import _batch
from tests.helpers import hf_greedy

FAMILIES = ["qwen2_5_vl", "llava_onevision", "qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe", "internvl"]
MAX_NEW = 20
K = 4


class ScheduledPolicy(flash.BlockPolicy):
    """A block policy that picks k from a fixed cycle, plain cycles (0) included."""

    def __init__(self, schedule: list[int]) -> None:
        super().__init__(max_block=max(schedule))
        self.schedule = itertools.cycle(schedule)

    def choose(self, batch: int) -> int:
        return next(self.schedule)


def _requests(target, family: str, n: int, seed: int):
    prompts, videos = _batch(family, n, seed)
    return [target.processor(text=[p], videos=[v], return_tensors="pt") for p, v in zip(prompts, videos)]


def _run(engine: flash.Engine, requests: list, admit_at: dict[int, int]) -> dict[int, list[int]]:
    """Admit requests one by one: `admit_at[cycle]` more of them before that cycle; then drain."""
    queue, finished, cycle = list(requests), [], 0
    while queue or engine.live:
        for _ in range(admit_at.get(cycle, 0) if engine.live else 1):
            if queue:
                engine.admit(queue.pop(0))
        finished += engine.step()
        cycle += 1
        if engine.live:  # the live rows fill the lowest slots; the pass runs the smallest bucket holding them
            slots = engine._slots
            assert slots.live == list(range(engine.live))
            assert slots.bucket == bucket_for(engine.live, len(slots.keys))
    assert len(set(finished)) == len(finished) <= len(requests)  # each row finishes once
    return dict(engine.sequences)


# Qwen3.5's hybrid rollback under continuous batching runs by default on Qwen3.5-MoE (the same code)
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "qwen3_5" else f for f in FAMILIES])
def test_rows_admitted_mid_flight_equal_rows_alone(targets64, family):
    target = targets64[family]
    requests = _requests(target, family, 7, seed=5)
    alone = [hf_greedy(target, r, MAX_NEW) for r in requests]
    assert len({len(a) for a in alone}) >= 2  # rows finish in different cycles
    admit_at = {0: 2, 2: 1, 3: 2, 7: 1}  # joins while others decode, sometimes several at once
    drafters = {
        "plain": None,
        "flash": flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K)),
        "oracle": OracleDrafter(alone, target.vocab_size, K),
        "oracle_right_for_2": OracleDrafter(alone, target.vocab_size, K, right_for=2),
        "lookup": PromptLookupDrafter(K),
    }
    accepted = {}
    for name, drafter in drafters.items():
        engine = flash.Engine(target, drafter, max_new_tokens=MAX_NEW)
        got = _run(engine, requests, admit_at)
        assert [got[i] for i in range(len(requests))] == alone, name
        accepted[name] = engine.stats.accepted
    assert accepted["oracle"] > 0 and accepted["oracle_right_for_2"] > 0  # the acceptance path ran, rows joining


@pytest.mark.parametrize("schedule", [[0, 3, 0, 0, 4, 1], [2, 0, 4]])
def test_block_lengths_change_and_plain_cycles_with_admissions(targets64, schedule):
    target = targets64["qwen2_5_vl"]
    requests = _requests(target, "qwen2_5_vl", 6, seed=6)
    alone = [hf_greedy(target, r, MAX_NEW) for r in requests]
    for drafter in (
        flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=4)),
        OracleDrafter(alone, target.vocab_size, 4),
    ):
        engine = flash.Engine(target, drafter, max_new_tokens=MAX_NEW, block_size=ScheduledPolicy(schedule))
        got = _run(engine, requests, {0: 1, 1: 1, 2: 1, 4: 2})
        assert [got[i] for i in range(len(requests))] == alone


def test_oracle_rows_joining_accept_whole_blocks(targets64):
    """Joined rows draft from their own position: a perfect oracle keeps being accepted in full."""
    target = targets64["qwen2_5_vl"]
    requests = _requests(target, "qwen2_5_vl", 4, seed=7)
    alone = [hf_greedy(target, r, MAX_NEW) for r in requests]
    engine = flash.Engine(target, OracleDrafter(alone, target.vocab_size, K), max_new_tokens=MAX_NEW)
    _run(engine, requests, {1: 1, 2: 2})
    full = sum(a == K for cycle in engine.stats.accepted_per_cycle for a in cycle)
    assert full >= 0.7 * engine.stats.row_cycles


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5"])
def test_admitted_rows_keep_the_repetition_penalty(tiny_checkpoints, targets64, tmp_path, family):
    """Joined rows carry their own seen ids (ragged lengths): equal to generate() with the penalty."""
    from tests.flash.test_generation_config import _hf, _with_generation_config

    target = _with_generation_config(tiny_checkpoints[family], tmp_path / "m", {"repetition_penalty": 1.5})
    requests = _requests(target, family, 5, seed=8)
    alone = [_hf(target, r)[0] for r in requests]
    assert alone != [_hf(targets64[family], r)[0] for r in requests]  # the penalty changes some rows
    for drafter in (None, flash.FlashDrafter.for_target(target), OracleDrafter(alone, target.vocab_size, K, 3)):
        engine = flash.Engine(target, drafter, max_new_tokens=24)
        got = _run(engine, requests, {0: 1, 2: 2, 3: 1})
        assert [got[i] for i in range(len(requests))] == alone


def test_max_rows_bounds_the_slots(targets64):
    """An engine given max_rows never grows past it: a batch that finds too few free slots is refused."""
    target = targets64["qwen2_5_vl"]
    engine = flash.Engine(target, None, max_new_tokens=MAX_NEW, max_rows=2)
    requests = _requests(target, "qwen2_5_vl", 3, seed=4)
    engine.admit(requests[0])
    engine.admit(requests[1])
    with pytest.raises(ValueError, match="max_rows=2"):
        engine.admit(requests[2])


def test_slots_keep_each_rows_own_length(targets64):
    """Rows loaded into slots of one session see only their own entries: verify logits equal the
    row's own session; a free slot between them (masked) changes nothing; a released slot's row
    leaves the others exact."""
    target = targets64["qwen2_5_vl"]
    short, long = _requests(target, "qwen2_5_vl", 3, seed=9)[:2]
    session = target.open(4)
    session.load([0], target.prompt(short)[0])
    session.load([2], target.prompt(long)[0])
    alone, _ = target.prefill(long)
    lengths = [int(x.shape[1]) for x in (short["input_ids"], long["input_ids"])]
    assert session.cache.lengths.tolist() == [lengths[0], 0, lengths[1], 0]  # each slot its own length
    session.bucket = 4
    tokens = torch.tensor([[5, 6, 7], [1, 1, 1], [8, 9, 10], [1, 1, 1]])
    _, slotted = session.verify(tokens)
    _, own = alone.verify(tokens[2:3])
    torch.testing.assert_close(slotted[2], own[0], rtol=1e-12, atol=1e-12)
    session.commit(torch.tensor([2, 0, 1, 0]), kept=[2, 0, 1, 0])
    alone.commit(torch.tensor([1]))
    session.release([0])
    session.bucket = 4
    _, slotted = session.verify(tokens)
    _, own = alone.verify(tokens[2:3])
    torch.testing.assert_close(slotted[2], own[0], rtol=1e-12, atol=1e-12)


def test_drafter_rows_joined_draft_as_if_alone(targets64):
    """Rows read into slots of the drafter's cache keep their own history: blocks equal the rows
    drafted alone."""
    from flash.sampling import SamplingParams

    target = targets64["qwen2_5_vl"]
    torch.manual_seed(3)
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=3))
    greedy = SamplingParams()
    a_in, b_in = _requests(target, "qwen2_5_vl", 2, seed=10)
    prefills = [target.prefill(x)[1] for x in (a_in, b_in)]
    firsts = [p.last_logits.argmax(-1) for p in prefills]
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, target.hidden_size, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, target.vocab_size, (2, 3), generator=gen)
    n = torch.tensor([2, 3])

    alone = []
    for i in range(2):
        first_block = drafter.start(prefills[i], firsts[i], greedy)
        alone.append((first_block, drafter.step(features[i : i + 1], tokens[i : i + 1], n[i : i + 1], 3, greedy)))
    drafter.start(prefills[0], firsts[0], greedy, slots=[0], num_slots=2)
    joined_first = drafter.start(prefills[1], firsts[1], greedy, join=True, slots=[1], num_slots=2)
    joined = drafter.step(features, tokens, n, 3, greedy)
    torch.testing.assert_close(joined_first.features, alone[1][0].features)
    for i in range(2):
        torch.testing.assert_close(joined.features[i], alone[i][1].features[0])
        assert torch.equal(joined.tokens[i], alone[i][1].tokens[0])


@pytest.mark.parametrize("max_rows", [1, 3, 8])
def test_run_keeps_at_most_max_rows_live_and_is_exact(targets64, max_rows):
    target = targets64["qwen2_5_vl"]
    prompts, videos = _batch("qwen2_5_vl", 7, seed=11)
    alone = [
        hf_greedy(target, target.processor(text=[p], videos=[v], return_tensors="pt"), MAX_NEW)
        for p, v in zip(prompts, videos)
    ]

    def inputs_for(indices):
        assert engine.live + len(indices) <= max_rows
        texts, clips = [prompts[i] for i in indices], [videos[i] for i in indices]
        return target.processor(text=texts, videos=clips, return_tensors="pt", padding=True)

    engine = flash.Engine(target, flash.FlashDrafter.for_target(target), max_new_tokens=MAX_NEW)
    keys = engine.run(len(prompts), inputs_for, max_rows)
    assert [engine.sequences[k] for k in keys] == alone


def _cache_sizes(engine: flash.Engine, drafter, count: int, inputs_for, max_rows: int) -> tuple[list[int], list[int]]:
    """Run the engine; after every cycle, the target cache's width and the drafter's attention span."""
    widths, spans, step = [], [], engine.step

    def measured_step():
        done = step()
        if engine.live:
            cache = engine._slots.session.cache
            widths.append(max(cache.bound[: cache.bucket]))
            if drafter is not None:
                spans.append(drafter.cache.span(0))
        return done

    engine.step = measured_step
    keys = engine.run(count, inputs_for, max_rows)
    assert len({len(engine.sequences[k]) for k in keys}) >= 2  # rows leave in different cycles
    return widths, spans


def test_caches_follow_the_rows_decoding(targets64):
    """Nine rows through two slots: the target's cache drops the columns only finished rows used,
    and the drafter attends over the live rows' entries, so a long continuous run does not get
    slower with every row it has decoded. Plain decoding adds one column a cycle and a row lives at
    most MAX_NEW cycles; without the cropping the cache grows with the whole run."""
    target = targets64["qwen2_5_vl"]
    prompts, videos = _batch("qwen2_5_vl", 9, seed=12)
    longest = max(target.processor(text=[p], videos=[v], return_tensors="pt")["input_ids"].shape[1]
                  for p, v in zip(prompts, videos))  # fmt: skip

    def inputs_for(indices):
        texts, clips = [prompts[i] for i in indices], [videos[i] for i in indices]
        return target.processor(text=texts, videos=clips, return_tensors="pt", padding=True)

    widths, _ = _cache_sizes(flash.Engine(target, None, max_new_tokens=MAX_NEW), None, 9, inputs_for, 2)
    assert max(widths) <= longest + MAX_NEW, max(widths)
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=K))
    _, spans = _cache_sizes(flash.Engine(target, drafter, max_new_tokens=MAX_NEW), drafter, 9, inputs_for, 2)
    # a drafter row holds its prompt rows (its latents are fewer than the visual tokens) and its tokens
    assert max(spans) <= longest + 2 * MAX_NEW, max(spans)
