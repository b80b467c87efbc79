"""Qwen3.5's linear-attention rollback (flash/hybrid.py) with several threads in one process: a
verify that records its per-position states must not catch another thread's prefill or decode,
and must not slip its token-by-token recurrence into theirs."""

from __future__ import annotations

import threading

import pytest
import torch

import flash
from bench.oracle import OracleDrafter
from tests.helpers import cases, hf_greedy

MAX_NEW = 12
K = 4
ROUNDS = 6
PICKED = (12, 14, 16, 19)  # short prompts: many forwards of each thread overlap the other's


@pytest.fixture(autouse=True)
def _one_torch_thread_each():
    """Each Python thread runs its ops on one core: two intra-op pools on two cores only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _together(*loops) -> list[BaseException]:
    """Run the loops in threads started together; the errors they raised."""
    start, errors = threading.Barrier(len(loops)), []

    def run(loop) -> None:
        start.wait()
        try:
            loop()
        except BaseException as err:  # collected and reported by the test
            errors.append(err)

    threads = [threading.Thread(target=run, args=(loop,)) for loop in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_a_prefill_in_the_middle_of_another_threads_verify(targets64):
    """Deterministic interleaving: one thread is held inside its verify forward pass (between two
    layers) while another thread prefills and runs `model.generate()` on the same model; then the
    verify finishes. Both threads get exactly what they get alone."""
    target = targets64["qwen3_5"]
    first, second = (cases("qwen3_5")[i].inputs(target.processor) for i in PICKED[:2])
    alone = [hf_greedy(target, inputs, MAX_NEW) for inputs in (first, second)]
    block, after = torch.tensor([alone[0][:3]]), torch.tensor([alone[0][2:4]])  # [1, 3], [1, 2]
    _, want_prefill = target.prefill(second)
    session, _ = target.prefill(first)
    with torch.inference_mode():
        _, want = session.verify(block)
        session.commit(torch.tensor([2]))
        _, want_after = session.verify(after)
    inside, resume, seen = threading.Event(), threading.Event(), {}

    def hold(module, args) -> None:
        if threading.get_ident() == seen.get("verifier") and not inside.is_set():
            inside.set()
            resume.wait(timeout=300)

    def verifying() -> None:
        session, _ = target.prefill(first)
        seen["verifier"] = threading.get_ident()  # held from here: inside the verify below
        with torch.inference_mode():
            _, got = session.verify(block)
            session.commit(torch.tensor([2]))
            _, got_after = session.verify(after)
        seen["verify"] = got, got_after

    def meanwhile() -> None:
        try:
            assert inside.wait(timeout=300), "the verify never started"
            seen["prefill"] = target.prefill(second)[1].last_logits
            seen["hf"] = hf_greedy(target, second, MAX_NEW)
        finally:
            resume.set()

    handle = target.model.model.language_model.layers[1].register_forward_pre_hook(hold)
    try:
        errors = _together(verifying, meanwhile)
    finally:
        handle.remove()
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
    assert seen["hf"] == alone[1] and torch.equal(seen["prefill"], want_prefill.last_logits)
    assert torch.equal(seen["verify"][0], want) and torch.equal(seen["verify"][1], want_after)


def test_threads_decoding_one_hybrid_target_each_get_their_own_tokens(targets64):
    """One thread verifies drafted blocks (ragged acceptance: every commit rolls linear states back)
    while another prefills and decodes plainly, through flashcap and through `model.generate()`,
    on the same model object: every output equals the single-thread reference."""
    target = targets64["qwen3_5"]
    picked = [cases("qwen3_5")[i].inputs(target.processor) for i in PICKED[:3]]
    alone = [hf_greedy(target, inputs, MAX_NEW) for inputs in picked]
    drafted, plain = {i: [] for i in range(len(picked))}, {i: [] for i in range(len(picked))}
    hf = {i: [] for i in range(len(picked))}

    def verifying() -> None:
        for r in range(ROUNDS):
            i = r % len(picked)
            oracle = OracleDrafter([alone[i]], target.vocab_size, K, right_for=r % K)
            drafted[i].append(flash.generate(target, oracle, picked[i], max_new_tokens=MAX_NEW).sequences[0])

    def prefilling() -> None:
        for r in range(ROUNDS):
            i = (r + 1) % len(picked)
            plain[i].append(flash.generate(target, None, picked[i], max_new_tokens=MAX_NEW).sequences[0])
            hf[i].append(hf_greedy(target, picked[i], MAX_NEW))

    errors = _together(verifying, prefilling)
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
    for i, ref in enumerate(alone):
        assert drafted[i] and all(out == ref for out in drafted[i]), i
        assert plain[i] and all(out == ref for out in plain[i]), i
        assert hf[i] and all(out == ref for out in hf[i]), i


def test_two_threads_verifying_at_once_stay_exact(targets64):
    """Two sessions verifying blocks concurrently: each commit restores its own rows' states."""
    target = targets64["qwen3_5"]
    picked = [cases("qwen3_5")[i].inputs(target.processor) for i in PICKED[1:]]
    alone = [hf_greedy(target, inputs, MAX_NEW) for inputs in picked]
    outputs: list[list[tuple[int, list[int]]]] = [[], []]

    def verifying(side: int):
        def loop() -> None:
            for r in range(ROUNDS // 2):
                i = (r + side) % len(picked)
                oracle = OracleDrafter([alone[i]], target.vocab_size, K, right_for=(r + side) % K)
                out = flash.generate(target, oracle, picked[i], max_new_tokens=MAX_NEW).sequences[0]
                outputs[side].append((i, out))

        return loop

    errors = _together(verifying(0), verifying(1))
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
    for side in (0, 1):
        assert len(outputs[side]) == ROUNDS // 2
        assert all(out == alone[i] for i, out in outputs[side])


def test_a_recording_verify_leaves_other_calls_to_hugging_face(targets64):
    """Outside a verify, the rule functions are Hugging Face's own: plain `model()` logits are the
    same before and after flashcap has verified on the model."""
    target = targets64["qwen3_5"]
    inputs = cases("qwen3_5")[2].inputs(target.processor)
    with torch.inference_mode():
        before = target.model(**inputs).logits
    session, _ = target.prefill(inputs)
    with torch.inference_mode():
        session.verify(torch.tensor([[5, 6, 7]]))
        session.commit(torch.tensor([2]))
        after = target.model(**inputs).logits
    assert torch.equal(before, after)
