"""The one draft/verify loop (`Engine`). With no drafter it is plain
autoregressive decoding of the target (each cycle verifies just the last
token), so both sides of every benchmark run the same code.

A cycle, per row: the drafter proposes a block of k tokens; the target scores
[last emitted token, block] in one pass; acceptance keeps the agreed prefix and
adds the bonus token; EOS and max_new_tokens cut the row's tokens wherever they
fall; the target cache keeps the verified prefix; the drafter reads the newly
verified features and drafts again. Rows live in slots allocated once: a
finished row frees its slot and a new request's prompt is written into a free
one between cycles (continuous batching); a cycle runs the first `bucket`
slots, free ones masked. `generate` is the engine run over one batch until
every row is done.
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
    """What the loop needs of a drafter (FlashDrafter, prompt lookup, or a test's oracle). Rows live
    in slots: `start` reads new rows into `slots` (of `num_slots`), `step` drafts for the first
    `bucket` slots (a free slot reads nothing, its block is never read), `release` frees slots,
    `move` takes rows to lower free slots. A drafter that compiles its steps may say in `fallback`
    why they run eager; one that has `learn(sequences)` is handed the new tokens of rows as they
    finish."""

    block_size: int

    def start(
        self,
        prefill: Prefill,
        first_tokens: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        seen: torch.Tensor | None = None,
        join: bool = False,  # the other slots keep the rows decoding (else they are all reset)
        slots: list[int] | None = None,
        num_slots: int | None = None,
        compile: str | None = None,  # a torch.compile backend for the draft steps (None: eager)
    ) -> Block: ...

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
    ) -> Block: ...

    def release(self, slots: list[int]) -> None: ...

    def move(self, src: list[int], dst: list[int]) -> None: ...  # rows in src go to the free slots dst


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
    row_accepted: dict[int, int] = field(default_factory=dict)  # per request key: drafted tokens accepted
    row_cycle_count: dict[int, int] = field(default_factory=dict)  # per request key: cycles it took part in
    # per request key: accepted tokens that suffix decoding drafted (a drafter with `suffix_accepted`)
    row_suffix: dict[int, int] = field(default_factory=dict)
    record_cycles: bool = True  # keep accepted_per_cycle (a long-lived engine turns it off)

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


MAX_BLOCK = 31  # the room a slot keeps for a verified block, past its token budget


def bucket_for(rows: int, num_slots: int) -> int:
    """The pass size for slots 0..rows-1: the next power of two, at most `num_slots`."""
    return min(num_slots, 1 << max(0, (max(rows, 1) - 1).bit_length()))


def _fit(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """t [B, ...] cut or zero-padded to `rows` rows."""
    if t is None or t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


@dataclass
class _Slots:
    """The rows decoding, by slot: slot s holds request `keys[s]` (None: free). Every tensor covers
    the first `bucket` slots; new rows take the lowest free slots, so the bucket stays small."""

    session: TargetSession
    keys: list[int | None]
    last: torch.Tensor  # [bucket] newest emitted token, not yet in the target cache
    budget: torch.Tensor  # [bucket] new tokens each row may still add (0 in a free slot)
    active: torch.Tensor  # [bucket] the slot holds a row
    seen: torch.Tensor | None = None  # [bucket, N] ids each row has seen (repetition penalty)
    block: Block | None = None  # the drafted block the next verify checks; None: a plain cycle
    pending: _Pending = field(default_factory=lambda: _Pending())
    draft_s: float = 0.0  # seconds of the draft that made `block`

    @property
    def bucket(self) -> int:
        return self.last.shape[0]

    @property
    def live(self) -> list[int]:
        return [slot for slot, key in enumerate(self.keys) if key is not None]

    def free(self, count: int) -> list[int]:
        return [slot for slot, key in enumerate(self.keys) if key is None][:count]

    def fit(self, rows: int) -> None:
        """Cover the first `rows` slots (more: free ones appended; fewer: only free ones dropped)."""
        self.session.bucket = rows
        self.last, self.budget, self.active = _fit(self.last, rows), _fit(self.budget, rows), _fit(self.active, rows)
        self.seen = _fit(self.seen, rows)
        if self.block is not None:
            block = self.block
            self.block = Block(_fit(block.tokens, rows), _fit(block.probs, rows), _fit(block.features, rows))
        self.pending.fit(rows)

    def place(self, slots: list[int], keys: list[int], last, budget, seen) -> None:
        """Put new rows in free `slots` (within the bucket)."""
        where = torch.tensor(slots, device=last.device)
        for slot, key in zip(slots, keys):
            self.keys[slot] = key
        self.last[where], self.budget[where], self.active[where] = last, budget, True
        if seen is not None:
            width = max(self.seen.shape[1] if self.seen is not None else 0, seen.shape[1])
            self.seen = _widen_seen(self.seen if self.seen is not None else seen[:1].expand(self.bucket, -1), width)
            self.seen[where] = _widen_seen(seen, width)
        self.pending.clear(slots, where)

    def move(self, src: list[int], dst: list[int], where: torch.Tensor, to: torch.Tensor) -> None:
        """Rows in slots `src` (`where` on the device) move to the free slots `dst` (`to`), between
        cycles: no block is pending."""
        for s, d in zip(src, dst):
            self.keys[d], self.keys[s] = self.keys[s], None
        for t in (self.last, self.budget, self.active) + ((self.seen,) if self.seen is not None else ()):
            t[to] = t[where]
        self.active[where], self.budget[where] = False, 0
        self.pending.move(src, dst, where, to)

    def place_block(self, slots: list[int], block: Block) -> None:
        """The new rows' first block joins the one the running rows verify next."""
        if self.block is None:
            self.block = Block(*(_fit(t[:0], self.bucket) if t is not None else None for t in (
                block.tokens, block.probs, block.features)))  # fmt: skip
        running, block = _same_width(self.block, block)
        where = torch.tensor(slots, device=block.tokens.device)
        running.tokens[where] = block.tokens
        if running.probs is not None:
            running.probs[where] = block.probs
        running.features[where] = block.features.to(running.features.dtype)
        self.block = running


class Engine:
    """The one draft/verify loop over a fixed set of slots (continuous batching).

    `admit` prefills a processor batch between cycles and writes its rows into free slots (the
    target's KV cache, the drafter's, the penalty state); `step` runs one cycle over the first
    `bucket` slots (the live rows, free slots masked) and returns the keys of the rows that finished
    in it, whose slots are then free. Nothing is gathered or concatenated as rows come and go. Each
    row's tokens are the target's own, whenever it was admitted and whoever it shares cycles with.
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
        max_rows: int | None = None,
        compile: str | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.params = SamplingParams.from_generation_config(
            target.model.generation_config, temperature, top_k, top_p, repetition_penalty
        )
        self.target, self.drafter, self.generator = target, drafter, generator
        self.max_new_tokens, self.max_rows = max_new_tokens, max_rows
        self.fixed_rows = max_rows is not None  # else the slots grow as batches are admitted
        self.compile = compile  # the backend verify passes are compiled with (None: eager)
        self.policy = block_size if isinstance(block_size, BlockPolicy) else None
        self.block_size = None if self.policy else block_size
        self.device, self.eos = target.device, target.eos_token_ids
        self.stats = DecodeStats()
        self.sequences: dict[int, list[int]] = {}  # new tokens per request key (until `pop`)
        self._next_key = 0
        self._finished: list[int] = []  # keys that ended at their first token, for the next `step`
        self._slots: _Slots | None = None
        self._max_accepted = 0
        self._last_accepted: list[int] = []

    @property
    def live(self) -> int:
        """Rows decoding now."""
        return len(self._slots.live) if self._slots is not None else 0

    def pop(self, key: int) -> tuple[list[int], float]:
        """A finished request's tokens and acceptance length, forgotten by the engine (a long-lived
        engine keeps nothing of the rows it has returned)."""
        stats = self.stats
        length = stats.row_acceptance_length(key)
        del stats.row_accepted[key], stats.row_cycle_count[key]
        stats.row_suffix.pop(key, None)
        return self.sequences.pop(key), length

    def _add_slots(self, state: _Slots, need: int) -> None:
        """An engine without `max_rows` grows its slots (doubling) when a batch finds too few free."""
        num_slots = max(need, 2 * len(state.keys))
        state.session.add_slots(num_slots)
        state.keys += [None] * (num_slots - len(state.keys))
        self.max_rows = num_slots

    def _open(self, batch: int) -> _Slots:
        """The slots, allocated once: `max_rows` of them (the first batch's size if unset)."""
        num_slots = self.max_rows or batch
        self.max_rows = num_slots
        zeros = torch.zeros(0, dtype=torch.long, device=self.device)
        extra = self.max_new_tokens + MAX_BLOCK + 1  # a row's tokens and a block fit without growing
        session = self.target.open(num_slots, self.compile, extra)
        return _Slots(session, [None] * num_slots, zeros, zeros, zeros.bool())

    @property
    def compile_status(self) -> dict:
        """{"active": verify passes and draft steps run compiled, "fallback": why not, when compiling
        was asked}."""
        session = self._slots.session if self._slots is not None else None
        if session is None:
            return {"active": bool(self.compile), "fallback": None}
        drafter_fallback = getattr(self.drafter, "fallback", None)
        fallback = session.fallback or (f"draft step: {drafter_fallback}" if drafter_fallback else None)
        return {"active": session.compile is not None and not drafter_fallback, "fallback": fallback}

    @torch.inference_mode()
    def admit(self, inputs) -> list[int]:
        """Prefill a processor batch and write its rows into free slots; returns their keys.
        Rows that end at their first token are finished at once and take no slot."""
        t0 = _clock(self.device)
        prompt, prefill = self.target.prompt(inputs)
        batch = prefill.input_ids.shape[0]
        keys = list(range(self._next_key, self._next_key + batch))
        self._next_key += batch
        for key in keys:
            self.sequences[key] = []
            self.stats.row_accepted[key] = self.stats.row_cycle_count[key] = 0
        params = self.params
        seen = seen_ids(prefill.input_ids, prefill.attention_mask, self.target.vocab_size) if params.penalized else None
        first, _ = choose(prefill.last_logits, params, self.generator, seen)  # [B]
        budget = torch.full((batch,), self.max_new_tokens, dtype=torch.long, device=self.device)
        n_kept, finished = clip_at_stop(first.unsqueeze(1), torch.ones_like(budget), self.eos, budget)
        still = self._record(keys, first.unsqueeze(1), n_kept, finished)  # one host sync
        decoding = set(still)
        self._finished += [key for i, key in enumerate(keys) if i not in decoding]
        if not still:
            self.stats.prefill_s += _clock(self.device) - t0
            return keys
        state = self._slots = self._slots or self._open(batch)
        running = bool(state.live)
        slots = state.free(len(still))
        if len(slots) < len(still):
            if self.fixed_rows:
                raise ValueError(f"{len(still)} new rows, {len(slots)} free slots of max_rows={self.max_rows}")
            self._add_slots(state, len(state.keys) + len(still) - len(slots))
            slots = state.free(len(still))
        state.fit(max(state.bucket, bucket_for(slots[-1] + 1, len(state.keys))))
        state.session.load(slots, prompt, still)
        rows = torch.tensor(still, device=self.device)
        seen = mark_seen(seen, first.unsqueeze(1), n_kept)[rows] if seen is not None else None
        last = first[rows]
        state.place(slots, [keys[i] for i in still], last, (budget - n_kept)[rows], seen)
        self.stats.prefill_s += _clock(self.device) - t0
        if self.drafter is not None:
            self._start_drafter(state, slots, prefill.select_rows(rows), last, seen, running)
        return keys

    def _start_drafter(self, state: _Slots, slots: list[int], prefill: Prefill, last, seen, running: bool) -> None:
        """The drafter reads the new rows' prompts into their slots and drafts their first block."""
        t1 = _clock(self.device)
        if not running:
            k = self.policy.choose(state.bucket) if self.policy else self.block_size
        else:  # the new rows join the block the running rows will verify next
            k = state.block.tokens.shape[1] if state.block is not None else 0
        plain = k == 0  # a plain cycle next: the drafter reads the prompt now, drafts later
        block = self.drafter.start(
            prefill, last, self.params, self.generator, 1 if plain else k, seen, running, slots, len(state.keys),
            self.compile,
        )  # fmt: skip
        if not plain:
            state.place_block(slots, block)
        draft_s = _clock(self.device) - t1
        state.draft_s = state.draft_s + draft_s if running else draft_s
        self.stats.draft_s += draft_s

    def run(self, count: int, inputs_for: Callable[[list[int]], Any], max_rows: int) -> list[int]:
        """Decode requests 0..count-1 with at most `max_rows` rows live: waiting requests join as
        rows finish, in groups of at least max_rows/4 (one prefill per group; `inputs_for(indices)`
        makes its processor batch). Returns each request's key into `sequences` and the stats."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if self._slots is None and not self.fixed_rows:
            self.max_rows, self.fixed_rows = max_rows, True
        max_rows = min(max_rows, self.max_rows)
        queue, keys = list(range(count)), [0] * count
        while queue or self.live:
            free = max_rows - self.live
            if queue and (free >= max(1, max_rows // 4) or not self.live):
                group, queue = queue[:free], queue[free:]
                for request, key in zip(group, self.admit(inputs_for(group))):
                    keys[request] = key
            self.step()
        return keys

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One cycle (verify, accept, draft the next block) over the bucket's slots; returns the keys
        of the rows that finished in it (and of admitted rows that ended at their first token)."""
        state, done = self._slots, self._finished
        self._finished = []
        if state is None or not state.live:
            return done
        t_verify = _clock(self.device)
        bucket = state.bucket
        draft = state.block.tokens if state.block is not None else state.last.new_zeros(bucket, 0)  # [B, k]
        k = draft.shape[1]
        verified = torch.cat([state.last.unsqueeze(1), draft], dim=1)  # [B, k+1]
        features, logits = state.session.verify(verified)  # [B, k+1, *]
        n_accepted, emitted = self._accept(state, draft, verified, logits)
        n_emit = (n_accepted + 1) * state.active  # a free slot emits nothing
        n_kept, finished = clip_at_stop(emitted, n_emit, self.eos, state.budget)
        live = state.live
        still = self._record(state.keys, emitted, n_kept, finished, n_accepted, k)  # one host sync
        t_draft = _clock(self.device)
        self.stats.verify_s += t_draft - t_verify
        if self.policy is not None:
            self.policy.observe(bucket, k, state.draft_s, t_draft - t_verify, self._last_accepted)
        kept = [0] * bucket  # per slot, on the host: what its cache keeps ([last, accepted drafts])
        for slot, a in zip(live, self._last_accepted):
            kept[slot] = a + 1
        state.session.commit(n_emit, kept=kept)
        state.budget = state.budget - n_kept
        if state.seen is not None:
            state.seen = mark_seen(state.seen, emitted[:, : self._max_accepted + 1], n_emit)
        decoding = set(still)
        done += self._release(state, [slot for slot in live if slot not in decoding])
        state.last = emitted.gather(1, n_accepted.unsqueeze(1)).squeeze(1)  # the bonus token
        state.block, state.draft_s = None, 0.0
        if not still:
            return done
        counts = [kept[slot] if slot in decoding else 0 for slot in range(bucket)]
        src, dst, where, to = self._condense(state)
        if src:  # this cycle's verified rows move with their slots
            for t in (features, emitted, n_emit):
                t[to] = t[where]
            for s, d in zip(src, dst):
                counts[d], counts[s] = counts[s], 0
        rows = bucket_for(len(still), len(state.keys))
        state.fit(rows)
        if self.drafter is None:
            return done
        n_emit = n_emit[:rows] * state.active  # rows that finished feed the drafter nothing
        self._draft(state, features[:rows], emitted[:rows], n_emit, counts[:rows], t_draft)
        return done

    def _condense(self, state: _Slots) -> tuple[list[int], list[int], torch.Tensor | None, torch.Tensor | None]:
        """Keep the live rows in the lowest slots: each row above the live count moves into a free
        slot below it (its cache rows are copied within the same buffers), so the bucket follows the
        rows decoding and a finished row stops costing compute. Returns the (from, to) slots, as
        lists and on the device (None when nothing moved)."""
        live = state.live
        holes = [slot for slot in range(len(live)) if state.keys[slot] is None]
        src = [slot for slot in live if slot >= len(live)]
        if not src:
            return src, holes, None, None
        where, to = state.session.move(src, holes)
        state.move(src, holes, where, to)
        if self.drafter is not None:
            self.drafter.move(src, holes)
        return src, holes, where, to

    def _accept(self, state: _Slots, draft, verified, logits) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.params
        context = seen_through(state.seen, verified) if state.seen is not None else None  # [B, k+1, N + k+1]
        if params.greedy:
            return greedy_accept(draft, process(logits, params, context).argmax(dim=-1))
        p = probabilities(logits, params, context)
        q = state.block.probs if state.block is not None else p.new_zeros(draft.shape[0], 0, p.shape[-1])
        return speculative_accept(draft, q, p, self.generator)

    def _release(self, state: _Slots, slots: list[int]) -> list[int]:
        """Free the slots of finished rows; returns their keys."""
        done = [state.keys[slot] for slot in slots]
        if slots:
            for slot in slots:
                state.keys[slot] = None
            where = torch.tensor(slots, device=self.device)
            state.active[where], state.budget[where] = False, 0
            state.pending.clear(slots, where)
            state.session.release(slots)
            if self.drafter is not None:
                suffix_accepted = getattr(self.drafter, "suffix_accepted", None)
                if suffix_accepted is not None:
                    self.stats.row_suffix.update(
                        (key, suffix_accepted(slot, self.sequences[key])) for key, slot in zip(done, slots)
                    )
                self.drafter.release(slots)
                if hasattr(self.drafter, "learn"):  # a drafter that drafts from finished text (suffix)
                    self.drafter.learn([self.sequences[key] for key in done])
        return done

    def _draft(self, state: _Slots, features, emitted, n_emit, counts: list[int], t_draft: float) -> None:
        """Queue the verified rows for the drafter and, unless the next cycle is plain, draft."""
        k_next = self.policy.choose(state.bucket) if self.policy else self.block_size
        state.pending.add(features, emitted, n_emit, counts)
        if k_next == 0:  # a plain cycle next: the drafter reads these rows later
            return
        rows_f, rows_t, rows_n, rows_counts = state.pending.take()
        params, generator = self.params, self.generator
        state.block = self.drafter.step(rows_f, rows_t, rows_n, rows_counts, params, generator, k_next, seen=state.seen)
        state.draft_s = _clock(self.device) - t_draft
        self.stats.draft_s += state.draft_s

    def _record(
        self,
        keys: list[int | None],
        emitted: torch.Tensor,
        n_kept: torch.Tensor,
        finished: torch.Tensor,
        n_accepted: torch.Tensor | None = None,
        k: int = 0,
    ) -> list[int]:
        """Append kept tokens and update stats for the rows with a key (None: a free slot); return
        the indices of rows still decoding."""
        stats = self.stats
        columns = [emitted, n_kept.unsqueeze(1), finished.to(emitted.dtype).unsqueeze(1)]
        if n_accepted is not None:
            columns.append(n_accepted.unsqueeze(1))
        host = torch.cat(columns, dim=1).tolist()  # the cycle's one device->host sync
        width = emitted.shape[1]
        still, accepted = [], []
        for i, (key, values) in enumerate(zip(keys, host)):
            if key is None:
                continue
            keep = values[width]
            self.sequences[key].extend(values[:keep])
            stats.emitted += keep
            if not values[width + 1]:
                still.append(i)
            if n_accepted is not None:
                a = values[width + 2]
                accepted.append(a)
                stats.row_accepted[key] += a
                stats.row_cycle_count[key] += 1
        if n_accepted is not None:
            stats.cycles += 1
            stats.row_cycles += len(accepted)
            stats.drafted += k * len(accepted)
            stats.accepted += sum(accepted)
            if stats.record_cycles:
                stats.accepted_per_cycle.append(accepted)
            self._max_accepted = max(accepted)
            self._last_accepted = accepted
        return still


def _widen_seen(seen: torch.Tensor, width: int) -> torch.Tensor:
    """Seen-id rows [B, N] widened to `width` columns by repeating their first id (adds nothing)."""
    return torch.cat([seen, seen[:, :1].expand(-1, width - seen.shape[1])], dim=1)


def _same_width(a: Block, b: Block) -> tuple[Block, Block]:
    """Two blocks made as wide as the wider; a narrower one (prompt lookup proposes up to k) is padded
    with its last token, proposed with certainty, which only the target can accept or reject."""
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

    return widen(a), widen(b)


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
    compile: str | None = None,
) -> GenerateOutput:
    """Decode `inputs` (a processor batch) with FLASH; `drafter=None` is plain decoding.

    Tokens are chosen as the target's `model.generate()` would with its generation config
    (repetition penalty, do_sample, temperature, top-k, top-p); a sampling argument that is
    not None overrides the config's (temperature 0: greedy, the penalty still applies).
    block_size: None uses the drafter's k; an int fixes k; a `BlockPolicy` picks k
    per cycle (0 = a plain cycle) from measured acceptance and costs. compile: a torch.compile
    backend for the verify passes (None: eager), as `Engine`.
    """
    engine = Engine(
        target, drafter, max_new_tokens, temperature, top_k, top_p, repetition_penalty, generator, block_size,
        compile=compile,
    )  # fmt: skip
    keys = engine.admit(inputs)  # one slot a row
    while engine.live:
        engine.step()
    return GenerateOutput([engine.sequences[k] for k in keys], engine.stats)


