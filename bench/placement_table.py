"""Which released targets fit which GPU nodes: for each target and each (GPU, GPUs per actor), the most
slots (rows decoding at once) whose caches fit beside the weights, from flashcap's own placement plan
(flash.placement, on the meta device: no weights needed).

    python -m bench.placement_table [--capacity 4096] [--dtype bfloat16] [--out bench/results/placement.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from demo.release_configs import RELEASES, release_config
from flash.placement import GIB, TargetDoesNotFit, plan_placement

# GPU -> the memory torch reports for it (GiB), and AWS instance types that carry it.
GPUS = {
    "A10G 24 GB": (22.1, "g5.xlarge-g5.12xlarge"),
    "L40S 48 GB": (44.4, "g6e.xlarge, g6e.12xlarge (4)"),
    "A100 80 GB": (79.2, "p4de.24xlarge (8)"),
    "H100 80 GB": (79.2, "p5.48xlarge (8)"),
}
PER_ACTOR = (1, 2, 4)


def most_slots(config, gpus: int, budget: float, dtype: torch.dtype, capacity: int, top: int = 256) -> int:
    """The most slots that fit (0: not even one), by bisection on plan_placement."""

    def fits(slots: int) -> bool:
        try:
            plan_placement(config, gpus=gpus, budget_bytes=int(budget * GIB), dtype=dtype, slots=slots,
                           capacity=capacity)  # fmt: skip
            return True
        except TargetDoesNotFit:
            return False

    low, high = 0, top
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def table(capacity: int, dtype: torch.dtype) -> str:
    gpus = [g for g in GPUS if g != "A100 80 GB"]  # the A100's row equals the H100's: same memory
    head = ["target"] + [f"{g} x{n}" for g in gpus for n in PER_ACTOR]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in RELEASES:
        config = release_config(name)
        cells = [name]
        for gpu in gpus:
            for n in PER_ACTOR:
                slots = most_slots(config, n, GPUS[gpu][0], dtype, capacity)
                cells.append("-" if not slots else f"{slots}+" if slots == 256 else str(slots))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capacity", type=int, default=4096, help="tokens a slot holds: the video prompt and caption")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    text = (
        f"Most slots per actor at {args.capacity} tokens a slot ({args.dtype}; '-': does not fit, 256+: the "
        f"search's top; columns: GPU x GPUs per actor)\n\n" + table(args.capacity, getattr(torch, args.dtype))
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
