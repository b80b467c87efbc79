"""Drafter training by self-distillation (DESIGN.md §1.5), framework-free.

The target captions the training videos itself; `distill_example` then runs it
once over prompt + its own answer to record the features. `drafter_loss`
teacher-forces the drafter over the whole answer in one pass: every real row j
predicts f_{j+1} (slot 0), and a block of k-1 slots hangs off each row, slot i
predicting f_{j+1+i}. The block mask lets a slot see the latents, the real rows
up to its own and the earlier slots of its block, which is exactly what it sees
when drafting. Losses: SmoothL1 on features (weight 1.0) and soft cross-entropy
against the target's token distribution through the frozen LM head (0.1).

`draft_vocabulary` picks a reduced draft vocabulary from the self-distillation
set: the tokens the target itself writes most often.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flash.drafter import FlashDrafter
from flash.target import Target


@dataclass
class DistillExample:
    """One self-distilled sequence: the prompt and the target's own answer."""

    input_ids: torch.Tensor  # [L] prompt + answer, no padding
    features: torch.Tensor  # [L, D] target features
    visual_mask: torch.Tensor  # [L] True at image/video tokens
    answer_start: int  # index of the first answer token

    def as_dict(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "features": self.features,
            "visual_mask": self.visual_mask,
            "answer_start": torch.tensor(self.answer_start),
        }

    @classmethod
    def from_dict(cls, d: dict) -> DistillExample:
        return cls(d["input_ids"], d["features"], d["visual_mask"], int(d["answer_start"]))


@torch.inference_mode()
def distill_example(target: Target, inputs, answer: list[int]) -> DistillExample:
    """Features of the target over prompt (batch of one) + its answer tokens."""
    session, prefill = target.prefill(inputs)
    prompt_len = prefill.input_ids.shape[1]
    if answer:
        features, _ = session.verify(torch.tensor([answer], device=target.device))
        all_features = torch.cat([prefill.features, features], dim=1)
    else:
        all_features = prefill.features
    ids = torch.cat([prefill.input_ids[0], torch.tensor(answer, dtype=torch.long, device=target.device)])
    visual = torch.cat([prefill.visual_mask[0], torch.zeros(len(answer), dtype=torch.bool, device=target.device)])
    return DistillExample(ids.cpu(), all_features[0].float().cpu(), visual.cpu(), prompt_len)


def _layout(example: DistillExample, n_latents: int, k: int):
    """Positions, rows and the block mask for one teacher-forced pass.

    Returns (text_index [R], train_rows [N] (indices into text rows), slot_row [S], slot_i [S],
    positions [T], mask [T, T]) with T = n_latents + R + S.
    """
    length = example.input_ids.shape[0]
    text = (~example.visual_mask).nonzero().flatten()
    text = text[text < length - 1]  # a row needs the token after it
    n_rows = text.shape[0]
    trainable = (text >= example.answer_start - 1).nonzero().flatten()  # rows that draft the answer
    slot_row, slot_i = [], []
    for r in trainable.tolist():
        for i in range(1, k):
            if text[r] + 1 + i <= length - 1:
                slot_row.append(r)
                slot_i.append(i)
    slot_row_t = torch.tensor(slot_row, dtype=torch.long)
    slot_i_t = torch.tensor(slot_i, dtype=torch.long)
    n_slots = len(slot_row)
    total = n_latents + n_rows + n_slots
    seq_pos = torch.arange(n_latents + n_rows)
    positions = torch.cat([seq_pos, n_latents + slot_row_t + slot_i_t])
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[: n_latents + n_rows, : n_latents + n_rows] = torch.ones(n_latents + n_rows, n_latents + n_rows).tril().bool()
    for s, (r, i) in enumerate(zip(slot_row, slot_i)):
        q = n_latents + n_rows + s
        mask[q, : n_latents + r + 1] = True  # latents and real rows up to its own
        mask[q, q - (i - 1) : q + 1] = True  # earlier slots of its block, and itself
    return text, trainable, slot_row_t, slot_i_t, positions, mask


@dataclass
class TeacherForced:
    """One teacher-forced drafter pass: predicted features of every slot of every trainable row."""

    predicted: torch.Tensor  # [N, D] drafter features (after the final norm)
    wanted: torch.Tensor  # [N, D] the target's features there
    row: torch.Tensor  # [N] sequence position p of the row whose block the prediction belongs to
    slot: torch.Tensor  # [N] slot i: predicts the feature at p + 1 + i, hence the token at p + 2 + i


