"""Suffix decoding on text alone: how far its proposals would be accepted when the target writes
given captions, with no model run. For each evaluated caption, cycle by cycle: propose (at most
`--block` tokens) from a store of other captions and from the caption so far, accept the agreed
prefix, add the next true token; acceptance length = tokens / cycles, as greedy verification
would give it.

It separates the method from the demo's target: the demo worlds' true captions (v1 templated; v2
with its opening, connectives, verbs and ending drawn per clip) against the store of their kind,
at store sizes 10 / 100 / 1,000.

    python -m bench.suffix_text [--eval 64] [--out report.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

from transformers import AutoTokenizer

from bench.speedup import ROOT
from flash.suffix import SuffixDrafter, SuffixStore, _agreed, _Row

EVAL_SEED, STORE_SEED = 500_000, 600_000


def captions(world: str, seeds: range) -> list[str]:
    if world == "v1":
        from demo.world import scene_for_seed

        return [scene_for_seed(s).caption() for s in seeds]
    from demo import world_v2 as v2

    return [v2.clip_for_seed(s).caption() for s in seeds]


def simulated_acceptance(drafter: SuffixDrafter, tokens: list[int], block: int) -> float:
    """Tokens per cycle if the target wrote `tokens` and verified the drafter's proposals greedily."""
    row, done, cycles = _Row([], tokens[0], drafter.store.trie.depth), 1, 0
    while done < len(tokens):
        proposal, _ = drafter.propose(row, block)
        step = _agreed(proposal, tokens[done:]) + 1  # accepted, then the target's own token
        row.extend(tokens[done : done + step])
        done, cycles = done + step, cycles + 1
    return (len(tokens) - 1) / max(cycles, 1)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", type=int, default=64)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--out", default="suffix_text.json")
    args = p.parse_args(argv)
    out = {"date": str(date.today()), "block": args.block, "worlds": {}}
    for world, model in (("v1", "demo-target"), ("v2", "demo-v2-target")):
        tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / model)
        evaluated = _encode(tokenizer, captions(world, range(EVAL_SEED, EVAL_SEED + args.eval)))
        stored = _encode(tokenizer, captions(world, range(STORE_SEED, STORE_SEED + 1000)))
        curve = {}
        for n in (0, 10, 100, 1000):
            store = SuffixStore()
            for t in stored[:n]:
                store.add(t)
            drafter = SuffixDrafter(store, block_size=args.block)
            curve[str(n)] = statistics.fmean(simulated_acceptance(drafter, t, args.block) for t in evaluated)
        out["worlds"][world] = {"mean_caption_tokens": statistics.fmean(map(len, evaluated)), "acceptance": curve}
        print(world, json.dumps(out["worlds"][world]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
