"""Suffix decoding (Oliaro et al. 2024, arXiv 2411.04975; vLLM's `method: "suffix"`): draft with no
model and no training, from the text the job has already produced.

Two tries of token paths, counted: one over the captions already finished (a `SuffixStore`, shared
by every engine of an actor, bounded, the oldest caption evicted first) and one per row over its own
prompt text and tokens so far. Each cycle, per row, the longest suffix of its text (at most
`max_match` tokens) that occurred before and was followed by something is found in each trie;
from there the proposal follows the most frequent continuation, token by token, while the
estimated probability of the whole path (counts over counts) stays at least `min_prob`, and for at
most `factor` x the match length tokens (a longer match earns a longer guess) and the block size.
Of the two tries' proposals the one with more expected accepted tokens (the sum of its path
probabilities) is drafted. A row with no match drafts nothing: its block is padded with its last
token, which the target rejects unless it repeats, so it decodes plainly.

Proposals are deterministic: for sampling the draft distribution is one-hot and speculative
sampling stays exact. The defaults are vLLM's (tree depth 24, factor 1.0, min_prob 0.1, 10,000
cached requests).

A trie node is [count, {token: child}]: count = the occurrences of its path (within the depth
limit), so count(child) / count(node) estimates how often the path went on with that token.
"""

from __future__ import annotations

from collections import deque

import torch

from flash.drafter import Block
from flash.lookup import _NO_TOKEN, host_block
from flash.sampling import SamplingParams
from flash.target import Prefill


class SuffixTrie:
    """Every substring (up to `depth` tokens) of the sequences added, with its count."""

    def __init__(self, depth: int = 24) -> None:
        self.depth = depth
        self.root: list = [0, {}]
        self.nodes = 0

    def add(self, tokens: list[int], sign: int = 1, open_nodes: list | None = None) -> list:
        """Count the substrings of `tokens` (sign -1: uncount them, dropping nodes that reach 0).
        `open_nodes`: where a sequence added before left off, to extend it; returns the new ones."""
        open_nodes = [] if open_nodes is None else open_nodes
        for t in tokens:
            if t == _NO_TOKEN:
                open_nodes = []
                continue
            nxt = []
            for node in open_nodes + [self.root]:
                child = node[1].get(t)
                if child is None:
                    if sign < 0:
                        continue
                    child = node[1][t] = [0, {}]
                    self.nodes += 1
                child[0] += sign
                if child[0] <= 0:
                    del node[1][t]
                    self.nodes -= 1 + _count_nodes(child)
                    continue
                nxt.append(child)
            open_nodes = nxt[1:] if len(nxt) >= self.depth else nxt
        return open_nodes

    def match(self, context: list[int], longest: int) -> tuple[int, list | None]:
        """The longest suffix of `context` (at most `longest` tokens) found with a continuation:
        (its length, its node); (0, None) if none."""
        for m in range(min(longest, len(context), self.depth - 1), 0, -1):
            node = self.root
            for t in context[len(context) - m :]:
                node = node[1].get(t)
                if node is None:
                    break
            else:
                if node[1]:
                    return m, node
        return 0, None

    @staticmethod
    def follow(node: list, limit: int, min_prob: float) -> tuple[list[int], float]:
        """The most frequent continuation from `node`: at most `limit` tokens while the path's
        estimated probability stays >= min_prob; (tokens, expected accepted tokens)."""
        tokens, prob, expected = [], 1.0, 0.0
        while len(tokens) < limit and node[1]:
            token, child = max(node[1].items(), key=lambda item: item[1][0])
            prob *= child[0] / node[0]
            if prob < min_prob:
                break
            tokens.append(token)
            expected += prob
            node = child
        return tokens, expected


def _count_nodes(node: list) -> int:
    stack, n = [node], 0
    while stack:
        children = stack.pop()[1]
        n += len(children)
        stack.extend(children.values())
    return n


class SuffixStore:
    """The captions an actor has produced, as a `SuffixTrie`, bounded: past `max_sequences`
    captions or `max_nodes` trie nodes the oldest are uncounted."""

    def __init__(self, depth: int = 24, max_sequences: int = 10_000, max_nodes: int = 2_000_000) -> None:
        self.trie = SuffixTrie(depth)
        self.max_sequences, self.max_nodes = max_sequences, max_nodes
        self.sequences: deque[list[int]] = deque()
        self.added = 0  # captions ever added (the cold start is measured against it)

    def add(self, tokens: list[int]) -> None:
        if not tokens:
            return
        self.trie.add(tokens)
        self.sequences.append(list(tokens))
        self.added += 1
        while self.sequences and (len(self.sequences) > self.max_sequences or self.trie.nodes > self.max_nodes):
            self.trie.add(self.sequences.popleft(), sign=-1)


