"""A reduced draft vocabulary (DrafterConfig.draft_vocab_size, EAGLE-3 style): the drafter proposes
only `draft_ids`, through those rows of the shared LM head, and the output is still the target's."""

from __future__ import annotations

import pytest
import torch

import flash
from flash.drafter import CONFIG_NAME, WEIGHTS_NAME, DraftHead
from flash.sampling import SamplingParams, penalize, probabilities, seen_ids
from flash.train import DistillExample, draft_vocabulary, drafter_loss, teacher_forced
from tests.flash.test_batched import _alone, _batch
from tests.flash.test_drafter import _prefill
from tests.flash.test_generation_config import penalized_first_block
from tests.flash.test_sampling import assert_two_token_law, two_token_law
from tests.helpers import cases, hf_greedy

FAMILIES = ["qwen2_5_vl", "llava_onevision"]
K = 4
MAX_NEW = 24
GREEDY = SamplingParams()


def _subset(target, size: int, seed: int = 0, without: tuple[int, ...] = ()) -> torch.Tensor:
    """`size` random ids of the target's vocabulary, every EOS id among them, none of `without`, ascending."""
    eos = target.eos_token_ids.tolist()
    order = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(seed)).tolist()
    others = [i for i in order if i not in eos and i not in without]
    return torch.tensor(sorted(eos + others[: size - len(eos)]))


def _reduced(target, draft_ids: torch.Tensor, seed: int = 0, **config) -> flash.FlashDrafter:
    torch.manual_seed(seed)
    return flash.FlashDrafter.for_target(target, flash.DrafterConfig(**{"block_size": K, **config}), draft_ids)


# ---------------------------------------------------------------- the head


def test_draft_head_reads_the_rows_and_bias_of_the_lm_head():
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=True, dtype=torch.float64)
    ids = torch.tensor([3, 0, 39, 17, 8])
    draft = DraftHead(head, 40, ids)
    h = torch.randn(2, 3, 16, generator=gen, dtype=torch.float64)
    assert torch.allclose(draft.logits(h), head(h)[..., ids], atol=1e-12)
    assert draft.size == 5 and torch.equal(draft.tokens(torch.tensor([0, 2, 4])), torch.tensor([3, 39, 8]))
    assert draft.weight.requires_grad is False and draft.bias.requires_grad is False
    full = DraftHead(head, 40)
    assert full.size == 40 and torch.equal(full.logits(h), head(h))


def test_penalty_applies_on_the_reduced_logits():
    """Greedy: the argmax over the draft ids of the penalized full logits; sampling: the distribution
    of those logits restricted to the draft ids, zero elsewhere. Seen ids outside the draft vocabulary,
    repeated ids and ids inside it are all in `seen`, and the penalty changes the choice."""
    gen = torch.Generator().manual_seed(1)
    vocab, dim, penalty = 40, 16, 4.0
    head = torch.nn.Linear(dim, vocab, bias=True, dtype=torch.float64)
    ids = torch.tensor(sorted(torch.randperm(vocab, generator=gen)[:15].tolist()))
    outside = [i for i in range(vocab) if i not in ids.tolist()]
    draft = DraftHead(head, vocab, ids)
    h = torch.randn(6, dim, generator=gen, dtype=torch.float64)
    full = head(h).float()  # [B, V], as choose() casts
    top = ids[full[:, ids].argmax(-1)]  # each row's unpenalized draft choice
    seen = torch.stack([top, top, torch.full_like(top, outside[0]), torch.full_like(top, outside[1]), ids[:6]], 1)

    by_hand = full.clone()
    for b in range(full.shape[0]):
        for i in set(seen[b].tolist()):
            v = by_hand[b, i]
            by_hand[b, i] = v * penalty if v < 0 else v / penalty
    params = SamplingParams(repetition_penalty=penalty)
    tokens, probs = draft.choose(h, params, seen=seen)
    assert probs is None
    assert torch.equal(tokens, ids[by_hand[:, ids].argmax(-1)])
    assert (tokens != top).any()  # the penalty bites

    sampling = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=penalty)
    tokens, probs = draft.choose(h, sampling, torch.Generator().manual_seed(0), seen)
    expected = torch.zeros(6, vocab)
    expected[:, ids] = probabilities(by_hand[:, ids], SamplingParams(temperature=0.7, top_k=5))
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.isin(tokens, ids).all()


