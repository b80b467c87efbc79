"""Rollback for hybrid targets (Qwen3.5): linear-attention layers keep a recurrent state and a
short convolution window instead of keys and values, and neither can be cropped.

Design (measured against a recompute from the last committed state: see docs/design.md):
- During `verify`, each gated-DeltaNet layer's recurrence over the block runs one token at a time
  through Hugging Face's own `torch_recurrent_gated_delta_rule`, the function `generate()` runs for
  every decoded token, so the state after each block position is at hand (the block's outputs are
  the same as decoding it token by token). No modeling file is copied or edited.
- The layers call the two rule functions by their names in the modeling module, so those names are
  bound, once per process, to dispatchers: a call made while the calling thread runs a verify
  (`recording`, a context variable: per thread, per call) goes to that session's recorder; every
  other call (prefill, plain decoding, `model.generate()`, another thread's forward) goes to
  Hugging Face's function unchanged. Nothing is swapped back and forth and nothing is locked, so
  sessions in several threads of one process decode side by side.
- The cache records the convolution's whole input window over the block (`activate_past_recording`).
- `commit` gives every slot the recurrent state and the window at its own accepted length, so rows
  that accept different numbers of tokens stay exact. The states live per slot, as the KV cache does.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Callable
from types import ModuleType

import torch

_RULES = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
_INSTALL_LOCK = threading.Lock()
# The recorder of the verify this thread is running, if any (a new thread starts with None).
_RECORDER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("flashcap_linear_recorder", default=None)


def _dispatcher(original: Callable) -> Callable:
    """`original` for every call but those made inside this thread's `LinearStates.recording`."""

    def dispatch(*args, **kwargs):
        recorder = _RECORDER.get()
        return original(*args, **kwargs) if recorder is None else recorder(*args, **kwargs)

    dispatch.flashcap_original = original
    return dispatch


def _install(module: ModuleType) -> None:
    """Bind the modeling module's rule names to dispatchers (once: later calls find them there)."""
    with _INSTALL_LOCK:
        for name in _RULES:
            rule = getattr(module, name)
            if not hasattr(rule, "flashcap_original"):
                setattr(module, name, _dispatcher(rule))


def linear_layers(config) -> list[int]:
    """Indices of the linear-attention layers of a text config (empty for a plain transformer)."""
    return [i for i, kind in enumerate(getattr(config, "layer_types", None) or []) if kind == "linear_attention"]


class LinearStates:
    """The linear-attention states of a session's slots: record during verify, keep each slot's own
    position on commit. Each linear layer's convolution window and recurrent state are held per slot
    ([slots, ...], written by `load`); a verify hands the layer object the first `bucket` slots."""

    def __init__(self, model, cache, layers: list[int]) -> None:
        self.cache, self.layers = cache, layers
        self.module = sys.modules[type(model).__module__]
        missing = [name for name in _RULES if not hasattr(self.module, name)]
        if missing:
            names = ", ".join(missing)
            raise ValueError(f"{self.module.__name__} has no {names}: flashcap cannot roll this model back")
        _install(self.module)
        self.step_rule = self.module.torch_recurrent_gated_delta_rule.flashcap_original
        self._steps: list[list[torch.Tensor]] = []
        self.conv: dict[int, torch.Tensor] = {}  # layer -> [S, C, kernel]
        self.recurrent: dict[int, torch.Tensor] = {}  # layer -> [S, ...]
        self.restore = True  # False only in tests: the negative control that must lose exactness

    def _layer(self, i: int):
        return self.cache.layers[i]

    def load(self, slots: torch.Tensor, prompt, rows: torch.Tensor) -> None:
        """Take the states of a prompt pass's `rows` into `slots`."""
        for i in self.layers:
            theirs = prompt.layers[i]
            for store, state in ((self.conv, theirs.conv_states[0]), (self.recurrent, theirs.recurrent_states[0])):
                if i not in store:
                    store[i] = state.new_zeros(self.cache.num_slots, *state.shape[1:])
                store[i][slots] = state[rows]
            self._layer(i).activate_past_recording()

    def add_slots(self, num_slots: int) -> None:
        for store in (self.conv, self.recurrent):
            for i, state in store.items():
                store[i] = torch.cat([state, state.new_zeros(num_slots - state.shape[0], *state.shape[1:])])

    def move(self, where: torch.Tensor, to: torch.Tensor) -> None:
        for store in (self.conv, self.recurrent):
            for state in store.values():
                state[to] = state[where]

    @contextlib.contextmanager
    def recording(self):
        """Run a verify forward pass (in this thread) over the bucket's slots, with the block's
        recurrence stepped token by token, keeping the state after each position (per linear layer,
        in layer order)."""
        bucket = self.cache.bucket
        for i in self.layers:
            layer = self._layer(i)
            layer.conv_states[0] = self.conv[i][:bucket]
            layer.recurrent_states[0] = self.recurrent[i][:bucket]
        self._steps = []
        token = _RECORDER.set(self._stepwise)
        try:
            yield
        finally:
            _RECORDER.reset(token)

    def _stepwise(self, query, key, value, g, beta, initial_state=None, output_final_state=False, **kwargs):
        """A rule call of one layer: the block token by token, each position's state recorded."""
        kwargs.pop("cu_seqlens", None)
        state = initial_state.clone() if initial_state is not None else None
        states, outputs = [state], []
        for t in range(query.shape[1]):
            out, state = self.step_rule(
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
        self._steps.append(states)
        return torch.cat(outputs, dim=1), state.clone()

    def commit(self, n_kept: torch.Tensor) -> None:
        """Slot b of the bucket keeps the state after its first n_kept[b] verified tokens."""
        if len(self._steps) != len(self.layers):
            raise RuntimeError(f"recorded {len(self._steps)} linear layers, the model has {len(self.layers)}")
        bucket = n_kept.shape[0]
        rows = torch.arange(bucket, device=n_kept.device)
        for i, states in zip(self.layers, self._steps):
            layer = self._layer(i)
            width = len(states) - 1
            kernel = layer.conv_kernel_size[0]
            window = layer.conv_states[0]  # [bucket, C, kernel + width]: the window before the block, then the block
            if self.restore:
                self.recurrent[i][:bucket] = torch.stack(states)[n_kept, rows]
                index = (n_kept.view(-1, 1, 1) + torch.arange(kernel, device=window.device)).expand(
                    -1, window.shape[1], -1
                )
                self.conv[i][:bucket] = torch.gather(window, 2, index)
            else:
                self.recurrent[i][:bucket] = states[-1]
                self.conv[i][:bucket] = window[..., width : width + kernel]
        self._steps = []
