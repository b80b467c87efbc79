"""One engine for every caller (flash.shared.SharedEngine): a second caller's rows join the slots
the first caller's rows free, each caller gets its own rows' tokens (the target's own, float64),
held rows are left to their caller, and a failure inside the engine fails only the requests in it
and opens a new engine for the rest."""

from __future__ import annotations

import threading

import pytest

import flash
from flash.shared import SharedEngine
from tests.flash.test_batched import _batch
from tests.helpers import hf_greedy

MAX_NEW = 16


@pytest.fixture(scope="module")
def requests(targets64):
    target = targets64["qwen2_5_vl"]
    prompts, videos = _batch("qwen2_5_vl", 8, seed=11)
    inputs = [target.processor(text=[p], videos=[v], return_tensors="pt") for p, v in zip(prompts, videos)]
    return target, inputs, [hf_greedy(target, x, MAX_NEW) for x in inputs]


def _shared(target, max_rows: int, admitted: list | None = None, inputs_for=None, **hooks) -> SharedEngine:
    drafter = flash.FlashDrafter.for_target(target)  # untrained: lossless whatever it proposes

    def make_engine():
        return flash.Engine(target, drafter, max_new_tokens=MAX_NEW, max_rows=max_rows)

    shared = None

    def admit(items):
        if admitted is not None:
            admitted.append(([i for i, _ in items], shared.engine.live))
        return [True] * len(items)

    shared = SharedEngine(make_engine, inputs_for or (lambda items: target.collate([x for _, x in items])), max_rows,
                          admit=hooks.pop("admit", admit), **hooks)  # fmt: skip
    return shared


def test_a_second_callers_rows_join_the_first_callers_run(requests):
    target, inputs, alone = requests
    admitted: list[tuple[list[int], int]] = []
    shared = _shared(target, max_rows=4, admitted=admitted)
    first = shared.submit(list(enumerate(inputs[:4])))
    second = shared.submit(list(enumerate(inputs))[4:])
    shared.wait(first)  # drives until the first caller's rows are done, admitting the second's as slots free
    assert all(r.tokens is not None for r in first)
    joined = [live for items, live in admitted if any(i >= 4 for i in items)]
    assert joined and joined[0] > 0  # the second caller's rows joined while the first's decoded
    shared.wait(second)
    assert [r.tokens for r in first + second] == alone
    assert shared.engines_opened == 1 and not shared.engine.sequences  # nothing kept of returned rows
    assert all(r.seconds > 0 and r.acceptance_length >= 1 for r in first + second)


def test_callers_in_threads_get_their_own_rows(requests):
    target, inputs, alone = requests
    shared = _shared(target, max_rows=3)
    out: dict[int, list] = {}
    calls = [list(enumerate(inputs))[i::2] for i in range(2)]
    threads = [threading.Thread(target=lambda c=c, i=i: out.update({i: shared.decode(c)})) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, call in enumerate(calls):
        assert [r.tokens for r in out[i]] == [alone[j] for j, _ in call]


def test_held_rows_are_left_to_their_caller(requests):
    target, inputs, alone = requests
    shared = _shared(target, max_rows=4, admit=lambda items: [i % 2 == 0 for i, _ in items])
    out = shared.decode(list(enumerate(inputs[:4])))
    assert [r.held for r in out] == [False, True, False, True]
    assert [r.tokens for r in out] == [alone[0], None, alone[2], None]


def test_a_failure_fails_the_rows_in_the_engine_and_a_new_engine_takes_the_rest(requests):
    """The fifth request breaks its prefill while the first four decode: those four and it fail
    (the engine's state is unknown), the hook hears of all five, and the last three decode exactly
    on a new engine."""
    target, inputs, alone = requests
    told: list[tuple[str, list[int]]] = []

    def inputs_for(items):
        if any(i == 4 for i, _ in items):
            raise RuntimeError("a broken input")
        return target.collate([x for _, x in items])

    shared = _shared(target, max_rows=4, inputs_for=inputs_for,
                     failed=lambda err, items: told.append((str(err), sorted(i for i, _ in items))))  # fmt: skip
    out = shared.decode(list(enumerate(inputs)))
    failed = [i for i, r in enumerate(out) if r.error is not None]
    assert told and told[0][0] == "a broken input" and told[0][1] == failed
    assert 4 in failed and all(out[i].tokens == alone[i] for i in range(8) if i not in failed)
    assert len(failed) < 8 and shared.engines_opened == 2
