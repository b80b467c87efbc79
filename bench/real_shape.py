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
from bench.oracle import SlotReferences
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
        self.slots = SlotReferences(references)
        self.right = itertools.cycle(right_for)

    def _replace(self, block: flash.Block, slots: list[int]) -> flash.Block:
        tokens = block.tokens.tolist()
        for row, slot in enumerate(slots):
            m = next(self.right)
            for i in range(len(tokens[row])):
                want = self.slots.token(slot, i)
                tokens[row][i] = want if i < m else (want + 1) % self.drafter.config.vocab_size
        block.tokens = torch.tensor(tokens, device=block.tokens.device)
        return block

    def start(self, prefill, first_tokens, params, generator=None, block_size=None, seen=None, join=False,
              slots=None, num_slots=None, compile=None):  # fmt: skip
        slots = list(range(first_tokens.shape[0])) if slots is None else slots
        self.slots.admit(slots, join, num_slots)
        block = self.drafter.start(
            prefill, first_tokens, params, generator, block_size, seen, join, slots, num_slots, compile
        )
        return self._replace(block, slots)

    def step(self, features, next_tokens, n_new, n_new_max, params, generator=None, block_size=None, seen=None):
        slots = self.slots.advance(n_new)
        block = self.drafter.step(features, next_tokens, n_new, n_new_max, params, generator, block_size, seen)
        return self._replace(block, slots)

    def release(self, slots: list[int]) -> None:
        self.slots.release(slots)
        self.drafter.release(slots)

    def move(self, src: list[int], dst: list[int]) -> None:
        self.slots.move(src, dst)
        self.drafter.move(src, dst)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _right_for(acceptance: float, block_size: int) -> list[int]:
    """Slots right per cycle, cycling between m and m + 1 so that the mean acceptance length is `acceptance`."""
    accepted = acceptance - 1
    if not 0 <= accepted <= block_size:
        raise SystemExit(f"--acceptance must be in [1, {block_size + 1}]")
    low = int(accepted)
    share = accepted - low
    return [low + 1] * round(10 * share) + [low] * (10 - round(10 * share))


def methods(args) -> dict[str, tuple[float | None, str | None]]:
    """method name -> (oracle acceptance or None for plain decoding, compile backend or None)."""
    out: dict[str, tuple[float | None, str | None]] = {}
    for backend in [None] + ([args.compile] if args.compile else []):
        suffix = "_compiled" if backend else ""
        out[f"target{suffix}"] = (None, backend)
        for a in args.acceptance.split(","):
            out[f"flash_oracle_{a}{suffix}"] = (float(a), backend)
    return out


def floor_ms(target, batch: int, context: int) -> float | None:
    """The memory-bandwidth floor of one decoding step: the text model's weights (less the embedding,
    of which a step reads a row a token) and the batch's KV cache over `context` positions, read once,
    at the card's bandwidth. None where the card's bandwidth is not known."""
    name = torch.cuda.get_device_name() if target.device.type == "cuda" else ""
    bandwidth = next((gbps for card, gbps in BANDWIDTH_GBPS.items() if card in name), None)
    if bandwidth is None:
        return None
    lm = target.model.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    weights += target.lm_head.weight.numel() * target.lm_head.weight.element_size()
    text = target.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    kv = batch * context * text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * target.dtype.itemsize
    return 1000 * (weights + kv) / (bandwidth * 1e9)


# Published memory bandwidth (GB/s) of the cards a device check may run on (SXM parts).
BANDWIDTH_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864}


def measure(target, drafter, batch: int, args) -> list[dict]:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 150_000, (batch, args.prompt_tokens), generator=gen).to(target.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain = flash.generate(target, None, inputs, max_new_tokens=args.max_new_tokens, temperature=0.0)
    reference = plain.sequences
    chosen = methods(args)
    times: dict[str, list[float]] = {m: [] for m in chosen}
    stats = {}
    for rep in range(args.repeats + 1):  # the first round warms up (graph capture included)
        order = list(chosen)[rep % len(chosen) :] + list(chosen)[: rep % len(chosen)]
        for method in order:
            acceptance, backend = chosen[method]
            right_for = None if acceptance is None else _right_for(acceptance, args.block_size)
            oracle = None if right_for is None else OracleBlocks(drafter, reference, right_for)
            _sync(target.device)
            start = time.perf_counter()
            out = flash.generate(
                target, oracle, inputs, max_new_tokens=args.max_new_tokens, temperature=0.0, compile=backend
            )
            _sync(target.device)
            if rep:
                times[method].append(time.perf_counter() - start)
            if out.sequences != reference:
                raise AssertionError(f"{method} at batch {batch} changed the output")
            stats[method] = out.stats
    return _rows(target, batch, args, reference, times, stats)


def _rows(target, batch: int, args, reference, times: dict, stats: dict) -> list[dict]:
    tokens = sum(len(r) for r in reference)
    base = statistics.median(times["target_compiled" if args.compile else "target"])
    floor = floor_ms(target, batch, args.prompt_tokens + args.max_new_tokens // 2)
    rows = []
    for method, ts in times.items():
        s, t = stats[method], statistics.median(ts)
        rows.append(
            {
                "method": method,
                "batch_size": batch,
                "tokens_per_s": tokens / t,
                "spread": [tokens / max(ts), tokens / min(ts)],
                "speedup": base / t,  # over plain decoding, compiled where compiled rows are measured
                "acceptance_length": s.acceptance_length if not method.startswith("target") else 1.0,
                "identical": 1.0,
                "prefill_ms": 1000 * s.prefill_s,
                "draft_ms_per_pass": 1000 * s.draft_s / max(s.cycles + 1, 1),
                "verify_ms_per_pass": 1000 * s.verify_s / max(s.cycles, 1),
                "floor_ms_per_step": floor,
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
    p.add_argument("--acceptance", default="3.2", help="mean tokens per cycle the oracle gives (comma-separated)")
    p.add_argument("--compile", help="also every method with its passes compiled by this backend (e.g. inductor)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)

    target = build_target(args.layers, args.device, getattr(torch, args.dtype))
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=args.block_size))
    rows = [r for b in args.batch_sizes.split(",") for r in measure(target, drafter, int(b), args)]
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
    print("| method | batch | tokens/s | speedup | acceptance | prefill ms | draft ms/pass | verify ms/pass "
          "| floor ms |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        floor = f"{r['floor_ms_per_step']:.2f}" if r["floor_ms_per_step"] else ""
        print(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['acceptance_length']:.2f} | {r['prefill_ms']:.0f} | {r['draft_ms_per_pass']:.1f} | "
            f"{r['verify_ms_per_pass']:.1f} | {floor} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
