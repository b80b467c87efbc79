"""The cost side of FLASH at real scale: a random-weight target with Qwen2.5-VL-7B's text dimensions
(hidden 3584, 28 heads, 4 KV heads, MLP 18944, vocabulary 152,064; fewer layers where the machine
is small), a FLASH drafter of the matching size, and an oracle that makes the drafter's blocks
right for a chosen number of slots per cycle, so acceptance is what you set.

    python -m bench.real_shape [--layers 28 --device cuda --dtype bfloat16] [--acceptance 3.2]
                                    [--batch-sizes 1,8,32,64] [--prompt-tokens 1200] [--max-new-tokens 64]

Both sides run flashcap's loop on the same prompts in one run, alternating, after a warm-up:
`target` is plain decoding; `flash_oracle` runs the real drafter (its full cost: fusion, layers,
refinement, LM head per slot) and then replaces its tokens with the target's own tokens, right
for the first m slots of each block (m cycling so the mean acceptance length is --acceptance).
The prompt is text of --prompt-tokens tokens standing in for a video prompt (the vision tower
is not run: its cost is the same on both sides). Random weights: the figures are costs, not a
claim about a trained drafter's acceptance. Outputs must equal plain decoding's (checked).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch

import flash
from demo.tiny_models import QWEN2_5_VL_7B_TEXT


def build_target(layers: int, device: str, dtype: torch.dtype) -> flash.Target:
    """A random-weight Qwen2.5-VL with the 7B text model (a one-block vision tower: not run here)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(QWEN2_5_VL_7B_TEXT, num_hidden_layers=layers)
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=3584)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return flash.Target(model, None, "qwen", "random:qwen2.5-vl-7b-text")


class OracleBlocks:
    """A real drafter's work with the target's own tokens: right for m slots per block, m cycling."""

    def __init__(self, drafter: flash.FlashDrafter, references: list[list[int]], right_for: list[int]) -> None:
        self.drafter, self.block_size = drafter, drafter.block_size
        self.all, self.slot_refs, self.positions, self.cursor = [list(r) for r in references], [], [], 0
        self.right = itertools.cycle(right_for)

    def _replace(self, block: flash.Block, slots: list[int]) -> flash.Block:
        tokens = block.tokens.tolist()
        for row, slot in enumerate(slots):
            ref, pos, m = self.slot_refs[slot], self.positions[slot], next(self.right)
            for i in range(len(tokens[row])):
                want = ref[pos + i] if ref is not None and pos + i < len(ref) else 0
                tokens[row][i] = want if i < m else (want + 1) % self.drafter.config.vocab_size
        block.tokens = torch.tensor(tokens, device=block.tokens.device)
        return block

    def start(self, prefill, first_tokens, params, generator=None, block_size=None, seen=None, join=False,
              slots=None, num_slots=None):  # fmt: skip
        n = first_tokens.shape[0]
        slots = list(range(n)) if slots is None else slots
        if not join:
            self.cursor, self.slot_refs, self.positions = 0, [], []
        extra = max(num_slots or 0, max(slots) + 1) - len(self.slot_refs)
        self.slot_refs, self.positions = self.slot_refs + [None] * extra, self.positions + [0] * extra
        for slot in slots:
            self.slot_refs[slot], self.positions[slot] = self.all[self.cursor], 1
            self.cursor += 1
        block = self.drafter.start(prefill, first_tokens, params, generator, block_size, seen, join, slots, num_slots)
        return self._replace(block, slots)

    def step(self, features, next_tokens, n_new, n_new_max, params, generator=None, block_size=None, seen=None):
        bucket = next_tokens.shape[0]
        self.positions[:bucket] = [p + n for p, n in zip(self.positions[:bucket], n_new.tolist())]
        block = self.drafter.step(features, next_tokens, n_new, n_new_max, params, generator, block_size, seen)
        return self._replace(block, list(range(bucket)))

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.slot_refs[slot] = None
        self.drafter.release(slots)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(target, drafter, batch: int, args, right_for: list[int]) -> list[dict]:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 150_000, (batch, args.prompt_tokens), generator=gen).to(target.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain = flash.generate(target, None, inputs, max_new_tokens=args.max_new_tokens, temperature=0.0)
    reference = plain.sequences
    times: dict[str, list[float]] = {"target": [], "flash_oracle": []}
    stats = {}
    for rep in range(args.repeats + 1):  # the first round warms up
        for method in ["target", "flash_oracle"] if rep % 2 else ["flash_oracle", "target"]:
            oracle = OracleBlocks(drafter, reference, right_for) if method == "flash_oracle" else None
            _sync(target.device)
            start = time.perf_counter()
            out = flash.generate(target, oracle, inputs, max_new_tokens=args.max_new_tokens, temperature=0.0)
            _sync(target.device)
            if rep:
                times[method].append(time.perf_counter() - start)
            if out.sequences != reference:
                raise AssertionError(f"{method} at batch {batch} changed the output")
            stats[method] = out.stats
    tokens = sum(len(r) for r in reference)
    base = statistics.median(times["target"])
    rows = []
    for method, ts in times.items():
        s, t = stats[method], statistics.median(ts)
        rows.append(
            {
                "method": method,
                "batch_size": batch,
                "tokens_per_s": tokens / t,
                "speedup": base / t,
                "acceptance_length": s.acceptance_length if method != "target" else 1.0,
                "identical": 1.0,
                "prefill_ms": 1000 * s.prefill_s,
                "draft_ms_per_pass": 1000 * s.draft_s / max(s.cycles + 1, 1),
                "verify_ms_per_pass": 1000 * s.verify_s / max(s.cycles, 1),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the release has 28)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompt-tokens", type=int, default=1200, help="prompt length (a video prompt's order)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--block-size", type=int, default=5, help="drafted tokens per cycle (k)")
    p.add_argument("--acceptance", type=float, default=3.2, help="mean tokens per cycle the oracle gives")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    accepted = args.acceptance - 1
    if not 0 <= accepted <= args.block_size:
        raise SystemExit(f"--acceptance must be in [1, {args.block_size + 1}]")
    low = int(accepted)  # right_for cycles between low and low + 1 so the mean is `accepted`
    share = accepted - low
    right_for = [low + 1] * round(10 * share) + [low] * (10 - round(10 * share))

    target = build_target(args.layers, args.device, getattr(torch, args.dtype))
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=args.block_size))
    rows = [r for b in args.batch_sizes.split(",") for r in measure(target, drafter, int(b), args, right_for)]
    report = {
        "date": date.today().isoformat(),
        "what": "random-weight target with Qwen2.5-VL-7B text dimensions; oracle acceptance; costs only",
        "layers": args.layers,
        "device": args.device,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
    }
    print(f"{report['what']}; {args.layers} layers, {args.device} {args.dtype}, {report['date']}")
    print("| method | batch | tokens/s | speedup | acceptance | prefill ms | draft ms/pass | verify ms/pass |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['acceptance_length']:.2f} | {r['prefill_ms']:.0f} | {r['draft_ms_per_pass']:.1f} | "
            f"{r['verify_ms_per_pass']:.1f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
