"""Rollback for hybrid targets (Qwen3.5): linear-attention layers keep a recurrent state and a
short convolution window instead of keys and values, and neither can be cropped.

Design (measured against a recompute from the last committed state: see docs/design.md):
- During `verify`, each gated-DeltaNet layer's recurrence over the block runs one token at a time
  through Hugging Face's own `torch_recurrent_gated_delta_rule`, the function `generate()` runs for
  every decoded token, so the state after each block position is at hand (the block's outputs are
  the same as decoding it token by token). The two rule functions are swapped in the model's
  modeling module for the duration of the forward pass only, under a lock; no modeling file is
  copied or edited.
- The cache records the convolution's whole input window over the block (`activate_past_recording`).
- `commit` gives every row the recurrent state and the window at its own accepted length, so rows
  that accept different numbers of tokens stay exact. Full-attention layers are cropped as before.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import torch

_PATCH_LOCK = threading.Lock()
_RULES = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")


def linear_layers(config) -> list[int]:
    """Indices of the linear-attention layers of a text config (empty for a plain transformer)."""
    return [i for i, kind in enumerate(getattr(config, "layer_types", None) or []) if kind == "linear_attention"]


class LinearStates:
    """The linear-attention layers of one session's cache: record during verify, restore on commit."""

    def __init__(self, model, cache, layers: list[int]) -> None:
        self.cache, self.layers = cache, layers
        self.module = sys.modules[type(model).__module__]
        missing = [name for name in _RULES if not hasattr(self.module, name)]
        if missing:
            names = ", ".join(missing)
            raise ValueError(f"{self.module.__name__} has no {names}: flashcap cannot roll this model back")
        self._steps: list[list[torch.Tensor]] = []
        self.restore = True  # False only in tests: the negative control that must lose exactness
        for i in layers:
            cache.layers[i].activate_past_recording()

    def _layer(self, i: int):
        return self.cache.layers[i]

    @contextlib.contextmanager
    def recording(self):
        """Run a verify forward pass with the block's recurrence stepped token by token, keeping the
        state after each position (per linear layer, in layer order)."""
        step_rule = self.module.torch_recurrent_gated_delta_rule
        steps = self._steps = []

        def stepwise(query, key, value, g, beta, initial_state=None, output_final_state=False, **kwargs):
            kwargs.pop("cu_seqlens", None)
            state = initial_state.clone() if initial_state is not None else None
            states, outputs = [state], []
            for t in range(query.shape[1]):
                out, state = step_rule(
                    query[:, t : t + 1],
                    key[:, t : t + 1],
                    value[:, t : t + 1],
                    g=g[:, t : t + 1],
                    beta=beta[:, t : t + 1],
                    initial_state=None if state is None else state.clone(),  # the rule updates it in place
                    output_final_state=True,
                    **kwargs,
                )
                outputs.append(out)
                states.append(state)
            if states[0] is None:
                states[0] = torch.zeros_like(states[1])
            steps.append(states)
            return torch.cat(outputs, dim=1), state.clone()

        with _PATCH_LOCK:
            saved = {name: getattr(self.module, name) for name in _RULES}
            for name in _RULES:
                setattr(self.module, name, stepwise)
            try:
                yield
            finally:
                for name, fn in saved.items():
                    setattr(self.module, name, fn)

    def commit(self, n_kept: torch.Tensor) -> None:
        """Row b keeps the state after its first n_kept[b] verified tokens."""
        if len(self._steps) != len(self.layers):
            raise RuntimeError(f"recorded {len(self._steps)} linear layers, the model has {len(self.layers)}")
        rows = torch.arange(n_kept.shape[0], device=n_kept.device)
        for i, states in zip(self.layers, self._steps):
            layer = self._layer(i)
            width = len(states) - 1
            if self.restore:
                layer.recurrent_states[0] = torch.stack(states)[n_kept, rows].contiguous()
            kernel = layer.conv_kernel_size[0]
            window = layer.conv_states[0]  # [B, C, kernel + width]: the window before the block, then the block
            if self.restore:
                index = (n_kept.view(-1, 1, 1) + torch.arange(kernel, device=window.device)).expand(
                    -1, window.shape[1], -1
                )
                layer.conv_states[0] = torch.gather(window, 2, index)
            else:
                layer.conv_states[0] = window[..., width : width + kernel]
        self._steps = []

    def select_rows(self, rows: torch.Tensor) -> None:
        for i in self.layers:
            self._layer(i).reorder_cache(rows)

    def join(self, other: LinearStates) -> None:
        for i in self.layers:
            mine, theirs = self._layer(i), other._layer(i)
            mine.conv_states[0] = torch.cat([mine.conv_states[0], theirs.conv_states[0]])
            mine.recurrent_states[0] = torch.cat([mine.recurrent_states[0], theirs.recurrent_states[0]])
