"""The target's KV cache: preallocated buffers with one length per row, written in place.

Every full-attention layer holds keys and values [B, H, capacity, D]. Row b's committed entries are
its first `lengths[b]` columns, whatever other rows hold. A verify writes its block at each row's own
length and attends over the first `span` columns through a 4-D mask (row b's query t sees columns
j <= lengths[b] + t); `commit` moves each length past what the row kept. Rolling back is not moving
the length: rejected entries are overwritten by the next write, so nothing is concatenated, cropped
or left as a masked hole. Linear-attention layers (Qwen3.5) keep Hugging Face's own layer objects,
rolled back by `flash.hybrid`.

Hugging Face's model classes stay as they are: `TargetCache` is a `Cache` whose attention layers
are `_RowLayer`s, and the model takes the 4-D mask as given.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from flash.cache import write_at_lengths


class _RowLayer(CacheLayerMixin):
    """One attention layer's buffers; the owning cache knows the lengths and the span."""

    is_compileable = True

    def __init__(self, owner: TargetCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.owner, self.keys, self.values = owner, keys, values  # [B, H, C, D]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a TargetCache layer is built from a prefill, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.owner.write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span, 0

    def get_seq_length(self) -> int:
        return self.owner.max_length

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def resize(self, rows: torch.Tensor | None, capacity: int) -> None:
        """Keep `rows` (all if None) and make the buffers `capacity` columns wide."""
        for name in ("keys", "values"):
            buf = getattr(self, name)
            buf = buf if rows is None else buf[rows]
            if buf.shape[2] != capacity:
                grown = buf.new_zeros(buf.shape[0], buf.shape[1], capacity, buf.shape[3])
                width = min(capacity, buf.shape[2])
                grown[:, :, :width] = buf[:, :, :width]
                buf = grown
            setattr(self, name, buf)


class TargetCache(Cache):
    """A batch's KV cache with one committed length per row (see the module docstring)."""

    def __init__(self, prefill: DynamicCache, attention_mask: torch.Tensor, linear: list[int], extra: int = 64):
        """Take over a prefill's cache: attention mask [B, L] left-padded, so row b's tokens are its
        last `lengths[b]` columns; they move to the row's first columns. `extra`: free columns."""
        lengths = attention_mask.long().sum(dim=1)  # [B]
        batch, width = attention_mask.shape
        # column j of row b takes prefill column (width - lengths[b] + j) mod width: the real tokens first
        source = (torch.arange(width, device=lengths.device).unsqueeze(0) + (width - lengths).unsqueeze(1)) % width
        layers = []
        for i, layer in enumerate(prefill.layers):
            if i in linear:
                layers.append(layer)
                continue
            moved = []
            for buf in (layer.keys, layer.values):  # [B, H, L, D]
                index = source.view(batch, 1, width, 1).expand_as(buf)
                full = buf.new_zeros(buf.shape[0], buf.shape[1], width + extra, buf.shape[3])
                full[:, :, :width] = buf.gather(2, index)
                moved.append(full)
            layers.append(_RowLayer(self, *moved))
        super().__init__(layers=layers)
        self.linear = set(linear)
        self.lengths = lengths  # [B] committed entries per row
        self.max_length = width  # host-side bound on lengths (the longest prompt fills its row)
        self.width = 0  # tokens of the verify in flight

    @property
    def span(self) -> int:
        """Columns a pass attends over: every committed entry of every row, and the new ones."""
        return self.max_length + self.width

    @property
    def capacity(self) -> int:
        return next(layer.keys.shape[2] for layer in self._rows())

    def _rows(self) -> list[_RowLayer]:
        return [layer for i, layer in enumerate(self.layers) if i not in self.linear]

    def begin(self, width: int) -> torch.Tensor:
        """Prepare a pass of `width` new tokens a row; returns its mask [B, 1, width, span], True where
        query t of row b may attend (its committed entries and the new ones up to t)."""
        need = self.max_length + width
        if need > self.capacity:
            capacity = max(need, 2 * self.capacity)
            for layer in self._rows():
                layer.resize(None, capacity)
        self.width = width
        key = torch.arange(self.span, device=self.lengths.device).view(1, 1, 1, -1)  # [1, 1, 1, S]
        query = torch.arange(width, device=self.lengths.device).view(1, 1, -1, 1)  # [1, 1, T, 1]
        return key <= self.lengths.view(-1, 1, 1, 1) + query

    def write(self, layer: _RowLayer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] at each row's length; return every row's first `span` columns."""
        write_at_lengths(layer.keys, layer.values, self.lengths, k, v)
        return layer.keys[:, :, : self.span], layer.values[:, :, : self.span]

    def commit(self, n_kept: torch.Tensor, kept_max: int) -> None:
        """Row b keeps the first n_kept[b] entries of the pass (kept_max >= n_kept.max(), on the host)."""
        self.lengths = self.lengths + n_kept
        self.max_length += kept_max
        self.width = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` [B']; the bound follows the rows that remain (a host sync, as rows leave)."""
        for layer in self._rows():
            layer.resize(rows, layer.keys.shape[2])
        self.lengths = self.lengths[rows]
        self.max_length = int(self.lengths.max()) if rows.numel() else 0

    def join(self, other: TargetCache) -> None:
        """Append another cache's rows after this one's; every row keeps its own length."""
        capacity = max(self.capacity, other.capacity)
        for mine, theirs in zip(self._rows(), other._rows()):
            mine.resize(None, capacity)
            theirs.resize(None, capacity)
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.max_length = max(self.max_length, other.max_length)