class _Pending:
    """Verified rows (features, following tokens, count per slot) waiting for the drafter, over the
    bucket's slots; `counts` is the same count on the host."""

    def __init__(self) -> None:
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]] = []

    def add(self, features: torch.Tensor, tokens: torch.Tensor, n: torch.Tensor, counts: list[int]) -> None:
        width = max(counts, default=0)
        self.chunks.append((features[:, :width], tokens[:, :width], n, list(counts)))

    def fit(self, rows: int) -> None:
        self.chunks = [
            (_fit(f, rows), _fit(t, rows), _fit(n, rows), (c + [0] * rows)[:rows]) for f, t, n, c in self.chunks
        ]

    def clear(self, slots: list[int], where: torch.Tensor) -> None:
        """Slots whose row left (or whose new row has read nothing yet) have nothing pending; `where`
        holds `slots` on the device."""
        for _, _, n, counts in self.chunks:
            n[where] = 0
            for slot in slots:
                counts[slot] = 0

    def move(self, src: list[int], dst: list[int], where: torch.Tensor, to: torch.Tensor) -> None:
        for features, tokens, n, counts in self.chunks:
            for t in (features, tokens, n):
                t[to] = t[where]
            n[where] = 0
            for s, d in zip(src, dst):
                counts[d], counts[s] = counts[s], 0

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """All pending rows, left-packed per slot: (features [B, T, D], tokens [B, T], n [B], n on the host)."""
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
        counts = [sum(per_slot) for per_slot in zip(*(c[3] for c in chunks))]
        return features, tokens.gather(1, order), valid.sum(dim=1), counts
