"""Sampling: our warpers equal Hugging Face's, and speculative sampling keeps the
target's distribution (statistical tests with a bound a wrong rule fails)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import flash
from flash.acceptance import speculative_accept
from flash.sampling import SamplingParams, penalize, probabilities, seen_ids, warp_logits
from tests.helpers import FixedDistributionDrafter, chat

# chi-square quantile far in the tail; a correct sampler fails it with probability < 1e-6
CHI2_BOUND = {3: 30.7, 5: 35.9, 8: 41.3}


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over cells with expected count >= 5 (others pooled), and its degrees of freedom."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(0.7),
        SamplingParams(1.0, top_k=3),
        SamplingParams(1.3, top_p=0.8),
        SamplingParams(0.9, top_k=5, top_p=0.6),
    ],
)
def test_warpers_match_hugging_face(params):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hf = TemperatureLogitsWarper(params.temperature)(None, logits)
    if params.top_k:
        hf = TopKLogitsWarper(params.top_k)(None, hf)
    if params.top_p < 1:
        hf = TopPLogitsWarper(params.top_p)(None, hf)
    assert torch.equal(warp_logits(logits, params), hf)


def _emitted_marginals(accept, n=200_000, vocab=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_rows = torch.softmax(torch.randn(k + 1, vocab, generator=g, dtype=torch.float64) * 1.5, -1)
    q_rows = torch.softmax(torch.randn(k, vocab, generator=g, dtype=torch.float64) * 1.5, -1)
    p = p_rows.expand(n, -1, -1)
    q = q_rows.expand(n, -1, -1)
    draft = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).view(n, k)
    n_acc, tokens = accept(draft, q, p, g)
    first = torch.bincount(tokens[:, 0], minlength=vocab).double()
    reached = n_acc >= 1  # the second emitted token exists; it must follow p[1]
    second = torch.bincount(tokens[reached, 1], minlength=vocab).double()
    return [chi2(first, p_rows[0]), chi2(second, p_rows[1])]


def test_speculative_sampling_keeps_target_distribution():
    for stat, dof in _emitted_marginals(lambda d, q, p, g: speculative_accept(d, q, p, generator=g)):
        assert stat < CHI2_BOUND[dof], (stat, dof)


def test_distribution_test_catches_wrong_acceptance():
    """Prove the bound bites: accepting with min(1, q/p) instead of p/q must fail it."""

    def wrong(draft, q, p, g):
        return speculative_accept(draft, p[:, : draft.shape[1]], torch.cat([q, p[:, -1:]], 1), generator=g)

    def always_accept(draft, q, p, g):
        return speculative_accept(draft, q, q.new_ones(q.shape[0], q.shape[1] + 1, q.shape[2]) * 1e9, generator=g)

    for broken in (wrong, always_accept):
        stats = _emitted_marginals(broken)
        assert any(stat > CHI2_BOUND[dof] for stat, dof in stats)


def two_token_law(target, params: SamplingParams, n: int = 1500, text: str = "describe the video"):
    """n copies of one prompt, and the target's exact joint law of its first two tokens [V, V]."""
    inputs = target.processor(text=[chat("qwen2_5_vl", text)] * n, return_tensors="pt")
    one = {k: v[:1] for k, v in inputs.items()}
    with torch.inference_mode():
        p1 = probabilities(target.model(**one).logits[0, -1], params)
        joint = torch.zeros(target.vocab_size, target.vocab_size, dtype=torch.float64)
        for t1 in torch.nonzero(p1).flatten().tolist():
            ids = torch.cat([one["input_ids"], torch.tensor([[t1]])], 1)
            logits2 = target.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            joint[t1] = p1[t1] * probabilities(logits2, params)
    return inputs, joint


def assert_two_token_law(sequences: list[list[int]], joint: torch.Tensor) -> torch.Tensor:
    """The first two tokens of the sequences follow `joint` [V, V] (chi-square; never outside its
    support). Returns the counts."""
    counts = torch.zeros_like(joint)
    for seq in sequences:
        counts[seq[0], seq[1]] += 1
    cells = joint > 0
    stat, dof = chi2(counts[cells], joint[cells])
    assert counts[~cells].sum() == 0
    assert stat < CHI2_BOUND.get(dof, 41.3), (stat, dof)
    return counts


def test_generate_sampling_matches_target_distribution(targets64):
    """End to end on a tiny Qwen2.5-VL: the joint law of the first two sampled tokens,
    drawn through flash.generate with a deliberately poor drafter, equals the target's."""
    target = targets64["qwen2_5_vl"]
    params = SamplingParams(temperature=1.0, top_k=3)
    inputs, joint = two_token_law(target, params)

    # q: uniform over every possible second token plus one the target never picks there.
    seconds = torch.nonzero(joint.sum(0)).flatten().tolist()
    never = next(t for t in range(target.vocab_size) if t not in seconds)
    q = torch.zeros(target.vocab_size, dtype=torch.float64)
    q[seconds + [never]] = 1.0 / (len(seconds) + 1)
    drafter = FixedDistributionDrafter(q, block_size=2)
    out = flash.generate(
        target, drafter, inputs, max_new_tokens=2, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1)
    )
    assert 0 < out.stats.accepted < out.stats.drafted  # both branches of acceptance ran
    assert_two_token_law(out.sequences, joint)