class SuffixDrafter:
    """The drafter protocol of flash.generate over suffix tries (see the module's docstring).
    `store`: the finished captions to draft from (an actor keeps one for its life); each row's
    tokens are added to it when the row finishes (`learn`)."""

    def __init__(
        self,
        store: SuffixStore | None = None,
        block_size: int = 8,
        max_match: int = 16,
        factor: float = 1.0,
        min_prob: float = 0.1,
    ) -> None:
        if block_size < 1 or max_match < 1 or factor <= 0 or not 0 <= min_prob <= 1:
            raise ValueError("need block_size >= 1, max_match >= 1, factor > 0 and 0 <= min_prob <= 1")
        self.store = store if store is not None else SuffixStore()
        self.block_size, self.max_match, self.factor, self.min_prob = block_size, max_match, factor, min_prob
        self.rows: list[_Row | None] = []  # per slot
        self.vocab_size, self.dtype = 0, torch.float32

    def fork(self) -> SuffixDrafter:
        """A drafter for another engine: its own rows, the same store."""
        return SuffixDrafter(self.store, self.block_size, self.max_match, self.factor, self.min_prob)

    def propose(self, row: _Row, k: int) -> tuple[list[int], float]:
        """The row's proposal of at most k tokens and its expected accepted tokens."""
        best: tuple[list[int], float] = ([], 0.0)
        for trie in (self.store.trie, row.trie):
            m, node = trie.match(row.tokens, self.max_match)
            if node is None:
                continue
            limit = min(k, max(1, int(self.factor * m)))
            tokens, expected = SuffixTrie.follow(node, limit, self.min_prob)
            if expected > best[1]:
                best = (tokens, expected)
        return best

    def _block(self, params: SamplingParams, block_size: int | None, device: torch.device, rows: list) -> Block:
        k = block_size or self.block_size
        proposals = [self.propose(row, k)[0] if row is not None else [] for row in rows]
        width = max(1, max(len(p) for p in proposals))
        fill = [
            p[-1] if p else (row.tokens[-1] if row is not None and row.tokens else 0) for p, row in zip(proposals, rows)
        ]
        padded = [p + [f] * (width - len(p)) for p, f in zip(proposals, fill)]
        for row, drafted in zip(rows, padded):
            if row is not None:
                row.proposal = drafted  # the padding is drafted too: the target may accept it
        return host_block(padded, params, self.vocab_size, self.dtype, device)

    def admit(
        self,
        prefill: Prefill,
        first_tokens: torch.Tensor,
        join: bool = False,
        slots: list[int] | None = None,
        num_slots: int | None = None,
    ) -> list[int]:
        """New rows' text into their slots (all others reset unless `join`); returns the slots."""
        ids = prefill.input_ids.masked_fill(prefill.visual_mask, _NO_TOKEN)
        keep = prefill.attention_mask.bool()
        self.vocab_size, self.dtype = prefill.last_logits.shape[-1], prefill.last_logits.dtype
        new = [_Row(row[m].tolist(), int(t), self.store.trie.depth) for row, m, t in zip(ids, keep, first_tokens)]
        slots = list(range(len(new))) if slots is None else slots
        if not join:
            self.rows = []
        self.rows += [None] * (max(num_slots or 0, max(slots) + 1) - len(self.rows))
        for slot, row in zip(slots, new):
            self.rows[slot] = row
        return slots

    def observe(self, next_tokens: torch.Tensor, n_new: torch.Tensor) -> None:
        """The tokens verified since the last step, per slot of the bucket."""
        for row, tokens, n in zip(self.rows, next_tokens.tolist(), n_new.tolist()):
            if row is not None and n:
                if row.proposal:  # greedy acceptance took the part the target agreed with
                    row.accepted += _accepted(row.proposal, tokens[:n])
                    row.proposal = []
                row.extend(tokens[:n])

    def suffix_accepted(self, slot: int, sequence: list[int]) -> int:
        """Accepted tokens this drafter proposed for the finished row in `slot` (`sequence`: its new
        tokens, the last block's included)."""
        row = self.rows[slot]
        if row is None:
            return 0
        tail = sequence[row.generated :]
        return row.accepted + (_accepted(row.proposal, tail) if row.proposal else 0)

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
        compile: str | None = None,  # nothing to capture: proposals are made on the host
    ) -> Block:
        slots = self.admit(prefill, first_tokens, join, slots, num_slots)
        return self._block(params, block_size, first_tokens.device, [self.rows[s] for s in slots])

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
        self.observe(next_tokens, n_new)
        return self._block(params, block_size, next_tokens.device, self.rows[: next_tokens.shape[0]])

    def learn(self, sequences: list[list[int]]) -> None:
        """Finished rows' new tokens, for the store."""
        for tokens in sequences:
            self.store.add(tokens)

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.rows[slot] = None

    def move(self, src: list[int], dst: list[int]) -> None:
        for s, d in zip(src, dst):
            self.rows[d], self.rows[s] = self.rows[s], None


