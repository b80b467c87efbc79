"""What following a checkpoint's generation config costs per decode cycle, at real vocabulary size.

A verify pass of k+1 tokens ends in the LM head; flashcap then casts the logits to float32 and,
when the checkpoint sets a repetition penalty (Qwen2.5-VL instruct: 1.05), applies it at every
position with the block's own tokens counted (`seen_through` + `penalize`: a gather and a scatter
at the seen ids), as `generate()` does one token at a time. This times, for Qwen2.5-VL-7B's shapes
(hidden 3584, vocabulary 152,064):

    lm_head      the LM head on [B, k+1] features (part of every verify, with or without a penalty)
    argmax       float32 cast + argmax (greedy, no penalty)
    penalized    float32 cast + seen_through + penalize + argmax (greedy with the penalty)

and reports the penalty's extra time as a share of the LM head alone (a lower bound on its share
of a whole verify pass, which also runs every decoder layer). Random weights: costs only.

    python -m bench.penalty [--device cuda] [--dtype bfloat16] [--batch-sizes 1,16,64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flash.sampling import SamplingParams, process, seen_ids, seen_through

HIDDEN, VOCAB = 3584, 152_064  # Qwen2.5-VL-7B-Instruct


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(batch: int, block: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(batch)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=device, dtype=dtype)
    features = torch.randn(batch, block + 1, HIDDEN, device=device, dtype=dtype, generator=gen)
    prompt = torch.randint(0, VOCAB, (batch, 1200), device=device, generator=gen)  # a video prompt's length
    seen = seen_ids(prompt, torch.ones_like(prompt), VOCAB)
    tokens = torch.randint(0, VOCAB, (batch, block + 1), device=device, generator=gen)
    params = SamplingParams(repetition_penalty=1.05)
    with torch.inference_mode():
        logits = head(features)
        lm_head = _time(lambda: head(features), device, repeats)
        argmax = _time(lambda: process(logits, SamplingParams()).argmax(-1), device, repeats)
        penalized = _time(lambda: process(logits, params, seen_through(seen, tokens)).argmax(-1), device, repeats)
    return {
        "batch_size": batch,
        "block": block,
        "lm_head_ms": 1000 * lm_head,
        "argmax_ms": 1000 * argmax,
        "penalized_ms": 1000 * penalized,
        "penalty_extra_vs_lm_head": (penalized - argmax) / lm_head,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--block", type=int, default=5, help="drafted tokens per cycle (k); k+1 are verified")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [measure(int(b), args.block, device, dtype, args.repeats) for b in args.batch_sizes.split(",")]
    print(f"| batch | LM head ms | argmax ms | penalized ms | penalty extra / LM head |  ({args.device}, {args.dtype})")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['lm_head_ms']:.2f} | {r['argmax_ms']:.2f} | {r['penalized_ms']:.2f} "
            f"| {100 * r['penalty_extra_vs_lm_head']:.0f}% |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "dtype": args.dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
