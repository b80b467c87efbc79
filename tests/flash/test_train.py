"""Drafter training: the teacher-forced layout equals what the drafter sees when
decoding, and a few optimisation steps lower the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flash
from flash.sampling import SamplingParams
from flash.train import distill_example, drafter_loss, teacher_forced
from tests.helpers import chat, hf_greedy


def _example(target, frames=4, max_new=12):
    video = np.random.RandomState(5).randint(0, 256, (frames, 56, 56, 3), dtype=np.uint8)
    inputs = target.processor(
        text=[chat("qwen2_5_vl", "describe the video", "video")], videos=[video], return_tensors="pt"
    )
    answer = hf_greedy(target, inputs, max_new)
    # A random model may emit a video placeholder; keep the answer plain text for the full-forward check.
    while any(t in target.visual_token_ids for t in answer):
        answer = answer[: min(i for i, t in enumerate(answer) if t in target.visual_token_ids)]
    assert len(answer) >= 4
    return inputs, answer, distill_example(target, inputs, answer)


def test_distill_features_equal_a_full_forward(targets64):
    target = targets64["qwen2_5_vl"]
    inputs, answer, ex = _example(target)
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
    types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(answer), dtype=torch.int32)], 1)
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types)
    target.model.model.rope_deltas = None
    with torch.inference_mode():
        hidden = target.model.model(**full).last_hidden_state
    assert torch.allclose(ex.features, hidden[0].float(), atol=1e-5)
    assert ex.answer_start == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("refine", [True, False])
def test_training_pass_equals_decoding(targets64, refine):
    """The teacher-forced pass predicts exactly the features the drafter drafts,
    for the block start() drafts after the prompt and the block step() drafts
    after a fully accepted cycle, refinement included: the answer the pass is
    forced on is made of the drafter's own tokens, so every slot's previous
    token is the one it saw when drafting."""
    target = targets64["qwen2_5_vl"]
    torch.manual_seed(0)
    k = 4
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=k, refine=refine))
    inputs, answer, _ = _example(target)
    params = SamplingParams()

    session, prefill = target.prefill(inputs)
    first = torch.tensor([answer[0]])
    block0 = drafter.start(prefill, first, params)
    features, _ = session.verify(torch.cat([first.unsqueeze(1), block0.tokens], dim=1))  # all accepted
    bonus = answer[1]
    next_tokens = torch.cat([block0.tokens, torch.tensor([[bonus]])], dim=1)
    block1 = drafter.step(features, next_tokens, torch.tensor([k + 1]), k + 1, params)

    forced = [answer[0], *block0.tokens[0].tolist(), bonus, *block1.tokens[0].tolist()[:-1]]
    assert not any(t in target.visual_token_ids for t in forced)
    ex = distill_example(target, inputs, forced)
    ex.features = ex.features.to(torch.float64)
    tf = teacher_forced(drafter, ex)
    for row, block in ((ex.answer_start - 1, block0), (ex.answer_start + k, block1)):
        mine = tf.predicted[tf.row == row]
        order = tf.slot[tf.row == row].argsort()
        assert len(order) == k
        assert torch.allclose(mine[order], block.features[0], atol=1e-9), f"block at row {row}"


def test_a_few_steps_lower_the_loss(targets64):
    target = targets64["qwen2_5_vl"]
    torch.manual_seed(0)
    drafter = flash.FlashDrafter.for_target(target)
    drafter.train()
    _, _, ex = _example(target, max_new=16)
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = drafter_loss(drafter, ex, noise=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # The frozen target was not touched.
    assert all(p.grad is None for p in target.model.parameters())