class _Row:
    """A row's text so far (prompt with visual placeholders as _NO_TOKEN, then its tokens) and its own trie."""

    def __init__(self, prompt: list[int], first: int, depth: int) -> None:
        self.trie = SuffixTrie(min(depth, 12))
        self.proposal: list[int] = []  # the last block drafted for it
        self.accepted = 0  # drafted tokens accepted so far
        self.tokens: list[int] = []
        self._open: list = []
        self.generated = 0
        self.extend(prompt + [first])
        self.generated = 1  # new tokens in `tokens` (the prefill's first)

    def extend(self, tokens: list[int]) -> None:
        self.generated += len(tokens)
        self.tokens += tokens
        self._open = self.trie.add(tokens, open_nodes=self._open)


def _accepted(block: list[int], new: list[int]) -> int:
    """Of a verified block, the tokens accepted, from the tokens that followed it (`new`: the
    accepted ones, then the target's own, unless the row stopped inside the block)."""
    agreed = _agreed(block, new)
    return agreed if agreed == len(new) else min(agreed, len(new) - 1)


def _agreed(proposal: list[int], tokens: list[int]) -> int:
    """How many of `proposal` the target's tokens agree with, from the first."""
    n = 0
    for p, t in zip(proposal, tokens):
        if p != t:
            break
        n += 1
    return n


