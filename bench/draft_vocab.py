"""What one drafter cycle's LM-head work costs with a reduced draft vocabulary, at real shape.

The FLASH drafter picks a block's k tokens slot by slot (refinement reads the token drafted just
before), so each cycle runs the LM head k times on [B, D] features. With the whole vocabulary that is
k reads of the full head (Qwen2.5-VL-7B: hidden 3584, vocabulary 152,064, 1.09 GB per read in
bfloat16); with `DrafterConfig.draft_vocab_size` = Vd it reads Vd rows (`flash.drafter.DraftHead`).
This times one cycle, `DraftHead.choose` k times as the drafter calls it, for the whole vocabulary
and each Vd, in three modes:

    greedy       argmax over the (draft) vocabulary
    penalized    greedy with the repetition penalty Qwen2.5-VL's release config sets (1.05), over
                 a 1200-token prompt plus the block's own tokens
    sampling     temperature 1, top-k 50 (generate()'s defaults), probs scattered back to [B, k, V]

Variants alternate within each repeat; medians are reported. Random weights and random draft ids:
costs only, no acceptance (a trained drafter's acceptance with a reduced vocabulary is measured on
real clips, not here).

    python -m bench.draft_vocab [--device cuda] [--dtype bfloat16] [--batch-sizes 1,16,64]
                                     [--draft-vocabs 16384,32768,65536] [--block 5] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from flash.drafter import DraftHead
from flash.sampling import SamplingParams, seen_ids

HIDDEN, VOCAB = 3584, 152_064  # Qwen2.5-VL-7B-Instruct
EOS_IDS = (151_645, 151_643)  # <|im_end|>, <|endoftext|>
PROMPT = 1200  # a video prompt's length, for the penalty's seen ids
MODES = {
    "greedy": SamplingParams(),
    "penalized": SamplingParams(repetition_penalty=1.05),
    "sampling": SamplingParams(temperature=1.0, top_k=50),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def draft_ids(size: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """`size` random ids, the EOS ids among them (as `flash.train.draft_vocabulary` guarantees), ascending."""
    others = torch.randperm(VOCAB, generator=gen)
    others = others[~torch.isin(others, torch.tensor(EOS_IDS))][: size - len(EOS_IDS)]
    return torch.cat([torch.tensor(EOS_IDS), others]).sort().values.to(device)


def cycle(head: DraftHead, features: torch.Tensor, params: SamplingParams, seen: torch.Tensor, gen) -> None:
    """One drafter cycle's LM-head work: k slots, each seeing the tokens drafted before it.  features [k, B, D]"""
    for h in features:
        tokens, _ = head.choose(h, params, gen, seen if params.penalized else None)
        if params.penalized:
            seen = torch.cat([seen, tokens.unsqueeze(1)], dim=1)


def measure(batch: int, vocabs: list[int], block: int, device, dtype, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(batch)
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lm_head.weight.normal_(0, HIDDEN**-0.5, generator=gen if device.type == "cpu" else None)
    lm_head.requires_grad_(False)
    heads = {v: DraftHead(lm_head, VOCAB, None if v == VOCAB else draft_ids(v, device, gen)) for v in vocabs}
    features = torch.randn(block, batch, HIDDEN, generator=gen).to(device, dtype)  # [k, B, D]
    prompt = torch.randint(0, VOCAB, (batch, PROMPT), generator=gen).to(device)
    seen = seen_ids(prompt, torch.ones_like(prompt), VOCAB)  # [B, N]
    sample_gen = torch.Generator(device=device).manual_seed(0)
    variants = [(v, mode) for mode in MODES for v in vocabs]
    times: dict[tuple[int, str], list[float]] = {key: [] for key in variants}
    with torch.inference_mode():
        for repeat in range(repeats + 1):  # the first round warms up
            for v, mode in variants:
                _sync(device)
                start = time.perf_counter()
                cycle(heads[v], features, MODES[mode], seen, sample_gen)
                _sync(device)
                if repeat:
                    times[(v, mode)].append(time.perf_counter() - start)
    rows = []
    for v in vocabs:
        row = {
            "batch_size": batch,
            "vocab": v,
            "block": block,
            "head_mb_per_slot": v * HIDDEN * lm_head.weight.element_size() / 1e6,
        }
        for mode in MODES:
            ms = 1000 * statistics.median(times[(v, mode)])
            row[f"{mode}_ms"] = ms
            row[f"{mode}_speedup"] = 1000 * statistics.median(times[(VOCAB, mode)]) / ms
            row[f"{mode}_runs_ms"] = [1000 * t for t in times[(v, mode)]]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| batch | draft vocab | head MB/slot | greedy ms | × | penalized ms | × | sampling ms | × |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['vocab']:,} | {r['head_mb_per_slot']:.0f} "
            + " ".join(f"| {r[f'{m}_ms']:.1f} | {r[f'{m}_speedup']:.2f}" for m in MODES)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--draft-vocabs", default="16384,32768,65536", help="reduced sizes, compared with the full 152,064")
    p.add_argument("--block", type=int, default=5, help="k: slots (LM-head calls) per drafter cycle")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0: torch's default); 1 steadies a shared, busy host"
    )
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    vocabs = [VOCAB] + [int(v) for v in args.draft_vocabs.split(",")]
    if any(not 0 < v <= VOCAB for v in vocabs):
        p.error(f"draft vocabularies must be in (0, {VOCAB}]")
    note = (
        f"random weights (costs only); one drafter cycle = {args.block} LM-head calls on [B, {HIDDEN}]; "
        f"{args.device}, {args.dtype}, {torch.get_num_threads()} CPU threads; × = full-vocabulary time / this"
    )
    rows = []
    for b in args.batch_sizes.split(","):
        rows += measure(int(b), vocabs, args.block, device, dtype, args.repeats)
        print(f"batch {b} done", file=sys.stderr, flush=True)
    print(f"Drafter LM-head work per cycle, hidden {HIDDEN}, vocabulary {VOCAB:,}: {note}")
    print(table(rows))
    if args.out:
        report = {
            "device": args.device,
            "dtype": args.dtype,
            "hidden": HIDDEN,
            "vocab": VOCAB,
            "block": args.block,
            "random_weights": True,
            "note": note,
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
