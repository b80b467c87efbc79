"""The one draft/verify loop (`Engine`). With no drafter it is plain
autoregressive decoding of the target (each cycle verifies just the last
token), so both sides of every benchmark run the same code.

A cycle, per row: the drafter proposes a block of k tokens; the target scores
[last emitted token, block] in one pass; acceptance keeps the agreed prefix and
adds the bonus token; EOS and max_new_tokens cut the row's tokens wherever they
fall; the target cache keeps the verified prefix; the drafter reads the newly
verified features and drafts again. Finished rows leave the batch, and new
requests join it between cycles (continuous batching). `generate` is the
engine run over one batch until every row is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from flash.acceptance import clip_at_stop, greedy_accept, speculative_accept
from flash.drafter import Block
from flash.policy import BlockPolicy
from flash.sampling import SamplingParams, choose, mark_seen, probabilities, process, seen_ids, seen_through
from flash.target import Prefill, Target, TargetSession


class Drafter(Protocol):
    """What the loop needs of a drafter (FlashDrafter, or a test's oracle)."""

    block_size: int

    def start(
        self,
        prefill: Prefill,
        first_tokens: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        seen: torch.Tensor | None = None,
        join: bool = False,  # add these rows after the ones decoding (else replace them)
    ) -> Block: ...

    def step(
        self,
        features: torch.Tensor,
        next_tokens: torch.Tensor,
        n_new: torch.Tensor,
        n_new_max: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        seen: torch.Tensor | None = None,
    ) -> Block: ...

    def select_rows(self, rows: torch.Tensor) -> None: ...


@dataclass
class DecodeStats:
    cycles: int = 0  # verify passes after the prompt
    row_cycles: int = 0  # sum over cycles of rows still decoding
    drafted: int = 0  # drafted tokens over all rows
    accepted: int = 0  # drafted tokens the target agreed with, over all rows
    emitted: int = 0  # new tokens kept (prompt token included), over all rows
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill_s: float = 0.0
    accepted_per_cycle: list[list[int]] = field(default_factory=list)  # per cycle, per active row
    row_accepted: list[int] = field(default_factory=list)  # per original row: drafted tokens accepted
    row_cycle_count: list[int] = field(default_factory=list)  # per original row: cycles it took part in

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per row per cycle: accepted + 1 (the bonus)."""
        return (self.accepted + self.row_cycles) / self.row_cycles if self.row_cycles else 0.0

    def row_acceptance_length(self, row: int) -> float:
        cycles = self.row_cycle_count[row]
        return (self.row_accepted[row] + cycles) / cycles if cycles else 0.0

    def as_dict(self) -> dict:
        return {
            "cycles": self.cycles,
            "row_cycles": self.row_cycles,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "emitted": self.emitted,
            "acceptance_length": self.acceptance_length,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "prefill_s": self.prefill_s,
        }


@dataclass
class GenerateOutput:
    sequences: list[list[int]]  # new tokens per row, ending at EOS if produced
    stats: DecodeStats


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class _Live:
    """The rows decoding now, in batch order; every tensor is [B, ...] in that order."""

    session: TargetSession
    keys: list[int]  # the request key of each row
    last: torch.Tensor  # [B] newest emitted token, not yet in the target cache
    budget: torch.Tensor  # [B] new tokens each row may still add
    seen: torch.Tensor | None  # [B, N] ids each row has seen (repetition penalty), None without one
    block: Block | None  # the drafted block the next verify checks; None: a plain cycle
    pending: _Pending
    draft_s: float = 0.0  # seconds of the draft that made `block`

    def select_rows(self, rows: torch.Tensor, keep: list[int]) -> None:
        self.session.select_rows(rows)
        self.keys = [self.keys[i] for i in keep]
        self.budget = self.budget[rows]
        self.seen = self.seen[rows] if self.seen is not None else None
        self.pending.select_rows(rows)


class Engine:
    """The one draft/verify loop, with iteration-level scheduling (continuous batching).

    `admit` prefills a processor batch between cycles and joins its rows to the rows already
    decoding (their KV caches, the drafter's, the penalty state); `step` runs one cycle over
    every live row and returns the keys of the rows that finished in it. Each row's tokens are
    the target's own, whenever it was admitted and whoever it shares cycles with.
    With no drafter every cycle is plain decoding, so both sides of a benchmark run this code.
    """

    def __init__(
        self,
        target: Target,
        drafter: Drafter | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        generator: torch.Generator | None = None,
        block_size: int | BlockPolicy | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.params = SamplingParams.from_generation_config(
            target.model.generation_config, temperature, top_k, top_p, repetition_penalty
        )
        self.target, self.drafter, self.generator = target, drafter, generator
        self.max_new_tokens = max_new_tokens
        self.policy = block_size if isinstance(block_size, BlockPolicy) else None
        self.block_size = None if self.policy else block_size
        self.device, self.eos = target.device, target.eos_token_ids
        self.stats = DecodeStats()
        self.sequences: list[list[int]] = []  # new tokens per request key
        self._live: _Live | None = None
        self._max_accepted = 0
        self._last_accepted: list[int] = []

    @property
    def live(self) -> int:
        """Rows decoding now."""
        return len(self._live.keys) if self._live is not None else 0

    @torch.inference_mode()
    def admit(self, inputs) -> list[int]:
        """Prefill a processor batch and add its rows to the decoding ones; returns their keys.
        Rows that end at their first token are finished at once."""
        t0 = _clock(self.device)
        session, prefill = self.target.prefill(inputs)
        batch = prefill.input_ids.shape[0]
        keys = list(range(len(self.sequences), len(self.sequences) + batch))
        self.sequences += [[] for _ in keys]
        self.stats.row_accepted += [0] * batch
        self.stats.row_cycle_count += [0] * batch
        params = self.params
        seen = seen_ids(prefill.input_ids, prefill.attention_mask, self.target.vocab_size) if params.penalized else None
        first, _ = choose(prefill.last_logits, params, self.generator, seen)  # [B]
        budget = torch.full((batch,), self.max_new_tokens, dtype=torch.long, device=self.device)
        n_kept, finished = clip_at_stop(first.unsqueeze(1), torch.ones_like(budget), self.eos, budget)
        still = self._record(keys, first.unsqueeze(1), n_kept, finished)  # one host sync
        self.stats.prefill_s += _clock(self.device) - t0
        if not still:
            return keys
        budget, last = budget - n_kept, first
        seen = mark_seen(seen, first.unsqueeze(1), n_kept) if seen is not None else None
        if len(still) < batch:
            rows = torch.tensor(still, device=self.device)
            budget, last = budget[rows], last[rows]
            seen = seen[rows] if seen is not None else None
            session.select_rows(rows)
            prefill = prefill.select_rows(rows)
        new = _Live(session, [keys[i] for i in still], last, budget, seen, None, _Pending())
        if self.drafter is not None:
            t1 = _clock(self.device)
            running = self._live
            if running is None:
                k = self.policy.choose(len(still)) if self.policy else self.block_size
            else:  # the new rows join the block the running rows will verify next
                k = running.block.tokens.shape[1] if running.block is not None else 0
            plain = k == 0  # a plain cycle next: the drafter reads the prompt now, drafts later
            joins = running is not None
            block = self.drafter.start(prefill, last, params, self.generator, 1 if plain else k, seen, joins)
            new.block = None if plain else block
            new.draft_s = _clock(self.device) - t1
            self.stats.draft_s += new.draft_s
        self._join(new)
        return keys

    def run(self, count: int, inputs_for: Callable[[list[int]], Any], max_rows: int) -> list[int]:
        """Decode requests 0..count-1 with at most `max_rows` rows live: waiting requests join as
        rows finish, in groups of at least max_rows/4 (one prefill per group; `inputs_for(indices)`
        makes its processor batch). Returns each request's key into `sequences` and the stats."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        queue, keys = list(range(count)), [0] * count
        while queue or self.live:
            free = max_rows - self.live
            if queue and (free >= max(1, max_rows // 4) or not self.live):
                group, queue = queue[:free], queue[free:]
                for request, key in zip(group, self.admit(inputs_for(group))):
                    keys[request] = key
            self.step()
        return keys

    def _join(self, new: _Live) -> None:
        live = self._live
        if live is None:
            self._live = new
            return
        live.session.join(new.session)
        live.keys += new.keys
        live.last = torch.cat([live.last, new.last])
        live.budget = torch.cat([live.budget, new.budget])
        if live.seen is not None:
            live.seen = _cat_ragged(live.seen, new.seen)
        if live.block is not None:
            live.block = _cat_blocks(live.block, new.block)
        live.pending.join(len(new.keys))

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One cycle (verify, accept, draft the next block) over every live row; returns the keys
        of the rows that finished in it."""
        live = self._live
        if live is None:
            return []
        params, drafter, policy = self.params, self.drafter, self.policy
        t_verify = _clock(self.device)
        width = live.last.shape[0]
        draft = live.block.tokens if live.block is not None else live.last.new_zeros(width, 0)  # [B, k]
        k = draft.shape[1]
        verified = torch.cat([live.last.unsqueeze(1), draft], dim=1)  # [B, k+1]
        features, logits = live.session.verify(verified)  # [B, k+1, *]
        context = seen_through(live.seen, verified) if live.seen is not None else None  # [B, k+1, N + k+1]
        if params.greedy:
            n_accepted, emitted = greedy_accept(draft, process(logits, params, context).argmax(dim=-1))
        else:
            p = probabilities(logits, params, context)
            q = live.block.probs if live.block is not None else p.new_zeros(width, 0, p.shape[-1])
            n_accepted, emitted = speculative_accept(draft, q, p, self.generator)
        n_emit = n_accepted + 1
        n_kept, finished = clip_at_stop(emitted, n_emit, self.eos, live.budget)
        still = self._record(live.keys, emitted, n_kept, finished, n_accepted, k)  # one host sync
        t_draft = _clock(self.device)
        self.stats.verify_s += t_draft - t_verify
        if policy is not None:
            policy.observe(width, k, live.draft_s, t_draft - t_verify, self._last_accepted)
        kept = set(still)
        done = [key for i, key in enumerate(live.keys) if i not in kept]
        if not still:
            self._live = None
            return done
        # The cache keeps [last, accepted drafts]; the bonus enters with the next verify.
        live.session.commit(n_emit, kept_max=self._max_accepted + 1)
        live.budget = live.budget - n_kept
        if live.seen is not None:
            live.seen = mark_seen(live.seen, emitted[:, : self._max_accepted + 1], n_emit)
        if len(still) < width:  # finished rows leave the batch and stop costing compute
            rows = torch.tensor(still, device=self.device)
            live.select_rows(rows, still)
            features, emitted, n_accepted, n_emit = features[rows], emitted[rows], n_accepted[rows], n_emit[rows]
            if drafter is not None:
                drafter.select_rows(rows)
        live.last = emitted.gather(1, n_accepted.unsqueeze(1)).squeeze(1)  # the bonus token
        live.block, live.draft_s = None, 0.0
        if drafter is None:
            return done
        k_next = policy.choose(len(still)) if policy else self.block_size
        live.pending.add(features, emitted, n_emit, self._max_accepted + 1)
        if k_next == 0:  # a plain cycle next: the drafter reads these rows later
            return done
        rows_f, rows_t, rows_n, rows_max = live.pending.take()
        live.block = drafter.step(rows_f, rows_t, rows_n, rows_max, params, self.generator, k_next, seen=live.seen)
        live.draft_s = _clock(self.device) - t_draft
        self.stats.draft_s += live.draft_s
        return done

    def _record(
        self,
        keys: list[int],
        emitted: torch.Tensor,
        n_kept: torch.Tensor,
        finished: torch.Tensor,
        n_accepted: torch.Tensor | None = None,
        k: int = 0,
    ) -> list[int]:
        """Append kept tokens and update stats; return the batch indices of rows still decoding."""
        stats = self.stats
        columns = [emitted, n_kept.unsqueeze(1), finished.to(emitted.dtype).unsqueeze(1)]
        if n_accepted is not None:
            columns.append(n_accepted.unsqueeze(1))
        host = torch.cat(columns, dim=1).tolist()  # the cycle's one device->host sync
        width = emitted.shape[1]
        still = []
        for i, (key, values) in enumerate(zip(keys, host)):
            keep = values[width]
            self.sequences[key].extend(values[:keep])
            stats.emitted += keep
            if not values[width + 1]:
                still.append(i)
        if n_accepted is not None:
            accepted = [values[width + 2] for values in host]
            stats.cycles += 1
            stats.row_cycles += len(host)
            stats.drafted += k * len(host)
            stats.accepted += sum(accepted)
            stats.accepted_per_cycle.append(accepted)
            for key, a in zip(keys, accepted):
                stats.row_accepted[key] += a
                stats.row_cycle_count[key] += 1
            self._max_accepted = max(accepted)
            self._last_accepted = accepted
        return still


def _cat_ragged(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack seen-id rows [B1, N1] and [B2, N2]; the shorter repeats its first id (adds nothing)."""
    width = max(a.shape[1], b.shape[1])
    a, b = (torch.cat([x, x[:, :1].expand(-1, width - x.shape[1])], dim=1) for x in (a, b))
    return torch.cat([a, b])


def _cat_blocks(a: Block, b: Block) -> Block:
    """Stack two blocks' rows; a narrower one (prompt lookup proposes up to k) is padded with its last
    token, proposed with certainty, which only the target can accept or reject."""
    width = max(a.tokens.shape[1], b.tokens.shape[1])

    def widen(block: Block) -> Block:
        extra = width - block.tokens.shape[1]
        if extra == 0:
            return block
        pad = block.tokens[:, -1:].expand(-1, extra)
        probs = block.probs
        if probs is not None:
            probs = torch.cat([probs, torch.nn.functional.one_hot(pad, probs.shape[-1]).to(probs.dtype)], dim=1)
        features = torch.cat([block.features, block.features[:, -1:].expand(-1, extra, -1)], dim=1)
        return Block(torch.cat([block.tokens, pad], dim=1), probs, features)

    a, b = widen(a), widen(b)
    probs = torch.cat([a.probs, b.probs]) if a.probs is not None else None
    return Block(torch.cat([a.tokens, b.tokens]), probs, torch.cat([a.features, b.features]))


@torch.inference_mode()
def generate(
    target: Target,
    drafter: Drafter | None,
    inputs,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    generator: torch.Generator | None = None,
    block_size: int | BlockPolicy | None = None,
) -> GenerateOutput:
    """Decode `inputs` (a processor batch) with FLASH; `drafter=None` is plain decoding.

    Tokens are chosen as the target's `model.generate()` would with its generation config
    (repetition penalty, do_sample, temperature, top-k, top-p); a sampling argument that is
    not None overrides the config's (temperature 0: greedy, the penalty still applies).
    block_size: None uses the drafter's k; an int fixes k; a `BlockPolicy` picks k
    per cycle (0 = a plain cycle) from measured acceptance and costs.
    """
    engine = Engine(
        target, drafter, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator, block_size
    )
    engine.admit(inputs)
    while engine.live:
        engine.step()
    return GenerateOutput(engine.sequences, engine.stats)


class _Pending:
    """Verified rows (features, following tokens, count per row) waiting for the drafter."""

    def __init__(self) -> None:
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []

    def add(self, features: torch.Tensor, tokens: torch.Tensor, n: torch.Tensor, n_max: int) -> None:
        self.chunks.append((features[:, :n_max], tokens[:, :n_max], n, n_max))

    def select_rows(self, rows: torch.Tensor) -> None:
        self.chunks = [(f[rows], t[rows], n[rows], m) for f, t, n, m in self.chunks]

    def join(self, count: int) -> None:
        """`count` new rows, with nothing pending, join after the current ones."""
        self.chunks = [
            (torch.cat([f, f.new_zeros(count, *f.shape[1:])]), torch.cat([t, t.new_zeros(count, t.shape[1])]),
             torch.cat([n, n.new_zeros(count)]), m)
            for f, t, n, m in self.chunks
        ]  # fmt: skip

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """All pending rows, left-packed per row: (features [B, T, D], tokens [B, T], n [B], bound on n)."""
        chunks, self.chunks = self.chunks, []
        if len(chunks) == 1:
            return chunks[0]
        features = torch.cat([c[0] for c in chunks], dim=1)
        tokens = torch.cat([c[1] for c in chunks], dim=1)
        valid = torch.cat(
            [torch.arange(c[0].shape[1], device=c[2].device).unsqueeze(0) < c[2].unsqueeze(1) for c in chunks], dim=1
        )
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # valid rows first, in order
        features = features.gather(1, order.unsqueeze(-1).expand_as(features))
        return features, tokens.gather(1, order), valid.sum(dim=1), sum(c[3] for c in chunks)