class WithSuffix:
    """A drafter (FLASH) and suffix decoding together: per row and cycle, the block verified is the
    drafter's, or the suffix proposal where that is expected to be accepted further. Both proposals
    are scored every cycle against the tokens the target then produced (greedy acceptance is their
    common prefix), whichever was verified, by how much the suffix proposal promised (the sum of
    its path probabilities, in half-token buckets): the suffix proposal is verified where, at its
    promise, suffix proposals have agreed with the target further than the drafter's blocks on
    the same cycles. Lossless either way: only the target decides."""

    BUCKETS = 16
    SCORE_EVERY = 4  # while suffix proposals win nowhere, they are made (and scored) every 4th cycle only
    EVIDENCE = 8.0  # proposals scored in a bucket before it may choose suffix decoding

    def __init__(self, drafter, suffix: SuffixDrafter, decay: float = 0.995) -> None:
        self.drafter, self.suffix, self.decay = drafter, suffix, decay
        self.block_size = drafter.block_size
        # per promise bucket: [tokens agreed by suffix proposals, by the drafter's blocks, proposals] (decayed)
        self.record = [[0.0, 0.0, 0.0] for _ in range(self.BUCKETS + 1)]
        self.last: list = []  # per slot, the last block: (drafter tokens, suffix tokens, bucket, block if suffix)
        self.accepted_by_suffix: list[int] = []  # per slot: accepted tokens that suffix proposals drafted
        self.cycles = 0

    @property
    def fallback(self):
        return getattr(self.drafter, "fallback", None)

    def fork(self) -> WithSuffix:
        twin = WithSuffix(self.drafter, self.suffix.fork(), self.decay)
        twin.record = self.record  # what is learnt about the proposers is the actor's
        return twin

    def _bucket(self, promise: float) -> int:
        return min(self.BUCKETS, int(promise * 2))

    def _mix(self, block: Block, rows: list, slots: list[int], params: SamplingParams) -> Block:
        width = block.tokens.shape[1]
        ours = block.tokens.tolist()
        mixed, chosen_rows = [], []
        self.cycles += 1
        # proposals cost host time every row and cycle: while they win in no bucket, sample them
        wins = [n >= self.EVIDENCE and s > d for s, d, n in self.record]
        sample = self.cycles % self.SCORE_EVERY == 0 or any(wins)
        for i, (slot, row) in enumerate(zip(slots, rows)):
            proposal, promise = self.suffix.propose(row, width) if row is not None and sample else ([], 0.0)
            bucket = self._bucket(promise)
            chosen = bool(proposal) and wins[bucket]
            mixed.append(proposal + [proposal[-1]] * (width - len(proposal)) if chosen else ours[i])
            if chosen:
                chosen_rows.append(i)
            self.last[slot] = (ours[i], proposal, bucket if proposal else None, mixed[i] if chosen else None)
        if not chosen_rows:
            return block
        tokens = torch.tensor(mixed, dtype=block.tokens.dtype, device=block.tokens.device)
        probs = block.probs
        if probs is not None:
            probs = probs.clone()
            where = torch.tensor(chosen_rows, device=tokens.device)
            probs[where] = torch.nn.functional.one_hot(tokens[where], probs.shape[-1]).to(probs.dtype)
        return Block(tokens=tokens, probs=probs, features=block.features)

    def _score(self, slot: int, new: list[int]) -> None:
        """The last block's proposals against the tokens the target produced after it."""
        if self.last[slot] is None or not new:
            return
        ours, proposal, bucket, chosen_block = self.last[slot]
        self.last[slot] = None
        agreed = _agreed(proposal, new)
        if bucket is not None:
            record = self.record[bucket]
            record[0] = self.decay * record[0] + agreed
            record[1] = self.decay * record[1] + _agreed(ours, new)
            record[2] = self.decay * record[2] + 1
        if chosen_block is not None:
            self.accepted_by_suffix[slot] += _accepted(chosen_block, new)

    def start(self, prefill, first_tokens, params, generator=None, block_size=None, seen=None, join=False,
              slots=None, num_slots=None, compile=None) -> Block:  # fmt: skip
        block = self.drafter.start(
            prefill, first_tokens, params, generator, block_size, seen, join, slots, num_slots, compile
        )
        self.suffix.start(prefill, first_tokens, params, generator, block_size, seen, join, slots, num_slots)
        slots = list(range(first_tokens.shape[0])) if slots is None else slots
        size = len(self.suffix.rows)
        if not join:
            self.last, self.accepted_by_suffix = [], []
        self.last += [None] * (size - len(self.last))
        self.accepted_by_suffix += [0] * (size - len(self.accepted_by_suffix))
        for slot in slots:
            self.last[slot], self.accepted_by_suffix[slot] = None, 0
        return self._mix(block, [self.suffix.rows[s] for s in slots], slots, params)

    def step(self, features, next_tokens, n_new, n_new_max, params, generator=None, block_size=None,
             seen=None) -> Block:  # fmt: skip
        bucket = next_tokens.shape[0]
        for slot, (tokens, n) in enumerate(zip(next_tokens.tolist(), n_new.tolist())):
            if n:
                self._score(slot, tokens[:n])
        block = self.drafter.step(features, next_tokens, n_new, n_new_max, params, generator, block_size, seen)
        self.suffix.observe(next_tokens, n_new)
        return self._mix(block, self.suffix.rows[:bucket], list(range(bucket)), params)

    def learn(self, sequences: list[list[int]]) -> None:
        self.suffix.learn(sequences)

    def suffix_accepted(self, slot: int, sequence: list[int]) -> int:
        pending = self.last[slot]
        if pending is not None and pending[3] is not None:  # the last block was suffix decoding's
            tail = sequence[self.suffix.rows[slot].generated :] if self.suffix.rows[slot] is not None else []
            return self.accepted_by_suffix[slot] + _accepted(pending[3], tail)
        return self.accepted_by_suffix[slot]

    def release(self, slots: list[int]) -> None:
        self.drafter.release(slots)
        self.suffix.release(slots)
        for slot in slots:
            self.last[slot] = None

    def move(self, src: list[int], dst: list[int]) -> None:
        self.drafter.move(src, dst)
        self.suffix.move(src, dst)
        for s, d in zip(src, dst):
            self.last[d], self.last[s] = self.last[s], None
            self.accepted_by_suffix[d], self.accepted_by_suffix[s] = self.accepted_by_suffix[s], 0