def test_drafter_proposals_use_the_penalty_on_the_draft_ids(targets64):
    """Each drafted token is draft_ids[argmax] of the penalized logits at the draft ids, earlier slots
    counted as seen (as the full drafter's test in test_generation_config.py)."""
    target = targets64["qwen2_5_vl"]
    ids = _subset(target, 40, seed=1)
    drafter = _reduced(target, ids, block_size=5)
    inputs = target.processor(text=[c.prompt for c in cases("qwen2_5_vl")[17:20]], return_tensors="pt", padding=True)
    _, prefill = target.prefill(inputs)
    block, seen = penalized_first_block(target, drafter, prefill)
    logits = drafter.lm_head(block.features).float()  # [B, k, V]
    context, differs = seen, 0
    for i in range(block.tokens.shape[1]):
        expected = ids[penalize(logits[:, i], context, 3.0)[:, ids].argmax(-1)]
        assert torch.equal(block.tokens[:, i], expected)
        differs += int((ids[logits[:, i, ids].argmax(-1)] != expected).sum())
        context = torch.cat([context, block.tokens[:, i : i + 1]], dim=1)
    assert differs > 0


# ---------------------------------------------------------------- the drafter


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(temperature=0.8, top_k=20),
        SamplingParams(temperature=1.1, top_p=0.9, repetition_penalty=1.3),
    ],
)
@pytest.mark.parametrize("refine", [True, False])
def test_whole_vocabulary_in_id_order_equals_the_full_drafter(targets64, params, refine):
    """draft_ids = 0..V-1: the same blocks as the full drafter, bit for bit (tokens, features, probs)."""
    target = targets64["qwen2_5_vl"]
    full = _reduced(target, None, refine=refine)
    reduced = _reduced(target, torch.arange(target.vocab_size), refine=refine)
    reduced.load_state_dict({**full.state_dict(), "draft_ids": reduced.draft_ids})
    assert reduced.config.draft_vocab_size == target.vocab_size
    _, prefill = _prefill(target)
    first = prefill.last_logits.argmax(-1)
    seen = seen_ids(prefill.input_ids, prefill.attention_mask, target.vocab_size)
    blocks = []
    for drafter in (full, reduced):
        block = drafter.start(prefill, first, params, torch.Generator().manual_seed(3), seen=seen)
        feats = torch.randn(1, 3, target.hidden_size, dtype=target.dtype, generator=torch.Generator().manual_seed(4))
        later = drafter.step(
            feats, block.tokens[:, :3], torch.tensor([3]), 3, params, torch.Generator().manual_seed(5), seen=seen
        )
        blocks.append((block, later))
    for a, b in zip(*blocks):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.features, b.features)
        assert (a.probs is None) == params.greedy and (b.probs is None) == params.greedy
        if not params.greedy:
            assert torch.equal(a.probs, b.probs)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(repetition_penalty=1.7)])
def test_whole_vocabulary_in_another_order_drafts_the_same_tokens(targets64, params):
    """Places in the draft vocabulary map back to target ids (and seen ids map into it) whatever the order."""
    target = targets64["qwen2_5_vl"]
    full = _reduced(target, None)
    shuffled = _reduced(target, torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(2)))
    shuffled.load_state_dict({**full.state_dict(), "draft_ids": shuffled.draft_ids})
    _, prefill = _prefill(target)
    first = prefill.last_logits.argmax(-1)
    seen = seen_ids(prefill.input_ids, prefill.attention_mask, target.vocab_size)
    a = full.start(prefill, first, params, seen=seen)
    b = shuffled.start(prefill, first, params, seen=seen)
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.features, b.features, atol=1e-12)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.5), SamplingParams(1.0, top_k=4)])
def test_draft_tokens_stay_in_the_draft_vocabulary(targets64, params):
    target = targets64["qwen2_5_vl"]
    ids = _subset(target, 12)
    drafter = _reduced(target, ids, block_size=6)
    inputs = target.processor(
        text=[c.prompt for c in cases("qwen2_5_vl")[17:20]] * 8, return_tensors="pt", padding=True
    )
    _, prefill = target.prefill(inputs)
    gen = torch.Generator().manual_seed(0)
    block = drafter.start(prefill, prefill.last_logits.argmax(-1), params, gen)
    blocks = [block]
    for _ in range(3):
        feats = torch.randn(24, 2, target.hidden_size, dtype=target.dtype, generator=gen)
        blocks.append(drafter.step(feats, block.tokens[:, :2], torch.full((24,), 2), 2, params, gen))
    for block in blocks:
        assert block.tokens.shape == (24, 6) and torch.isin(block.tokens, ids).all()
        if not params.greedy:
            assert block.probs.shape == (24, 6, target.vocab_size)
            outside = torch.ones(target.vocab_size, dtype=torch.bool)
            outside[ids] = False
            assert (block.probs[..., outside] == 0).all()
            assert torch.allclose(block.probs.sum(-1), torch.ones(24, 6), atol=1e-6)
    if not params.greedy:
        assert len(set(torch.cat([b.tokens.flatten() for b in blocks]).tolist())) > 1