def teacher_forced(drafter: FlashDrafter, example: DistillExample, noise: float = 0.0) -> TeacherForced:
    """Run the drafter over a whole self-distilled answer in one pass, as it would draft at every position."""
    config = drafter.config
    k = config.block_size
    param = next(drafter.parameters())
    ids = example.input_ids.to(param.device)
    feats = example.features.to(param.device, param.dtype)
    visual = example.visual_mask.to(param.device)
    noisy = feats + (torch.rand_like(feats) * 2 - 1) * noise if noise > 0 else feats

    latents = drafter.compress(noisy[visual])  # [C, D]
    text, trainable, slot_row, slot_i, positions, mask = _layout(example, latents.shape[0], k)
    text, trainable, slot_row, slot_i = (t.to(param.device) for t in (text, trainable, slot_row, slot_i))
    rows = drafter.fuse_rows(noisy[text].unsqueeze(0), ids[text + 1].unsqueeze(0)).squeeze(0)  # [R, D]
    slots = drafter.slots[slot_i - 1] if slot_i.numel() else rows[:0]
    x = torch.cat([latents, rows, slots], dim=0).unsqueeze(0)  # [1, T, D]
    cache = drafter.new_cache(1, x.shape[1], x)
    hidden = drafter.run_layers(
        x, positions.to(param.device).unsqueeze(0), mask.to(param.device).view(1, 1, *mask.shape), cache
    )[0]

    n_lat, n_rows = latents.shape[0], text.shape[0]
    row_h = hidden[n_lat + trainable]  # slot 0 of each trainable row
    slot_h = hidden[n_lat + n_rows :]
    # Refinement reads the token drafted by the slot before (slot i-1 drafts the token at p + 1 + i);
    # teacher-forced, that is the target's own token there.
    prev_tokens = ids[text[slot_row] + 1 + slot_i]
    slot_h = drafter.slot_hidden(slot_h, prev_tokens)
    predicted = drafter.norm(torch.cat([row_h, slot_h], dim=0))
    wanted_at = torch.cat([text[trainable] + 1, text[slot_row] + 1 + slot_i])
    return TeacherForced(
        predicted=predicted,
        wanted=feats[wanted_at],
        row=torch.cat([text[trainable], text[slot_row]]),
        slot=torch.cat([torch.zeros_like(trainable), slot_i]),
    )


def drafter_loss(
    drafter: FlashDrafter,
    example: DistillExample,
    noise: float = 0.05,
    feature_weight: float = 1.0,
    token_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation loss of one example, and top-1 agreement with the target per slot.

    The soft cross-entropy is taken over the drafter's draft vocabulary (`drafter.head`): with a
    reduced one, the target's distribution restricted to the draft ids and renormalised (the softmax
    of its logits at those ids) against the drafter's over the same ids. Top-1 agreement compares the
    drafted token with the target's argmax over the whole vocabulary.
    """
    tf = teacher_forced(drafter, example, noise)
    feature_loss = F.smooth_l1_loss(tf.predicted, tf.wanted)
    head = drafter.head
    with torch.no_grad():
        target_logits = head.logits(tf.wanted)  # [N, Vd]
        target_probs = torch.softmax(target_logits, dim=-1)
    draft_logits = head.logits(tf.predicted)  # [N, Vd]
    token_loss = -(target_probs * F.log_softmax(draft_logits, dim=-1)).sum(-1).mean()
    loss = feature_weight * feature_loss + token_weight * token_loss

    with torch.no_grad():
        full = head.draft_ids is None
        wanted_tokens = (target_logits if full else drafter.lm_head(tf.wanted)).argmax(-1)  # [N]
        agree = (head.tokens(draft_logits.argmax(-1)) == wanted_tokens).float()
        metrics = {"feature_loss": feature_loss.item(), "token_loss": token_loss.item()}
        for i in range(drafter.config.block_size):
            sel = tf.slot == i
            if sel.any():
                metrics[f"top1_slot{i}"] = agree[sel].mean().item()
    return loss, metrics


def draft_vocabulary(
    examples: Sequence[DistillExample], size: int, eos_ids: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """A draft vocabulary of `size` target ids, ascending: every EOS id, then the tokens of the
    target's own answers, most frequent first; if they are fewer, the most frequent (non-visual)
    prompt tokens, then the lowest remaining ids. Ties go to the lower id.  -> [size]"""
    eos_ids = eos_ids.flatten().cpu().long()
    if not eos_ids.numel() <= size <= vocab_size:
        raise ValueError(
            f"a draft vocabulary needs between {eos_ids.numel()} (the EOS ids) and {vocab_size} tokens, got {size}"
        )
    answers = torch.zeros(vocab_size, dtype=torch.long)
    prompts = torch.zeros(vocab_size, dtype=torch.long)
    for ex in examples:
        ids = ex.input_ids.cpu().long()
        answer, prompt = ids[ex.answer_start :], ids[: ex.answer_start][~ex.visual_mask[: ex.answer_start].cpu()]
        answers += torch.bincount(answer[answer < vocab_size], minlength=vocab_size)
        prompts += torch.bincount(prompt[prompt < vocab_size], minlength=vocab_size)
    # Rank by (tier, -count within the tier, id): tier 0 EOS, 1 answer tokens, 2 prompt tokens, 3 the rest.
    tier = torch.full((vocab_size,), 3, dtype=torch.long)
    tier[prompts > 0] = 2
    tier[answers > 0] = 1
    tier[eos_ids] = 0
    count = torch.where(tier == 1, answers, torch.where(tier == 2, prompts, 0))
    span = int(torch.maximum(answers, prompts).max()) + 1
    key = tier * span + (span - 1 - count)
    chosen = torch.sort(key, stable=True).indices[:size]
    return chosen.sort().values
