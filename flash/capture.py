"""Graph capture shared by the target's verify pass and the drafter's step: one compiled function
per (pass, backend), under fullgraph=True and dynamic=False (every shape fixed, so CUDA graphs can
replay it); inductor on CUDA adds `mode="reduce-overhead"` (CUDA graphs). A pass that fails to
compile runs eager, and the reason is kept for the job's report."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

MAX_GRAPHS = 512  # compiled pass shapes per function before dynamo gives up (then: eager, with the reason)
_LOCK = threading.Lock()


def capture(passes: dict[str, Callable], fn: Callable, backend: str, device: torch.device) -> Callable:
    """`fn` compiled with `backend`, kept in `passes` (one per backend) so every engine shares its
    graphs."""
    with _LOCK:
        if backend not in passes:
            # one graph per pass shape: buckets x block widths x spans, more than dynamo's default 8
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, MAX_GRAPHS)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * MAX_GRAPHS)
            mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None
            passes[backend] = torch.compile(fn, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        return passes[backend]


def fallback_reason(what: str, err: BaseException) -> str:
    """The one-line reason a compiled pass gave way to eager (logged as a warning)."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())[:500]
    logging.getLogger("flashcap").warning("compiled %s failed, decoding eager: %s", what, reason)
    return reason
