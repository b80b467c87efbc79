"""The one draft/verify loop. With no drafter it is plain autoregressive decoding
of the target (each cycle verifies just the last token), so both sides of every
benchmark run the same code.

A cycle, per row: the drafter proposes a block of k tokens; the target scores
[last emitted token, block] in one pass; acceptance keeps the agreed prefix and
adds the bonus token; EOS and max_new_tokens cut the row's tokens wherever they
fall; the target cache keeps the verified prefix; the drafter reads the newly
verified features and drafts again. Finished rows leave the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from flash.acceptance import clip_at_stop, greedy_accept, speculative_accept
from flash.drafter import Block
from flash.policy import BlockPolicy
from flash.sampling import SamplingParams, choose, mark_seen, probabilities, process, seen_ids, seen_through
from flash.target import Prefill, Target


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
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    params = SamplingParams.from_generation_config(
        target.model.generation_config, temperature, top_k, top_p, repetition_penalty
    )
    device = target.device
    stats = DecodeStats()
    eos = target.eos_token_ids
    policy = block_size if isinstance(block_size, BlockPolicy) else None

    t0 = _clock(device)
    session, prefill = target.prefill(inputs)
    # [B, N] ids each row has seen, for the repetition penalty (None: no penalty)
    seen = seen_ids(prefill.input_ids, prefill.attention_mask, target.vocab_size) if params.penalized else None
    first, _ = choose(prefill.last_logits, params, generator, seen)  # [B]
    batch = first.shape[0]
    budget = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    n_kept, finished = clip_at_stop(first.unsqueeze(1), torch.ones_like(budget), eos, budget)
    rows = _Rows(batch)
    stats.row_accepted, stats.row_cycle_count = [0] * batch, [0] * batch
    live = rows.record(first.unsqueeze(1), n_kept, finished, stats)  # one host sync
    stats.prefill_s = _clock(device) - t0
    if live is None:
        return GenerateOutput(rows.sequences, stats)
    budget, last = budget - n_kept, first  # last [B]: newest emitted token, not yet in the target cache
    if seen is not None:
        seen = mark_seen(seen, first.unsqueeze(1), n_kept)
    if len(rows.active) < batch:
        budget, last = budget[live], last[live]
        seen = seen[live] if seen is not None else None
        session.select_rows(live)
        prefill = prefill.select_rows(live)
    block, draft_s = None, 0.0
    pending = _Pending()  # verified rows the drafter has not read yet (after plain cycles)
    if drafter is not None:
        t1 = _clock(device)
        k = policy.choose(last.shape[0]) if policy else block_size
        block = drafter.start(prefill, last, params, generator, max(k, 1) if policy else k, seen=seen)
        if policy and k == 0:
            block = None  # the first cycle runs plain; the drafter has read the prompt
        draft_s = _clock(device) - t1
        stats.draft_s += draft_s
    del prefill

    while True:
        t_verify = _clock(device)
        width = last.shape[0]
        draft = block.tokens if block is not None else last.new_zeros(width, 0)  # [B, k]
        k = draft.shape[1]
        verified = torch.cat([last.unsqueeze(1), draft], dim=1)  # [B, k+1]
        features, logits = session.verify(verified)  # [B, k+1, *]
        context = seen_through(seen, verified) if seen is not None else None  # [B, k+1, N + k+1]
        if params.greedy:
            n_accepted, emitted = greedy_accept(draft, process(logits, params, context).argmax(dim=-1))
        else:
            p = probabilities(logits, params, context)
            q = block.probs if block is not None else p.new_zeros(width, 0, p.shape[-1])
            n_accepted, emitted = speculative_accept(draft, q, p, generator)
        n_emit = n_accepted + 1
        n_kept, finished = clip_at_stop(emitted, n_emit, eos, budget)
        live = rows.record(emitted, n_kept, finished, stats, n_accepted, k)  # one host sync
        t_draft = _clock(device)
        stats.verify_s += t_draft - t_verify
        if policy is not None:
            policy.observe(width, k, draft_s, t_draft - t_verify, rows.last_accepted)
        if live is None:
            break
        # The cache keeps [last, accepted drafts]; the bonus enters with the next verify.
        session.commit(n_emit, kept_max=rows.max_accepted + 1)
        budget = budget - n_kept
        if seen is not None:
            seen = mark_seen(seen, emitted[:, : rows.max_accepted + 1], n_emit)
        if len(rows.active) < width:  # finished rows leave the batch and stop costing compute
            session.select_rows(live)
            budget, features, emitted = budget[live], features[live], emitted[live]
            seen = seen[live] if seen is not None else None
            n_accepted, n_emit = n_accepted[live], n_emit[live]
            pending.select_rows(live)
            if drafter is not None:
                drafter.select_rows(live)
        last = emitted.gather(1, n_accepted.unsqueeze(1)).squeeze(1)  # the bonus token
        if drafter is None:
            continue
        k_next = policy.choose(last.shape[0]) if policy else block_size
        pending.add(features, emitted, n_emit, rows.max_accepted + 1)
        if k_next == 0:  # a plain cycle next: the drafter reads these rows later
            block, draft_s = None, 0.0
            continue
        rows_f, rows_t, rows_n, rows_max = pending.take()
        block = drafter.step(rows_f, rows_t, rows_n, rows_max, params, generator, k_next, seen=seen)
        draft_s = _clock(device) - t_draft
        stats.draft_s += draft_s
    return GenerateOutput(rows.sequences, stats)


class _Pending:
    """Verified rows (features, following tokens, count per row) waiting for the drafter."""

    def __init__(self) -> None:
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []

    def add(self, features: torch.Tensor, tokens: torch.Tensor, n: torch.Tensor, n_max: int) -> None:
        self.chunks.append((features[:, :n_max], tokens[:, :n_max], n, n_max))

    def select_rows(self, rows: torch.Tensor) -> None:
        self.chunks = [(f[rows], t[rows], n[rows], m) for f, t, n, m in self.chunks]

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


class _Rows:
    """Host-side record of what each original row has emitted, and which rows still decode."""

    def __init__(self, batch: int) -> None:
        self.sequences: list[list[int]] = [[] for _ in range(batch)]
        self.active = list(range(batch))  # original index of each row still decoding
        self.max_accepted = 0
        self.last_accepted: list[int] = []

    def record(
        self,
        emitted: torch.Tensor,
        n_kept: torch.Tensor,
        finished: torch.Tensor,
        stats: DecodeStats,
        n_accepted: torch.Tensor | None = None,
        k: int = 0,
    ) -> torch.Tensor | None:
        """Append kept tokens and update stats; return the indices of rows still decoding (None if none)."""
        columns = [emitted, n_kept.unsqueeze(1), finished.to(emitted.dtype).unsqueeze(1)]
        if n_accepted is not None:
            columns.append(n_accepted.unsqueeze(1))
        host = torch.cat(columns, dim=1).tolist()  # the cycle's one device->host sync
        width = emitted.shape[1]
        still = []
        for i, (row, values) in enumerate(zip(self.active, host)):
            keep = values[width]
            self.sequences[row].extend(values[:keep])
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
            for row, a in zip(self.active, accepted):
                stats.row_accepted[row] += a
                stats.row_cycle_count[row] += 1
            self.max_accepted = max(accepted)
            self.last_accepted = accepted
        if not still:
            return None
        self.active = [self.active[i] for i in still]
        return torch.tensor(still, device=emitted.device)
