"""Drafter training: the teacher-forced layout equals what the drafter sees when
decoding, and a few optimisation steps lower the loss."""

from __future__ import annotations

import numpy as np
import torch

import flash
from flash.sampling import SamplingParams
from flash.train import distill_example, drafter_loss
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


def test_training_layout_matches_decoding(targets64):
    """With refinement off and no noise, the training pass predicts exactly the
    features the drafter drafts at the first answer position."""
    target = targets64["qwen2_5_vl"]
    torch.manual_seed(0)
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=4, refine=False))
    inputs, answer, ex = _example(target)
    ex.features = ex.features.to(torch.float64)

    _, prefill = target.prefill(inputs)
    block = drafter.start(prefill, torch.tensor([answer[0]]), SamplingParams())

    captured = {}
    original = drafter.norm.forward
    drafter.norm.forward = lambda h: captured.setdefault("h", original(h))
    drafter_loss(drafter, ex, noise=0.0)
    predicted = captured["h"]
    # Row 0 of the trainable rows is the last prompt row; its slots follow all rows' slot-0s.
    n_train = len(answer)  # rows from answer_start-1 to L-2
    first_block = torch.cat([predicted[:1], predicted[n_train : n_train + 3]])
    assert torch.allclose(first_block, block.features[0], atol=1e-9)


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