def test_save_load_round_trips_draft_ids(targets64, tmp_path):
    target = targets64["qwen2_5_vl"]
    ids = _subset(target, 20, seed=5)
    drafter = _reduced(target, ids, num_layers=2)
    drafter.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    loaded = flash.FlashDrafter.from_pretrained(tmp_path, target)
    assert loaded.config == drafter.config and loaded.config.draft_vocab_size == 20
    assert torch.equal(loaded.draft_ids, ids) and torch.equal(loaded.head.draft_ids, ids)
    # The draft ids are saved; the rows of the shared LM head are not.
    keys = set(loaded.state_dict())
    assert "draft_ids" in keys and not any("embed" in k or "lm_head" in k or "head." in k for k in keys)
    _, prefill = _prefill(target)
    first = prefill.last_logits.argmax(-1)
    params = SamplingParams(temperature=1.0)
    a = drafter.start(prefill, first, params, torch.Generator().manual_seed(0))
    b = loaded.start(prefill, first, params, torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)

    # Loading another drafter's state (a training checkpoint) rebuilds the head from its ids.
    other = _reduced(target, _subset(target, 20, seed=6), num_layers=2)
    other.load_state_dict(drafter.state_dict())
    assert torch.equal(other.head.draft_ids, ids) and torch.equal(other.head.weight, target.lm_head.weight[ids])
    c = other.start(prefill, first, params, torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, c.tokens) and torch.equal(a.probs, c.probs)


def test_a_full_vocabulary_drafter_saves_no_draft_ids(targets64, tmp_path):
    target = targets64["qwen2_5_vl"]
    drafter = flash.FlashDrafter.for_target(target)
    assert drafter.draft_ids is None and drafter.config.draft_vocab_size == 0
    assert "draft_ids" not in drafter.state_dict()
    drafter.save_pretrained(tmp_path)
    assert flash.FlashDrafter.from_pretrained(tmp_path, target).draft_ids is None


@pytest.mark.parametrize(
    "config, ids, match",
    [
        (dict(draft_vocab_size=8), None, "needs the draft ids"),
        (dict(draft_vocab_size=8), torch.arange(6), "6 draft ids were given"),
        (dict(), torch.tensor([0, 1, 1, 2]), "distinct"),
        (dict(), torch.tensor([0, 1, 64]), r"in \[0, 64\)"),
        (dict(), torch.arange(65), "exceeds"),
        (dict(draft_vocab_size=-1), None, ">= 0"),
    ],
)
def test_bad_draft_vocabulary_is_refused(targets64, config, ids, match):
    with pytest.raises(ValueError, match=match):
        flash.FlashDrafter.for_target(targets64["qwen2_5_vl"], flash.DrafterConfig(**config), ids)


# ---------------------------------------------------------------- lossless


@pytest.fixture(scope="module")
def references(targets64):
    out = {}
    for family in FAMILIES:
        target = targets64[family]
        rows = []
        for case in cases(family)[::2]:
            inputs = case.inputs(target.processor)
            rows.append((case, inputs, hf_greedy(target, inputs, MAX_NEW)))
        out[family] = rows
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_reduced_drafter_is_exact(targets64, references, family):
    """Greedy, alone: draft ids that leave out some of the target's tokens (which then come only as bonus
    tokens) still give the target's own output; so does the one-pass block."""
    target = targets64[family]
    emitted = sorted({t for _, _, ref in references[family] for t in ref} - set(target.eos_token_ids.tolist()))
    ids = _subset(target, target.vocab_size // 2, without=tuple(emitted[::2]))
    missing = set(emitted) - set(ids.tolist())
    assert missing and any(t in missing for _, _, ref in references[family] for t in ref)
    for drafter in (_reduced(target, ids), _reduced(target, ids, refine=False)):
        for case, inputs, ref in references[family]:
            out = flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW)
            assert out.sequences == [ref], case.name


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_reduced_drafter_is_exact_in_a_batch(targets64, family):
    target = targets64[family]
    prompts, videos = _batch(family, 6, 0)
    alone = _alone(target, prompts, videos)
    inputs = target.processor(text=prompts, videos=videos, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()
    drafter = _reduced(target, _subset(target, 24, seed=3))
    assert flash.generate(target, drafter, inputs, max_new_tokens=20).sequences == alone


def test_reduced_drafter_is_exact_under_the_penalty(targets64):
    """With a repetition penalty the drafter maps seen ids into the draft vocabulary; the output is
    still generate()'s."""
    target = targets64["qwen2_5_vl"]
    drafter = _reduced(target, _subset(target, 32, seed=4))
    changed = 0
    for case in cases("qwen2_5_vl")[1::5]:
        inputs = case.inputs(target.processor)
        with torch.inference_mode():
            out = target.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW, repetition_penalty=1.5)
        ref = out[0, inputs["input_ids"].shape[1] :].tolist()
        eos = set(target.eos_token_ids.tolist())
        ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
        changed += ref != hf_greedy(target, inputs, MAX_NEW)
        mine = flash.generate(target, drafter, inputs, max_new_tokens=MAX_NEW, repetition_penalty=1.5)
        assert mine.sequences == [ref], case.name
    assert changed >= 1