def _chi2_bound(dof: int) -> float:
    """The chi-square quantile at 1 - 1e-6 (Wilson-Hilferty), for tables larger than CHI2_BOUND's."""
    z = 4.753
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def test_sampling_with_repetition_penalty_matches_target_distribution(targets64):
    """Sampling under a repetition penalty: the joint law of the first three tokens, through a poor
    drafter with blocks of 2, is the target's with the penalty applied as generate() applies it: the
    prompt's tokens, then each token emitted before (inside a verified block too)."""
    target = targets64["qwen2_5_vl"]
    params = SamplingParams(temperature=1.0, top_k=3, repetition_penalty=3.0)
    n = 3000
    prompt = chat("qwen2_5_vl", "one two three red green blue yellow circle square triangle")
    inputs = target.processor(text=[prompt] * n, return_tensors="pt")
    one = {k: v[:1] for k, v in inputs.items()}
    seen = seen_ids(one["input_ids"], one["attention_mask"], target.vocab_size)[0]  # [L]

    def law(prefix: list[int]) -> torch.Tensor:
        ids = torch.cat([one["input_ids"], torch.tensor([prefix], dtype=torch.long)], 1)
        logits = target.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        return probabilities(logits, params, torch.cat([seen, torch.tensor(prefix, dtype=torch.long)]))

    with torch.inference_mode():
        logits1 = target.model(**one).logits[0, -1]
        p1 = probabilities(logits1, params, seen)
        joint: dict[tuple[int, int, int], float] = {}
        for t1 in torch.nonzero(p1).flatten().tolist():
            p2 = law([t1])
            for t2 in torch.nonzero(p2).flatten().tolist():
                p3 = law([t1, t2])
                for t3 in torch.nonzero(p3).flatten().tolist():
                    joint[(t1, t2, t3)] = float(p1[t1] * p2[t2] * p3[t3])

        # The penalty bites on emitted tokens: the second token's law changes when the first is not penalized.
        bites = 0.0
        for t1 in torch.nonzero(p1).flatten().tolist():
            ids = torch.cat([one["input_ids"], torch.tensor([[t1]])], 1)
            logits2 = target.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            bites += float(p1[t1] * (law([t1]) - probabilities(logits2, params, seen)).abs().sum())
        assert bites > 0.1
    tokens = sorted({t for cell in joint for t in cell})
    never = next(t for t in range(target.vocab_size) if t not in tokens)
    q = torch.zeros(target.vocab_size, dtype=torch.float64)
    q[tokens + [never]] = 1.0 / (len(tokens) + 1)
    out = flash.generate(
        target,
        FixedDistributionDrafter(q, block_size=2),
        inputs,
        max_new_tokens=3,
        temperature=1.0,
        top_k=3,
        repetition_penalty=3.0,
        generator=torch.Generator().manual_seed(2),
    )
    assert 0 < out.stats.accepted < out.stats.drafted
    cells = list(joint)
    counts = torch.zeros(len(cells), dtype=torch.float64)
    index = {cell: i for i, cell in enumerate(cells)}
    for seq in out.sequences:
        assert tuple(seq) in index, seq  # never outside the target's support
        counts[index[tuple(seq)]] += 1
    stat, dof = chi2(counts, torch.tensor([joint[c] for c in cells], dtype=torch.float64))
    assert stat < _chi2_bound(dof), (stat, dof)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_logits_are_processed_in_float32_whatever_the_model_dtype(dtype):
    """As generate() does: probabilities, and so the acceptance draw, are float32 for a bfloat16 model."""
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    for params in (SamplingParams(0.7, top_k=5), SamplingParams(repetition_penalty=1.3)):
        probs = probabilities(logits, params if not params.greedy else SamplingParams(1.0))
        assert probs.dtype == torch.float32
    q = probabilities(logits[:, :2], SamplingParams(1.0))
    p = probabilities(logits, SamplingParams(1.0))
    draft = q.argmax(-1)
    n_accepted, tokens = speculative_accept(draft, q, p, torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 3) and n_accepted.shape == (2,)


def test_penalty_equals_hugging_faces_processor():
    """Gather/scatter at the seen ids, left padding and ids past the LM head ignored, as HF's processor."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 40, generator=gen)
    ids = torch.randint(0, 44, (3, 12), generator=gen)  # some ids past the 40 the head scores
    ids[:, -1] = torch.tensor([3, 39, 0])  # a prompt ends in a real token
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    hf = RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=(mask != 0).int().argmax(dim=1))
    assert torch.equal(penalize(scores, seen_ids(ids, mask, 40), 1.3), hf(ids, scores.clone()))
