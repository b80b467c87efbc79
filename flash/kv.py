"""The target's KV cache: slots allocated once, one committed length per slot, written in place.

Every full-attention layer holds keys and values [slots, H, capacity, D]. Slot s's committed entries
are its first `lengths[s]` columns, whatever other slots hold. A pass runs the first `bucket` slots
(the engine keeps its rows in the lowest slots): it writes its block at each slot's own length and
attends over the first `span` columns through a 4-D mask (slot s's query t sees columns
j <= lengths[s] + t); `commit` moves each length past what the row kept. Rolling back is not moving
the length: rejected entries are overwritten by the next write, so nothing is concatenated, cropped,
gathered or left as a masked hole. A prompt is written into free slots (`load`), a finished row's
slot is released for the next one (`release`): the buffers never move, which graph capture needs.
Linear-attention layers (Qwen3.5) keep Hugging Face's own layer objects; their per-slot states live
in `flash.hybrid.LinearStates`.

With `span_step` 1 a pass reads exactly the live columns (eager); a captured graph needs few
distinct spans, so the compiled engine rounds them up to `span_bucket`s (the extra columns masked).

Hugging Face's model classes stay as they are: `TargetCache` is a `Cache` whose attention layers
are `_SlotLayer`s, and the model takes the 4-D mask as given.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from flash.cache import SlotLengths, span_bucket, static, write_at_lengths


class _SlotLayer(CacheLayerMixin):
    """One attention layer's buffers; the owning cache knows the lengths, the bucket and the span."""

    is_compileable = True

    def __init__(self, owner: TargetCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.owner, self.keys, self.values = owner, static(keys), static(values)  # [S, H, C, D]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a TargetCache layer is allocated from a prompt, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.owner.write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span, 0

    def get_seq_length(self) -> int:
        return self.owner.span - self.owner.width

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def grow(self, capacity: int, num_slots: int | None = None) -> None:
        for name in ("keys", "values"):
            buf = getattr(self, name)
            grown = buf.new_zeros(num_slots or buf.shape[0], buf.shape[1], capacity, buf.shape[3])
            grown[: buf.shape[0], :, : buf.shape[2]] = buf
            setattr(self, name, static(grown))


class TargetCache(SlotLengths, Cache):
    """The slots' KV cache (see the module docstring). Buffers are allocated by the first `load`."""

    def __init__(self, num_slots: int, linear: list[int], device: torch.device, span_step: int = 1, extra: int = 256):
        """`extra`: columns a slot holds past its prompt (the engine's token budget and a block)."""
        self.linear, self.span_step, self.extra = set(linear), span_step, extra
        self._init_lengths(num_slots, device)
        # The pass in flight, fixed by `begin` on the host (plain ints: all a captured pass reads)
        self.width = 0  # its tokens a slot
        self.span = 0  # the columns it attends over
        super().__init__(layers=[])

    def span_for(self, width: int) -> int:
        """Columns a pass of `width` tokens attends over: every committed entry of the bucket's slots
        and the new ones (rounded up to a `span_bucket` of `span_step` unless it is 1)."""
        need = self.longest() + width
        return need if self.span_step == 1 else span_bucket(need, self.span_step)

    @property
    def capacity(self) -> int:
        return next(layer.keys.shape[2] for layer in self._slots()) if self.layers else 0

    def _slots(self) -> list[_SlotLayer]:
        return [layer for i, layer in enumerate(self.layers) if i not in self.linear]

    def _allocate(self, prompt: DynamicCache, capacity: int) -> None:
        layers = []
        for i, layer in enumerate(prompt.layers):
            if i in self.linear:
                layers.append(layer)  # its states are held per slot by flash.hybrid.LinearStates
                continue
            _, heads, _, dim = layer.keys.shape
            shape = (self.num_slots, heads, capacity, dim)
            buffers = [layer.keys.new_zeros(shape), layer.values.new_zeros(shape)]
            layers.append(_SlotLayer(self, *buffers))
        self.layers = layers

    def load(self, slots: list[int], prompt: DynamicCache, attention_mask: torch.Tensor, rows: torch.Tensor) -> None:
        """Write rows `rows` [n] of a prompt pass's cache into `slots` (attention mask [n, L] of those
        rows, left-padded): row i's tokens, its last lengths[i] columns, become slot slots[i]'s first
        columns."""
        lengths = attention_mask.long().sum(dim=1)  # [n]
        batch, width = attention_mask.shape
        need = width + self.extra
        if self.span_step > 1:  # few distinct capacities: a buffer's shape is part of a captured pass
            need = span_bucket(need, self.span_step)
        if not self.layers:
            self._allocate(prompt, need)
        elif need > self.capacity:
            capacity = max(need, 2 * self.capacity)
            for layer in self._slots():
                layer.grow(capacity)
        # column j of row i takes prompt column (width - lengths[i] + j) mod width: the real tokens first
        source = (torch.arange(width, device=lengths.device).unsqueeze(0) + (width - lengths).unsqueeze(1)) % width
        where = self._index(slots)
        for i, layer in enumerate(self.layers):
            if i in self.linear:
                continue
            for mine, theirs in ((layer.keys, prompt.layers[i].keys), (layer.values, prompt.layers[i].values)):
                theirs = theirs[rows]
                index = source.view(batch, 1, width, 1).expand_as(theirs)
                mine[where, :, :width] = theirs.gather(2, index)
        self._set_lengths(where, slots, lengths, lengths.tolist())

    def add_slots(self, num_slots: int) -> None:
        """More slots (buffers reallocated: an engine without a fixed number of rows grows)."""
        if self.layers:
            capacity = self.capacity
            for layer in self._slots():
                layer.grow(capacity, num_slots)
        self._add_length_slots(num_slots)

    def move(self, src: list[int], dst: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in slots `src` move to the free slots `dst`: their entries are copied within the same
        buffers (only these rows), and `src` is released. Returns `src` and `dst` on the device."""
        where, to = self._move_lengths(src, dst)
        for layer in self._slots():
            layer.keys[to] = layer.keys[where]
            layer.values[to] = layer.values[where]
        return where, to

    def begin(self, width: int) -> torch.Tensor:
        """Prepare a pass of `width` new tokens in each of the first `bucket` slots; returns its mask
        [bucket, 1, width, span], True where query t of slot s may attend (its committed entries and
        the new ones up to t)."""
        self.width, self.span = width, self.span_for(width)
        if self.span > self.capacity:
            capacity = max(self.span, 2 * self.capacity)
            for layer in self._slots():
                layer.grow(capacity)
        device = self.lengths.device
        key = torch.arange(self.span, device=device).view(1, 1, 1, -1)  # [1, 1, 1, S]
        query = torch.arange(width, device=device).view(1, 1, -1, 1)  # [1, 1, T, 1]
        return key <= self.lengths[: self.bucket].view(-1, 1, 1, 1) + query

    def write(self, layer: _SlotLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [bucket, H, T, D] at each slot's length; return the slots' first `span` columns."""
        rows = self.bucket
        lengths = self.lengths[:rows].to(k.device)  # a layer on another GPU than the LM head: its own copy
        write_at_lengths(layer.keys[:rows], layer.values[:rows], lengths, k, v)
        return layer.keys[:rows, :, : self.span], layer.values[:rows, :, : self.span]

    def commit(self, n_kept: torch.Tensor, kept: list[int] | int) -> None:
        """Slot s of the bucket keeps the first n_kept[s] entries of the pass; `kept` is the same on
        the host, per slot (exact) or one bound for all (>= n_kept.max())."""
        self._commit_lengths(n_kept, kept)
        self.width = 0
