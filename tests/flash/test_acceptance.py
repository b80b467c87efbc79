"""Acceptance functions against hand-written tables."""

from __future__ import annotations

import pytest
import torch

from flash.acceptance import clip_at_stop, greedy_accept, speculative_accept

T = torch.tensor


@pytest.mark.parametrize(
    "draft, target, n_accepted",
    [
        ([5, 6, 7, 8], [5, 6, 7, 8, 9], 4),  # all accepted, bonus 9
        ([1, 6, 7, 8], [5, 6, 7, 8, 9], 0),  # first rejected, bonus 5 replaces it
        ([5, 6, 0, 8], [5, 6, 7, 8, 9], 2),  # rejected mid-block: a later match does not count
        ([5, 6, 7, 0], [5, 6, 7, 8, 9], 3),
    ],
)
def test_greedy_accept_table(draft, target, n_accepted):
    n, tokens = greedy_accept(T([draft]), T([target]))
    assert n.tolist() == [n_accepted]
    assert tokens[0, : n_accepted + 1].tolist() == target[: n_accepted + 1]


def test_greedy_accept_rows_are_independent():
    n, _ = greedy_accept(T([[1, 2], [1, 2], [9, 2]]), T([[1, 2, 3], [1, 0, 3], [1, 2, 3]]))
    assert n.tolist() == [2, 1, 0]


def _one_hot(tokens, vocab=4):
    return torch.nn.functional.one_hot(T(tokens), vocab).to(torch.float64)


def test_speculative_accept_table():
    # q: the drafter's distribution; p: the target's. Draft tokens [0, 1].
    q = T([[[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]], dtype=torch.float64)
    p = T([[[0.25, 0.75, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]], dtype=torch.float64)
    draft = T([[0, 1]])
    # p(0)/q(0) = 0.5, p(1)/q(1) = 0.5
    n, tokens = speculative_accept(draft, q, p, uniform=T([[0.4, 0.4]], dtype=torch.float64))
    assert n.tolist() == [2] and tokens[0].tolist() == [0, 1, 3]  # full accept: bonus from p[2]
    n, tokens = speculative_accept(draft, q, p, uniform=T([[0.6, 0.0]], dtype=torch.float64))
    assert n.tolist() == [0] and tokens[0, 0].item() == 1  # residual max(p-q,0) = only token 1
    n, tokens = speculative_accept(draft, q, p, uniform=T([[0.1, 0.7]], dtype=torch.float64))
    assert n.tolist() == [1] and tokens[0, :2].tolist() == [0, 2]  # residual at slot 1 = only token 2


def test_speculative_accept_with_no_draft_samples_the_target():
    p = _one_hot([[2]])
    n, tokens = speculative_accept(T([[]], dtype=torch.long).view(1, 0), torch.zeros(1, 0, 4, dtype=torch.float64), p)
    assert n.tolist() == [0] and tokens.tolist() == [[2]]


EOS = T([9])


@pytest.mark.parametrize(
    "tokens, n_emitted, budget, n_kept, finished",
    [
        ([1, 2, 3, 4, 5], 5, 100, 5, False),  # nothing to cut
        ([1, 9, 3, 4, 5], 5, 100, 2, True),  # EOS inside the block: kept, rest dropped
        ([1, 2, 3, 9, 5], 3, 100, 3, False),  # EOS beyond the emitted part does not count
        ([1, 2, 3, 4, 5], 5, 3, 3, True),  # max_new_tokens reached inside the block
        ([1, 2, 9, 4, 5], 5, 2, 2, True),  # budget before EOS
        ([1, 2, 9, 4, 5], 5, 3, 3, True),  # EOS exactly at the budget
        ([9, 2, 3, 4, 5], 1, 1, 1, True),
    ],
)
def test_clip_at_stop_table(tokens, n_emitted, budget, n_kept, finished):
    kept, done = clip_at_stop(T([tokens]), T([n_emitted]), EOS, T([budget]))
    assert kept.tolist() == [n_kept] and done.tolist() == [finished]


def test_clip_at_stop_several_eos_ids():
    kept, done = clip_at_stop(T([[1, 7, 9], [1, 2, 3]]), T([3, 3]), T([9, 7]), T([10, 10]))
    assert kept.tolist() == [2, 3] and done.tolist() == [True, False]