def test_sampling_with_reduced_drafter_matches_target_distribution(targets64):
    """The joint law of the first two sampled tokens through a drafter whose vocabulary leaves out one
    of the tokens the target can emit there (its q is zero, so it comes only from the residual) equals
    the target's (as test_sampling.py's test with a fixed q)."""
    target = targets64["qwen2_5_vl"]
    params = SamplingParams(temperature=1.0, top_k=3)
    inputs, joint = two_token_law(target, params)

    support = sorted(set(torch.nonzero(joint).flatten().tolist()))
    left_out = max(support, key=lambda t: float(joint[:, t].sum() + joint[t].sum()))
    draft_ids = torch.tensor(sorted((set(support) | set(target.eos_token_ids.tolist())) - {left_out}))
    drafter = _reduced(target, draft_ids, block_size=2)
    out = flash.generate(
        target, drafter, inputs, max_new_tokens=2, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1)
    )
    assert 0 < out.stats.accepted < out.stats.drafted  # both branches of acceptance ran
    counts = assert_two_token_law(out.sequences, joint)
    assert counts[left_out].sum() + counts[:, left_out].sum() > 0  # emitted although never drafted


# ---------------------------------------------------------------- choosing the ids, training


def _distill(answer: list[int], prompt: list[int], visual: list[bool] | None = None) -> DistillExample:
    ids = torch.tensor(prompt + answer)
    mask = torch.tensor((visual or [False] * len(prompt)) + [False] * len(answer))
    return DistillExample(ids, torch.zeros(len(ids), 4), mask, len(prompt))


@pytest.mark.parametrize(
    "size, expected",
    [
        (1, [2]),  # the EOS id first
        (3, [2, 5, 7]),  # then answer tokens, most frequent first: 7 (3x), 5 (2x, before 9 by id)
        (5, [2, 5, 7, 8, 9]),  # all answer tokens
        (7, [2, 4, 5, 7, 8, 9, 11]),  # then prompt tokens: 11 (3x), 4 (2x); the visual 6 does not count
        (9, [0, 1, 2, 4, 5, 7, 8, 9, 11]),  # then 1 (1x), then the lowest id left
    ],
)
def test_draft_vocabulary_prefers_answer_tokens(size, expected):
    examples = [
        _distill([7, 5, 9, 7, 2], [11, 4, 6, 6, 6, 6], [False, False, True, True, True, True]),
        _distill([7, 5, 8, 9, 2], [11, 11, 4, 9]),
        _distill([], [1]),
    ]
    ids = draft_vocabulary(examples, size, torch.tensor([2]), vocab_size=16)
    assert ids.tolist() == expected


def test_draft_vocabulary_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="between 2"):
        draft_vocabulary([_distill([1], [3])], 1, torch.tensor([2, 3]), vocab_size=16)
    with pytest.raises(ValueError, match="and 16"):
        draft_vocabulary([_distill([1], [3])], 17, torch.tensor([2]), vocab_size=16)


def test_token_loss_is_over_the_draft_ids(targets64):
    """The soft cross-entropy with a reduced vocabulary: the target's distribution restricted to the
    draft ids and renormalised, against the drafter's over the same ids."""
    from tests.flash.test_train import _example

    target = targets64["qwen2_5_vl"]
    ids = _subset(target, 24, seed=7)
    drafter = _reduced(target, ids)
    _, _, ex = _example(target)
    ex.features = ex.features.to(torch.float64)
    _, metrics = drafter_loss(drafter, ex, noise=0.0)
    tf = teacher_forced(drafter, ex)
    wanted, predicted = target.lm_head(tf.wanted)[:, ids], target.lm_head(tf.predicted)[:, ids]
    p = wanted.exp() / wanted.exp().sum(-1, keepdim=True)
    expected = -(p * predicted.log_softmax(-1)).sum(-1).mean()
    assert metrics["token_loss"] == pytest.approx(expected.item(), rel=1e-9)
    agree = (ids[predicted.argmax(-1)] == target.lm_head(tf.wanted).argmax(-1)).double()
    assert metrics["top1_slot0"] == pytest.approx(agree[tf.slot == 0].mean().item())
