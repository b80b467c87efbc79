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


class DrafterCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # [B] committed entries
        self.capacity = capacity
        # Host-side upper bound of lengths, so growing never needs a device sync.
        self._max_length = 0

    def reserve(self, width: int) -> None:
        """Make room for `width` more entries in every row (doubling)."""
        need = self._max_length + width
        if need <= self.capacity:
            return
        new_capacity = max(need, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                grown = buf.new_zeros(buf.shape[0], buf.shape[1], new_capacity, buf.shape[3])
                grown[:, :, : self.capacity] = buf
                store[i] = grown
        self.capacity = new_capacity

    def span(self, width: int) -> int:
        """How many leading entries a pass of `width` new tokens must attend over."""
        return self._max_length + width

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, hd] at each row's length; return all keys/values up to `span(T)`."""
        write_at_lengths(self.keys[layer], self.values[layer], self.lengths, k, v)
        end = self.span(k.shape[2])
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """Boolean mask [B, 1, T, span] for new tokens with validity valid [B, T].

        Query t of row b sees the row's committed entries and the valid new
        entries at or before t.
        """
        batch, width = valid.shape
        span = self.span(width)
        key = torch.arange(span, device=valid.device).view(1, 1, span)  # [1, 1, S]
        start = self.lengths.view(batch, 1, 1)
        query = torch.arange(width, device=valid.device).view(1, width, 1)  # [1, T, 1]
        rel = key - start  # [B, 1, S] index among the new entries
        new_ok = (rel >= 0) & (rel <= query) & valid.gather(1, rel.clamp(0, width - 1).squeeze(1)).unsqueeze(1)
        # The diagonal keeps padded queries from seeing nothing (their outputs are never read).
        return ((key < start) | new_ok | (rel == query)).unsqueeze(1)

    def commit(self, n: torch.Tensor, n_max: int) -> None:
        """Keep the first n[b] new entries of each row (n_max >= n.max(), known on the host)."""
        self.lengths = self.lengths + n
        self._max_length += n_max

    def select_rows(self, rows: torch.Tensor) -> None:
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.lengths = self.lengths[rows]
        # The bound follows the rows that remain (a host sync, as rows leave): passes attend over
        # `span`, which would otherwise keep the length of the longest row that ever decoded.
        self._max_length = int(self.lengths.max()) if rows.numel() else 0

    def join(self, other: DrafterCache) -> None:
        """Append another cache's rows after this one's (each row keeps its own length)."""
        capacity = max(self.capacity, other.capacity)
        self.reserve(capacity - self._max_length)
        other.reserve(capacity - other._max_length)
        self.keys = [torch.cat([a[:, :, :capacity], b[:, :, :capacity]]) for a, b in zip(self.keys, other.keys)]
        self.values = [torch.cat([a[:, :, :capacity], b[:, :, :capacity]]) for a, b in zip(self.values, other.values)]
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.capacity = capacity
        self._max_length = max(self._max_length, other._max_length)
