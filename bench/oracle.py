"""A drafter that knows the answer: it proposes the reference continuation, right for the first m
tokens of each block. Benchmarks use it to fix the acceptance length while measuring costs (the cost
side of FLASH on a random-weight target); tests use it for the always-right / partly-right drafters
every engine must stay lossless with."""

from __future__ import annotations

import torch

from flash.drafter import Block
from flash.sampling import SamplingParams


class SlotReferences:
    """Each slot's reference continuation and how far its row has got, for drafters that know the
    answer. References are handed out in admission order (rows joining later take the next ones)."""

    def __init__(self, references: list[list[int]]) -> None:
        self.all = [list(r) for r in references]
        self.cursor = 0
        self.references: list[list[int] | None] = []  # per slot
        self.positions: list[int] = []

    def admit(self, slots: list[int], join: bool, num_slots: int | None) -> None:
        if not join:
            self.cursor, self.references, self.positions = 0, [], []
        extra = max(num_slots or 0, max(slots) + 1) - len(self.references)
        self.references, self.positions = self.references + [None] * extra, self.positions + [0] * extra
        for slot, ref in zip(slots, self.all[self.cursor : self.cursor + len(slots)]):
            self.references[slot], self.positions[slot] = ref, 1  # the prompt pass emitted reference[0]
        self.cursor += len(slots)

    def advance(self, n_new: torch.Tensor) -> list[int]:
        """The first len(n_new) slots' rows gained n_new tokens; returns those slots."""
        bucket = n_new.shape[0]
        self.positions[:bucket] = [p + n for p, n in zip(self.positions[:bucket], n_new.tolist())]
        return list(range(bucket))

    def token(self, slot: int, i: int) -> int:
        """The reference token i places ahead of the slot's row (0 past its end or in a free slot)."""
        ref, pos = self.references[slot], self.positions[slot]
        return ref[pos + i] if ref is not None and pos + i < len(ref) else 0

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.references[slot] = None

    def move(self, src: list[int], dst: list[int]) -> None:
        for s, d in zip(src, dst):
            self.references[d], self.references[s] = self.references[s], None
            self.positions[d] = self.positions[s]


class OracleDrafter:
    """Proposes the reference continuation; with `right_for=m` only the first m
    tokens of each block are right and the rest are deliberately wrong.
    References are given in admission order (rows joining later take the next ones)."""

    def __init__(self, references: list[list[int]], vocab_size: int, block_size: int = 4, right_for: int | None = None):
        self.slots = SlotReferences(references)
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.right_for = block_size if right_for is None else right_for

    def _block(self, params: SamplingParams, device, block_size, slots: list[int]) -> Block:
        k = block_size or self.block_size
        rows = []
        for slot in slots:
            row = [self.slots.token(slot, i) for i in range(k)]
            rows.append([tok if i < self.right_for else (tok + 1) % self.vocab_size for i, tok in enumerate(row)])
        tokens = torch.tensor(rows, dtype=torch.long, device=device)
        probs = None
        if not params.greedy:
            probs = torch.nn.functional.one_hot(tokens, self.vocab_size).to(torch.float64)
        return Block(tokens=tokens, probs=probs, features=torch.zeros(tokens.shape[0], k, 1))

    def start(
        self, prefill, first_tokens, params, generator=None, block_size=None, seen=None, join=False, slots=None,
        num_slots=None, compile=None,
    ) -> Block:  # fmt: skip
        slots = list(range(first_tokens.shape[0])) if slots is None else slots
        self.slots.admit(slots, join, num_slots)
        return self._block(params, first_tokens.device, block_size, slots)

    def step(self, features, next_tokens, n_new, n_new_max, params, generator=None, block_size=None, seen=None):
        return self._block(params, next_tokens.device, block_size, self.slots.advance(n_new))

    def release(self, slots: list[int]) -> None:
        self.slots.release(slots)

    def move(self, src: list[int], dst: list[int]) -> None:
        self.slots.move(src, dst)
