"""The drafter's KV cache: preallocated buffers with one length per row.

A forward pass writes its new keys/values at each row's own length (rows may
have committed different numbers of tokens), attends over the committed
prefix plus the valid new entries, and `commit` then moves each row's length
past the entries worth keeping. Rolling back is not moving the length: the
unkept entries are simply overwritten by the next pass (gpt-fast's idea, per
row).
"""

from __future__ import annotations

import torch
import torch._dynamo


def write_at_lengths(
    keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store k, v [B, H, T, D] in keys, values [B, H, C, D] at columns lengths[b] .. lengths[b] + T - 1
    of each row b, in place: the one write of every per-row-length cache (the drafter's, the target's)."""
    batch, heads, width, dim = k.shape
    where = lengths.view(batch, 1, 1, 1) + torch.arange(width, device=k.device).view(1, 1, width, 1)
    where = where.expand(batch, heads, width, dim)
    keys.scatter_(2, where, k)
    values.scatter_(2, where, v)


def static(buffer: torch.Tensor) -> torch.Tensor:
    """Mark a buffer that a captured pass writes in place: CUDA graphs then keep its address
    instead of copying it in and out of every replay."""
    torch._dynamo.mark_static_address(buffer)
    return buffer


def span_bucket(n: int, smallest: int) -> int:
    """The least of smallest x {1, 1.5, 2, 3, 4, 6, ...} that holds n columns: two spans an octave,
    so a captured engine has few graphs, and at most a third of the columns a pass reads are masked."""
    span = smallest
    while span < n:
        span = span * 3 // 2 if span & (span - 1) == 0 else span * 4 // 3
    return span


class SlotLengths:
    """One committed length per slot, the bookkeeping both per-slot caches share (the drafter's
    `DrafterCache`, the target's `flash.kv.TargetCache`): `lengths` [S] on the device, and `bound`,
    the same on the host (exact where the caller knows it, else an upper bound), so a pass is sized
    without a device sync. A pass runs the first `bucket` slots."""

    def _init_lengths(self, num_slots: int, device: torch.device) -> None:
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)  # [S] committed entries
        self.bound = [0] * num_slots
        self.bucket = num_slots

    @property
    def num_slots(self) -> int:
        return len(self.bound)

    def longest(self) -> int:
        """The host's bound on the longest committed length in the bucket."""
        return max(self.bound[: self.bucket], default=0)

    def _index(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, device=self.lengths.device)

    def _commit_lengths(self, n: torch.Tensor, kept: list[int] | int) -> None:
        """Slot s of the bucket keeps n[s] more entries; `kept` is the same on the host, per slot
        (exact) or one bound for all (>= n.max())."""
        self.lengths[: self.bucket] += n
        per_slot = kept if isinstance(kept, list) else [kept] * self.bucket
        for slot, count in enumerate(per_slot):
            self.bound[slot] += count

    def _set_lengths(self, where: torch.Tensor, slots: list[int], lengths: torch.Tensor, host: list[int]) -> None:
        """Slots `slots` (`where` on the device) now hold `lengths` entries (`host`: the same)."""
        self.lengths[where] = lengths
        for slot, n in zip(slots, host):
            self.bound[slot] = n

    def _move_lengths(self, src: list[int], dst: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The lengths of slots `src` go to the free slots `dst`, and `src` is released; returns both
        on the device, for the caller's buffers."""
        where, to = self._index(src), self._index(dst)
        self._set_lengths(to, dst, self.lengths[where], [self.bound[s] for s in src])
        self.release(src)
        return where, to

    def _add_length_slots(self, num_slots: int) -> None:
        extra = num_slots - self.num_slots
        self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(extra)])
        self.bound += [0] * extra

    def release(self, slots: list[int]) -> None:
        """Free slots: their lengths go to 0, so their stale entries are never read again."""
        if slots:
            self.lengths[self._index(slots)] = 0
            for slot in slots:
                self.bound[slot] = 0


class DrafterCache(SlotLengths):
    """Slots [S, H, capacity, hd] per layer with one length per slot; a pass runs the first `bucket`
    slots (the rows the engine keeps there), a prompt is written into free slots (`load`) and a
    finished row's slot is released (`release`): the buffers never move between cycles."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        span_step: int = 1,
    ) -> None:
        """`span_step` > 1 (a captured engine): spans and capacities are `span_bucket`s of it, so
        its passes have few shapes, and the buffers keep their addresses for CUDA graphs."""
        self.span_step = span_step
        capacity = self._round(capacity)
        shape = (batch, heads, capacity, head_dim)
        self.keys = [self._keep(torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        self.values = [self._keep(torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        self._init_lengths(batch, device)
        self.capacity = capacity
        self.pass_span = 0  # set by `begin` before each pass

    def _round(self, columns: int) -> int:
        return columns if self.span_step == 1 else span_bucket(columns, self.span_step)

    def _keep(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer if self.span_step == 1 else static(buffer)

    def begin(self, width: int) -> int:
        """Size the next pass of `width` new entries a slot: room in every slot of the bucket
        (doubling), and the span its attention reads, fixed here on the host (a captured pass reads
        it as a constant, not from the host's lengths). Returns the span."""
        self.pass_span = self.span(width)
        self._grow(self.pass_span)
        return self.pass_span

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        new_capacity = self._round(max(need, 2 * self.capacity))
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                grown = buf.new_zeros(buf.shape[0], buf.shape[1], new_capacity, buf.shape[3])
                grown[:, :, : self.capacity] = buf
                store[i] = self._keep(grown)
        self.capacity = new_capacity

    def span(self, width: int) -> int:
        """How many leading entries a pass of `width` new tokens must attend over (a `span_bucket`
        when captured: the columns past the rows' entries are masked)."""
        return self._round(self.longest() + width)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [bucket, H, T, hd] at each slot's length; return all keys/values up to the span
        `begin` fixed."""
        rows, end = self.bucket, self.pass_span
        write_at_lengths(self.keys[layer][:rows], self.values[layer][:rows], self.lengths[:rows], k, v)
        return self.keys[layer][:rows, :, :end], self.values[layer][:rows, :, :end]

    def attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """Boolean mask [bucket, 1, T, span] for new tokens with validity valid [bucket, T].

        Query t of slot b sees the slot's committed entries and the valid new
        entries at or before t.
        """
        batch, width = valid.shape
        span = self.span(width)
        key = torch.arange(span, device=valid.device).view(1, 1, span)  # [1, 1, S]
        start = self.lengths[:batch].view(batch, 1, 1)
        query = torch.arange(width, device=valid.device).view(1, width, 1)  # [1, T, 1]
        rel = key - start  # [B, 1, S] index among the new entries
        new_ok = (rel >= 0) & (rel <= query) & valid.gather(1, rel.clamp(0, width - 1).squeeze(1)).unsqueeze(1)
        # The diagonal keeps padded queries from seeing nothing (their outputs are never read).
        return ((key < start) | new_ok | (rel == query)).unsqueeze(1)

    def commit(self, n: torch.Tensor, n_max: int | list[int]) -> None:
        """Keep the first n[b] new entries of each slot of the bucket; `n_max` is the same on the host,
        per slot (exact) or one bound for all (>= n.max())."""
        self._commit_lengths(n, n_max)

    def load(self, slots: list[int], other: DrafterCache) -> None:
        """Write another cache's rows (in order) into `slots` (more slots are added if needed), each
        with its own length."""
        width = max(other.bound, default=0)
        self._grow(width)
        if max(slots) >= self.num_slots:
            self.add_slots(max(slots) + 1)
        where = self._index(slots)
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[where, :, :width] = theirs[:, :, :width]
        self._set_lengths(where, slots, other.lengths, other.bound)

    def add_slots(self, num_slots: int) -> None:
        """Grow to `num_slots` slots (the buffers are reallocated)."""
        extra = num_slots - self.num_slots
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                store[i] = self._keep(torch.cat([buf, buf.new_zeros(extra, *buf.shape[1:])]))
        self._add_length_slots(num_slots)

    def move(self, src: list[int], dst: list[int]) -> None:
        """Rows in slots `src` move to the free slots `dst` (copied within the same buffers)."""
        where, to = self._move_lengths(src, dst)
        for buf in self.keys + self.values:
            buf[to] = buf[where]
