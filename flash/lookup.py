"""Prompt-lookup drafting in flashcap's loop: a model-free peer for the benchmark.

Prompt lookup decoding (Saxena 2023; Hugging Face's `PromptLookupCandidateGenerator`)
proposes, after the text so far, the tokens that followed the most recent earlier
occurrence of its last n tokens (n from `max_ngram` down to `min_ngram`), in the
prompt or in what was already generated. Hugging Face's version fails on video
prompts in transformers 5.x (it copies video placeholders into its candidates
and then trips over its own placeholder count), so the benchmark's outside peer
runs here instead, through the same draft/verify loop as FLASH: lossless in the
same way, and timed against the same baseline.

Visual placeholders never take part in a match or a proposal. A block is as
wide as the longest match among the rows (at least one token, at most the block
size); rows with shorter matches are padded with their last token, which the
target will almost always reject. Proposals are deterministic, so for sampling
the draft distribution is one-hot and speculative sampling stays exact.
"""

from __future__ import annotations

import torch

from flash.drafter import Block
from flash.sampling import SamplingParams
from flash.target import Prefill

_NO_TOKEN = -1  # stands in for visual placeholders: matches nothing, proposes nothing


def host_block(padded: list[list[int]], params: SamplingParams, vocab_size: int, dtype, device) -> Block:
    """Proposals made on the host (rows padded to one width) as a Block: for sampling, one-hot draft
    distributions (a deterministic proposal), so speculative sampling stays exact; no features."""
    tokens = torch.tensor(padded, dtype=torch.long, device=device)
    probs = torch.nn.functional.one_hot(tokens, vocab_size).to(dtype) if not params.greedy else None
    return Block(tokens=tokens, probs=probs, features=tokens.new_zeros(tokens.shape[0], tokens.shape[1], 0).float())


class PromptLookupDrafter:
    def __init__(self, block_size: int = 4, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if block_size < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError("need block_size >= 1 and 1 <= min_ngram <= max_ngram")
        self.block_size, self.max_ngram, self.min_ngram = block_size, max_ngram, min_ngram
        self.history: list[list[int] | None] = []  # per slot
        self.vocab_size, self.dtype = 0, torch.float32

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            suffix = tokens[-n:]
            if _NO_TOKEN in suffix:
                continue
            for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first, not the suffix itself
                if tokens[start : start + n] == suffix:
                    follow = tokens[start + n : start + n + k]
                    if _NO_TOKEN in follow:
                        follow = follow[: follow.index(_NO_TOKEN)]
                    if follow:
                        return follow
        return []

    def _block(self, params: SamplingParams, block_size: int | None, device: torch.device, history: list) -> Block:
        k = block_size or self.block_size
        proposals = [self.propose(row, k) if row else [] for row in history]
        width = max(1, max(len(p) for p in proposals))
        fill = [p[-1] if p else (row[-1] if row else 0) for p, row in zip(proposals, history)]
        padded = [p + [f] * (width - len(p)) for p, f in zip(proposals, fill)]
        return host_block(padded, params, self.vocab_size, self.dtype, device)

    def start(
        self,
        prefill: Prefill,
        first_tokens: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        seen: torch.Tensor | None = None,
        join: bool = False,
        slots: list[int] | None = None,
        num_slots: int | None = None,
        compile: str | None = None,  # nothing to capture: lookup is host-side
    ) -> Block:
        ids = prefill.input_ids.masked_fill(prefill.visual_mask, _NO_TOKEN)
        keep = prefill.attention_mask.bool()
        self.vocab_size, self.dtype = prefill.last_logits.shape[-1], prefill.last_logits.dtype
        rows = [row[m].tolist() + [int(t)] for row, m, t in zip(ids, keep, first_tokens)]
        slots = list(range(len(rows))) if slots is None else slots
        if not join:
            self.history = []
        self.history += [None] * (max(num_slots or 0, max(slots) + 1) - len(self.history))
        for slot, row in zip(slots, rows):
            self.history[slot] = row
        return self._block(params, block_size, first_tokens.device, rows)  # the block is for these rows

    def step(
        self,
        features: torch.Tensor,
        next_tokens: torch.Tensor,
        n_new: torch.Tensor,
        n_new_max: int | list[int],
        params: SamplingParams,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        seen: torch.Tensor | None = None,
    ) -> Block:
        bucket = next_tokens.shape[0]
        for row, tokens, n in zip(self.history[:bucket], next_tokens.tolist(), n_new.tolist()):
            if row is not None:
                row.extend(tokens[:n])
        return self._block(params, block_size, next_tokens.device, self.history[:bucket])

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.history[slot] = None

    def move(self, src: list[int], dst: list[int]) -> None:
        for s, d in zip(src, dst):
            self.history[d], self.history[s] = self.history[s], None
