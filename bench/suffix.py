"""Suffix decoding against FLASH, on the demo worlds: acceptance as the store of earlier captions
grows, and throughput of plain decoding, suffix alone, FLASH alone and FLASH + suffix, in one run,
with outputs checked identical to plain decoding.

    python -m bench.suffix --out bench/results/suffix-cpu.json [--worlds v1,v2] [--eval-clips 64]
                           [--warm-clips 1000] [--batch-sizes 8,32,64] [--repeats 2]

Per world:
1. The store's captions: the target's own greedy captions of `--warm-clips` held-out clips (not
   the evaluated ones), as a job's actor would have written them.
2. Cold start: mean acceptance length of `--eval-clips` clips captioned in batches of 8 by suffix
   decoding from a store frozen at 0, 10, 100 and 1,000 earlier captions; and as the job runs it
   (`--drafter suffix --batch-size 8`): a store that starts empty and learns every finished caption.
3. Throughput: every method at every batch size, in a rotating order, `--repeats` rounds after a
   warm-up round; suffix decoding drafts from the store of every warm caption (frozen, so that no
   round learns the evaluated clips' captions). Best-vs-best: each method at its best batch size
   over plain decoding at its best. `identical`: the share of clips whose tokens equal plain
   decoding's at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch

import flash
from bench.speedup import ROOT, _inputs_maker, machine
from flash.suffix import SuffixDrafter, SuffixStore, WithSuffix

WORLDS = {
    "v1": {"model": "demo-target", "drafter": "demo-drafter", "max_new_tokens": 64},
    "v2": {"model": "demo-v2-target", "drafter": "demo-v2-drafter", "max_new_tokens": 200},
}
METHODS = ("plain", "suffix", "flash", "flash_suffix")
EVAL_SEED, WARM_SEED = 500_000, 600_000  # held-out scene seeds (training uses >= 1,000,000)
CURVE = (0, 10, 100, 1000)


def _world_clips(world: str, seeds: range):
    """Rendered frames (and v2's metadata) of the clips with these seeds: what the models see."""
    if world == "v1":
        from demo.world import SAMPLED_FRAMES, render, sample_indices, scene_for_seed

        only = sample_indices(16, SAMPLED_FRAMES)
        return [render(scene_for_seed(s), only=only) for s in seeds], None
    from demo import world_v2 as v2

    frames, metadata = zip(*(v2.clip_frames(v2.clip_for_seed(s), rendered=True) for s in seeds))
    return list(frames), list(metadata)


def _prompt(world: str) -> str:
    if world == "v1":
        from demo.world import PROMPT

        return PROMPT
    from demo import world_v2 as v2

    return v2.PROMPT


def _decode(target, drafter, inputs_for, clips: int, batch: int, max_new: int) -> tuple[list, float, float]:
    """Every clip, `batch` at a time: (tokens per clip, seconds, mean row acceptance length)."""
    out, accept = [], []
    started = time.perf_counter()
    for first in range(0, clips, batch):
        indices = list(range(first, min(clips, first + batch)))
        result = flash.generate(target, drafter, inputs_for(indices), max_new_tokens=max_new)
        out += result.sequences
        accept += [result.stats.row_acceptance_length(i) for i in range(len(indices))]
    return out, time.perf_counter() - started, statistics.fmean(accept)


class _Frozen(SuffixStore):
    """A store that stops learning: the benchmark's rounds must not learn the clips they time."""

    def add(self, tokens: list[int]) -> None:
        if not getattr(self, "frozen", False):
            super().add(tokens)


def _store(captions: list[list[int]]) -> _Frozen:
    store = _Frozen()
    for tokens in captions:
        store.add(tokens)
    store.frozen = True
    return store


def _rounds(target, drafters: dict, eval_inputs, args: argparse.Namespace, max_new: int, world: str) -> dict:
    """(method, batch) -> [(tokens per clip, seconds, acceptance)] over the timed rounds: every method
    at every batch size, in a rotating order; round 0 warms up."""
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs: dict = {}
    for r in range(args.repeats + 1):
        for batch in [sizes[(i + r) % len(sizes)] for i in range(len(sizes))]:
            for method in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
                result = _decode(target, drafters[method](), eval_inputs, args.eval_clips, batch, max_new)
                if r:
                    runs.setdefault((method, batch), []).append(result)
        print(f"[{world}] round {r} done", flush=True)
    return runs


def _table(runs: dict, clips: int) -> list[dict]:
    """A row per (method, batch): median tokens/s and clips/s, acceptance, share identical to plain."""
    rows = []
    for (method, batch), results in sorted(runs.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
        plain_tokens = runs[("plain", batch)][0][0]
        count = sum(len(t) for t in results[0][0])
        rates = [count / s for _, s, _ in results]
        rows.append(
            {
                "method": method,
                "batch": batch,
                "tokens_per_s": statistics.median(rates),
                "tokens_per_s_runs": rates,
                "clips_per_s": statistics.median(clips / s for _, s, _ in results),
                "acceptance_length": results[0][2],
                "identical": statistics.fmean(a == b for a, b in zip(results[0][0], plain_tokens)),
            }
        )
    return rows


def run_world(world: str, args: argparse.Namespace) -> dict:
    spec = WORLDS[world]
    target = flash.load_target(ROOT / "models" / spec["model"], dtype=torch.float32)
    flash_drafter = flash.FlashDrafter.from_pretrained(ROOT / "models" / spec["drafter"], target)
    max_new, prompt = spec["max_new_tokens"], _prompt(world)
    eval_inputs = _inputs_maker(target, prompt, *_world_clips(world, range(EVAL_SEED, EVAL_SEED + args.eval_clips)))
    warm_inputs = _inputs_maker(target, prompt, *_world_clips(world, range(WARM_SEED, WARM_SEED + args.warm_clips)))
    started = time.perf_counter()
    warm, _, _ = _decode(target, None, warm_inputs, args.warm_clips, 64, max_new)
    print(f"[{world}] {len(warm)} store captions in {time.perf_counter() - started:.0f} s", flush=True)

    curve = {}
    for n in [c for c in CURVE if c <= args.warm_clips]:
        _, _, curve[str(n)] = _decode(target, SuffixDrafter(_store(warm[:n])), eval_inputs, args.eval_clips, 8, max_new)
    _, _, curve["learning"] = _decode(target, SuffixDrafter(SuffixStore()), eval_inputs, args.eval_clips, 8, max_new)
    print(f"[{world}] acceptance by store size: {curve}", flush=True)

    store = _store(warm)
    drafters = {
        "plain": lambda: None,
        "suffix": lambda: SuffixDrafter(store),
        "flash": lambda: flash_drafter,
        "flash_suffix": lambda: WithSuffix(flash_drafter, SuffixDrafter(store)),
    }
    rows = _table(_rounds(target, drafters, eval_inputs, args, max_new, world), args.eval_clips)
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["tokens_per_s"]) for m in METHODS}
    plain_best = best["plain"]["tokens_per_s"]
    return {
        "world": world,
        "store_captions": len(warm),
        "mean_caption_tokens": statistics.fmean(len(t) for t in warm),
        "acceptance_by_store_size": curve,
        "rows": rows,
        "best_vs_best": {
            m: {"batch": b["batch"], "tokens_per_s": b["tokens_per_s"], "over_plain": b["tokens_per_s"] / plain_best}
            for m, b in best.items()
        },
    }


def markdown(report: dict) -> str:
    lines = []
    for w in report["worlds"]:
        lines.append(
            f"World {w['world']} ({w['store_captions']} store captions, {w['mean_caption_tokens']:.0f} tokens each)"
        )
        lines.append(
            "acceptance by store size: " + ", ".join(f"{k}: {v:.2f}" for k, v in w["acceptance_by_store_size"].items())
        )
        lines.append("| method | batch | tokens/s | acceptance | identical |")
        lines.append("| --- | --- | --- | --- | --- |")
        for r in w["rows"]:
            lines.append(
                f"| {r['method']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['acceptance_length']:.2f} | "
                f"{r['identical']:.0%} |"
            )
        lines.append(
            "best vs best: "
            + ", ".join(f"{m} {b['over_plain']:.2f}x (batch {b['batch']})" for m, b in w["best_vs_best"].items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="suffix.json")
    p.add_argument("--worlds", default="v1,v2")
    p.add_argument("--eval-clips", type=int, default=64)
    p.add_argument("--warm-clips", type=int, default=1000)
    p.add_argument("--batch-sizes", default="8,32,64")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    report = {
        "date": str(date.today()),
        "machine": machine(),
        "args": vars(args),
        "worlds": [run_world(w, args) for w in args.worlds.split(",")],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
