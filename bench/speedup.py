"""FLASH speedup benchmark: every method on the same clips, in one run,
alternating, with warm-up and medians, and a check that outputs are identical.

    python -m bench.speedup --out report.json [--videos DIR] [--model DIR] [--drafter DIR]
                                 [--text-drafter DIR] [--clips N] [--batch1-clips N] [--repeats R]
                                 [--batch-sizes 1,16,32,64]

Rows per batch size (greedy): `target` (flashcap's loop, no drafter: the
baseline), `hf_generate` (Hugging Face generate, to show the baseline is not
slowed down), `flash` (fixed block), `flash_adaptive` (BlockPolicy), and at
batch 1 also `flash_text_only` (the ablation drafter), `prompt_lookup`
(Hugging Face prompt-lookup decoding, an outside peer) and `prompt_lookup_loop`
(the same method in flashcap's loop, `flash.lookup`: Hugging Face's fails on
video prompts in transformers 5.x). speedup = baseline
time / method time on the same clips at the same batch size; identical =
share of clips whose tokens equal that clip decoded alone by the baseline. A
mismatch (possible outside float64) is explained by the target's logit margin
at the first differing token.

Every batch size decodes all --clips clips, so none may exceed it (a larger batch would decode the
same clips as a smaller one). Batch 1 is timed on the first --batch1-clips; the other clips are
decoded alone once, untimed, as the reference for `identical`.

`--fixed-blocks 0,2,4` adds `flash_k0`, `flash_k2`, `flash_k4`: the FLASH drafter with that fixed
block length (0 is plain decoding in the same loop), the yardstick of `flash_adaptive`.

`target_continuous` and `flash_continuous` (batch > 1) decode every clip with
continuous batching (`flash.Engine`): at most `batch` rows decode at once and
waiting clips join as rows finish, so no batch runs half empty at its tail.

A captioning job is a throughput job, so every row also gives clips/s and the
prefill / draft / verify split, and the report ends with best-vs-best: each
method at its own best batch size (most tokens/s) over plain decoding at its
best (the fastest method without a drafter: `target...` or `hf_...`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import flash
from demo.world import (
    FRAMES,
    PROMPT,
    SAMPLED_FRAMES,
    decode_frames,
    model_inputs,
    render,
    sample_indices,
    scene_for_seed,
    write_videos,
)
from flash.lookup import PromptLookupDrafter

ROOT = Path(__file__).resolve().parents[1]

METHODS = ["target", "hf_generate", "flash", "flash_adaptive", "flash_text_only", "prompt_lookup", "prompt_lookup_loop"]
LOOP_METHODS = ("target", "flash", "flash_text_only", "flash_adaptive", "prompt_lookup_loop")  # flash.generate


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.system()} {platform.machine()}{gpu}"
    )


def _trim(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


class Runner:
    def __init__(
        self, target, drafters: dict, max_new_tokens: int, lookup_tokens: int, repetition_penalty: float | None = None
    ) -> None:
        self.target, self.drafters = target, drafters
        self.max_new, self.lookup = max_new_tokens, lookup_tokens
        # None: as the checkpoint's generation config says, on both sides.
        self.penalty = {} if repetition_penalty is None else {"repetition_penalty": repetition_penalty}
        self.eos = set(target.eos_token_ids.tolist())
        self.policies: dict[int, flash.BlockPolicy] = {}  # one adaptive policy per batch size, kept across calls

    def __call__(self, method: str, inputs) -> tuple[float, list[list[int]], flash.DecodeStats | None]:
        """Decode a processor batch with one method: (seconds, new tokens per row, stats)."""
        batch = inputs["input_ids"].shape[0]
        start = time.perf_counter()
        stats = None
        fixed = method.startswith("flash_k")  # flash_k3: the FLASH drafter with a fixed block of 3
        if method in LOOP_METHODS or fixed:
            drafter = self.drafters.get("flash" if method == "flash_adaptive" or fixed else method)
            if method == "prompt_lookup_loop":  # fresh per call: it keeps each row's text
                drafter = PromptLookupDrafter(block_size=self.lookup, max_ngram=2)
            block = int(method.removeprefix("flash_k")) if fixed else None
            if method == "flash_adaptive":
                block = self.policies.setdefault(batch, flash.BlockPolicy(max_block=drafter.block_size))
            out = flash.generate(
                self.target, drafter, inputs, max_new_tokens=self.max_new, block_size=block, **self.penalty
            )
            tokens, stats = out.sequences, out.stats
        else:
            kwargs = {"prompt_lookup_num_tokens": self.lookup} if method == "prompt_lookup" else {}
            inputs = inputs.to(self.target.device)
            with torch.inference_mode():
                ids = self.target.model.generate(
                    **inputs, do_sample=False, max_new_tokens=self.max_new, **self.penalty, **kwargs
                )
            tokens = [_trim(row[inputs["input_ids"].shape[1] :].tolist(), self.eos) for row in ids]
        return time.perf_counter() - start, tokens, stats


def first_difference_margin(target, inputs, reference: list[int], other: list[int]) -> dict:
    """Where two outputs part, and the target's top-1/top-2 logit margin there."""
    index = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    session, prefill = target.prefill(inputs)
    logits = prefill.last_logits[0]
    if index > 0:
        _, verify_logits = session.verify(torch.tensor([reference[:index]], device=target.device))
        logits = verify_logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return {"index": index, "margin": float(top[0] - top[1])}


CONTINUOUS = {"target_continuous": None, "flash_continuous": "flash"}  # method -> drafter


def continuous(runner: Runner, method: str, inputs_for, n_clips: int, rows: int):
    """Every clip through one engine with at most `rows` rows decoding; waiting clips join in groups
    of at least rows/4 (one prefill per group). Returns (seconds, tokens per clip, stats)."""
    engine = flash.Engine(
        runner.target, runner.drafters.get(CONTINUOUS[method]), max_new_tokens=runner.max_new, **runner.penalty
    )
    start = time.perf_counter()
    keys = engine.run(n_clips, inputs_for, rows)
    seconds = time.perf_counter() - start
    return seconds, [engine.sequences[k] for k in keys], engine.stats


def measure_continuous(runner, inputs_for, clips, batch, methods, repeats, reference, static_rows) -> list[dict]:
    """Rows for the continuous methods at one batch size (every clip in one engine run, alternating)."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    results = {}
    made: dict[tuple[int, ...], object] = {}

    def prepared(indices: list[int]):
        """Processor batches are made in the warm-up round, outside the timing, as the static rows'."""
        if tuple(indices) not in made:
            made[tuple(indices)] = inputs_for(indices)
        return made[tuple(indices)]

    for rep in range(repeats + 1):  # the first round warms up
        for m in methods if rep % 2 else methods[::-1]:
            seconds, tokens, stats = continuous(runner, m, prepared, len(clips), batch)
            if rep:
                times[m].append(seconds)
            results[m] = (tokens, stats)
    base = next(r for r in static_rows if r["method"] == "target")
    out = []
    for m in methods:
        tokens, stats = results[m]
        total = statistics.median(times[m])
        count = sum(len(t) for t in tokens)
        spent = stats.prefill_s + stats.draft_s + stats.verify_s
        row = {
            "method": m,
            "batch_size": batch,
            "clips": len(clips),
            "tokens": count,
            "tokens_per_s": count / total,
            "clips_per_s": len(clips) / total,
            "speedup": (count / total) / base["tokens_per_s"],  # over static plain decoding at this batch size
            "acceptance_length": stats.acceptance_length if stats.cycles else 1.0,
            "identical": sum(t == r for t, r in zip(tokens, reference)) / len(clips),
            "verify_ms_per_pass": 1000 * stats.verify_s / max(stats.cycles, 1),
            "split": {part: getattr(stats, f"{part}_s") / spent for part in ("prefill", "draft", "verify")},
        }
        if CONTINUOUS[m]:
            row["draft_ms_per_pass"] = 1000 * stats.draft_s / max(stats.cycles, 1)
        out.append(row)
    return out


Timings = dict[str, list[list[float]]]  # method -> unit -> seconds of each repeat


class _Attempts:
    """Runs one method on one unit; an outside method may fail on some inputs (recorded, not fatal,
    and not tried again on that unit)."""

    def __init__(self, runner: Runner, unit_inputs: list, methods: list[str]) -> None:
        self.runner, self.unit_inputs = runner, unit_inputs
        self.failures: dict[str, dict[int, str]] = {m: {} for m in methods}

    def __call__(self, m: str, u: int):
        if u in self.failures[m]:
            return None
        try:
            return self.runner(m, self.unit_inputs[u])
        except (ValueError, RuntimeError, IndexError) as err:
            self.failures[m][u] = f"{type(err).__name__}: {err}"[:300]
            return None


def _time_units(
    attempt: _Attempts, units: list[list[int]], n_clips: int, methods: list[str], repeats: int, warmup: int
) -> tuple[Timings, dict[str, list[list[int]]], dict[str, list]]:
    """Every method on every unit, `repeats` times in a rotating order after `warmup` warm-up units:
    (seconds, tokens per clip, stats per unit), each by method."""
    for u in range(min(warmup, len(units))):  # warm-up: every method once
        for m in methods:
            attempt(m, u)
    times: Timings = {m: [[] for _ in units] for m in methods}
    outputs: dict[str, list[list[int]]] = {m: [[] for _ in range(n_clips)] for m in methods}
    stats: dict[str, list] = {m: [None for _ in units] for m in methods}
    for rep in range(repeats):
        for u in range(len(units)):
            shift = (rep + u) % len(methods)
            for m in methods[shift:] + methods[:shift]:  # alternate the order
                result = attempt(m, u)
                if result is None:
                    continue
                seconds, tokens, st = result
                times[m][u].append(seconds)
                for c, t in zip(units[u], tokens):
                    outputs[m][c] = t
                stats[m][u] = st
    return times, outputs, stats


def _add_decode_stats(row: dict, m: str, sts: list[flash.DecodeStats]) -> None:
    """Acceptance, ms per draft/verify pass and the prefill/draft/verify split of `sts` into `row`."""
    if sts and m != "target":
        row["acceptance_length"] = sum(s.accepted + s.row_cycles for s in sts) / sum(s.row_cycles for s in sts)
        row["draft_ms_per_pass"] = 1000 * sum(s.draft_s for s in sts) / sum(s.cycles + 1 for s in sts)
    if sts:
        row["verify_ms_per_pass"] = 1000 * sum(s.verify_s for s in sts) / sum(s.cycles for s in sts)
        # Where a generate call's time goes (the prefill runs the vision tower and the prompt: paid by both).
        spent = sum(s.prefill_s + s.draft_s + s.verify_s for s in sts)
        row["split"] = {
            part: sum(getattr(s, f"{part}_s") for s in sts) / spent for part in ("prefill", "draft", "verify")
        }


def _method_row(
    m: str,
    batch: int,
    units: list[list[int]],
    ok: list[int],
    times: Timings,
    outputs: dict[str, list[list[int]]],
    reference: list[list[int]],
) -> dict:
    """One method's speed and identity over the units it decoded (`ok`), against the baseline on the same units."""
    ok_clips = [c for u in ok for c in units[u]]
    base_time = sum(statistics.median(times["target"][u]) for u in ok)
    total_time = sum(statistics.median(times[m][u]) for u in ok)
    tokens = sum(len(outputs[m][c]) for c in ok_clips)
    same = [outputs[m][c] == reference[c] for c in ok_clips]
    return {
        "method": m,
        "batch_size": batch,
        "clips": len(ok_clips),
        "tokens": tokens,
        "tokens_per_s": tokens / total_time,
        "clips_per_s": len(ok_clips) / total_time,
        "speedup": base_time / total_time,
        "acceptance_length": 1.0,
        "identical": sum(same) / len(same),
    }


def measure(
    runner: Runner,
    target,
    inputs_for,
    clips: list[Path],
    batch: int,
    methods: list[str],
    repeats: int,
    warmup: int,
    alone: list[list[int]] | None,
) -> tuple[list[dict], list[list[int]]]:
    """Rows for one batch size. Units are consecutive groups of `batch` clips, decoded as one batch."""
    units = [list(range(i, min(i + batch, len(clips)))) for i in range(0, len(clips), batch)]
    attempt = _Attempts(runner, [inputs_for(u) for u in units], methods)
    times, outputs, stats = _time_units(attempt, units, len(clips), methods, repeats, warmup)
    failures = attempt.failures

    reference = alone if alone is not None else outputs["target"]  # each row decoded alone (batch 1)
    rows = []
    for m in methods:
        ok = [u for u in range(len(units)) if u not in failures[m]]  # speed compared on the same units
        if not ok:
            error = next(iter(failures[m].values()))
            rows.append({"method": m, "batch_size": batch, "clips": 0, "failed_clips": len(clips), "error": error})
            continue
        row = _method_row(m, batch, units, ok, times, outputs, reference)
        if failures[m]:
            row["failed_clips"] = sum(len(units[u]) for u in failures[m])
            row["error"] = next(iter(failures[m].values()))
        _add_decode_stats(row, m, [stats[m][u] for u in ok if stats[m][u] is not None and stats[m][u].cycles])
        mismatches = [
            {"clip": clips[c].name, **first_difference_margin(target, inputs_for([c]), reference[c], outputs[m][c])}
            for u in ok
            for c in units[u]
            if outputs[m][c] != reference[c]
        ]
        if mismatches:
            row["mismatches"] = mismatches
        rows.append(row)
    return rows, outputs["target"]


def _v2_clips(args: argparse.Namespace, videos: Path | None):
    """World v2's held-out clips: (names, frames, metadata), each clip with its own length."""
    from demo import world_v2 as v2
    from pipeline.decode import decode_video, video_metadata

    seeds = range(args.seed, args.seed + args.clips)
    if args.rendered:
        frames, metadata = zip(*(v2.clip_frames(v2.clip_for_seed(s), rendered=True, count=args.frames) for s in seeds))
        return [Path(f"scene_{s}") for s in seeds], list(frames), list(metadata)
    if videos is None:
        videos = Path(tempfile.mkdtemp(prefix="flashcap-bench-v2-"))
        v2.write_videos(videos, args.clips, seed=args.seed)
    names = sorted(p for p in videos.iterdir() if p.suffix == ".mp4")[: args.clips]
    decoded = [decode_video(c.read_bytes(), args.frames, 448, None, 64) for c in names]
    return names, [f for f, _ in decoded], [video_metadata(info) for _, info in decoded]


def _load_models(args: argparse.Namespace) -> tuple[flash.Target, dict]:
    """The target and the drafters found on disk (a missing drafter drops its rows)."""
    target = flash.load_target(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    drafters = {}
    if Path(args.drafter).is_dir():
        drafters["flash"] = flash.FlashDrafter.from_pretrained(args.drafter, target)
    if args.text_drafter and Path(args.text_drafter).is_dir():
        drafters["flash_text_only"] = flash.FlashDrafter.from_pretrained(args.text_drafter, target)
    return target, drafters


def _clips(args: argparse.Namespace) -> tuple[list[Path], list, list | None]:
    """The held-out clips: (names, frames, metadata); metadata None in world v1, where every clip's
    metadata is the same (model_inputs)."""
    videos = Path(args.videos) if args.videos else None
    if args.world == "v2":
        return _v2_clips(args, videos)
    seeds = range(args.seed, args.seed + args.clips)
    if args.rendered:  # frames straight from the renderer: no codec needed (machines without PyAV/decord)
        only = sample_indices(FRAMES, args.frames)
        return [Path(f"scene_{s}") for s in seeds], [render(scene_for_seed(s), only=only) for s in seeds], None
    if videos is None:
        videos = Path(tempfile.mkdtemp(prefix="flashcap-bench-"))
        write_videos(videos, args.clips, seed=args.seed)  # held-out seeds (training uses >= 1,000,000)
    clips = sorted(p for p in videos.iterdir() if p.suffix == ".mp4")[: args.clips]
    return clips, [decode_frames(c.read_bytes(), args.frames) for c in clips], None


def _inputs_maker(target, prompt: str, frames: list, metadata: list | None):
    """inputs_for(clip indices) -> one processor batch of those clips."""

    def inputs_for(indices: list[int]):
        if metadata is None:
            return model_inputs(target.processor, [prompt] * len(indices), [frames[i] for i in indices])
        return target.processor(
            text=[prompt] * len(indices),
            videos=[frames[i] for i in indices],
            video_metadata=[metadata[i] for i in indices],
            do_sample_frames=False,
            return_tensors="pt",
            padding=True,
        )

    return inputs_for


def _methods(batch: int, fixed_blocks: list[int], drafters: dict) -> list[str]:
    """The rows measured at this batch size, less those whose drafter is missing."""
    wanted = METHODS if batch == 1 else ["target", "hf_generate", "flash", "flash_adaptive"]
    wanted = wanted + [f"flash_k{k}" for k in fixed_blocks]
    return [
        m
        for m in wanted
        if not m.startswith("flash") or ("flash" if m == "flash_adaptive" or m.startswith("flash_k") else m) in drafters
    ]


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    target, drafters = _load_models(args)
    clips, frames, metadata = _clips(args)
    inputs_for = _inputs_maker(target, args.prompt, frames, metadata)
    runner = Runner(target, drafters, args.max_new_tokens, args.lookup_tokens, args.repetition_penalty)
    rows: list[dict] = []
    alone = None
    fixed_blocks = [int(k) for k in args.fixed_blocks.split(",")] if args.fixed_blocks else []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        methods = _methods(batch, fixed_blocks, drafters)
        timed = clips[: args.batch1_clips] if batch == 1 else clips
        batch_rows, plain = measure(runner, target, inputs_for, timed, batch, methods, args.repeats, args.warmup, alone)
        if batch == 1:  # the clips not timed at batch 1 are decoded alone once, as the reference
            alone = plain + [runner("target", inputs_for([c]))[1][0] for c in range(len(timed), len(clips))]
        elif not args.no_continuous:
            engines = [m for m in CONTINUOUS if CONTINUOUS[m] is None or CONTINUOUS[m] in drafters]
            batch_rows += measure_continuous(runner, inputs_for, clips, batch, engines, args.repeats, alone, batch_rows)
        rows.extend(batch_rows)
        print(
            markdown(
                {"date": date.today().isoformat(), "machine": machine(), "repeats": args.repeats, "rows": batch_rows}
            ),
            flush=True,
        )
    return {
        "machine": machine(),
        "date": date.today().isoformat(),
        **best_vs_best(rows),
        "world": args.world,
        "model": args.model,
        "drafter": args.drafter,
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
        "repeats": args.repeats,
        "device": args.device,
        "dtype": args.dtype,
        "rows": rows,
    }


def best_vs_best(rows: list[dict]) -> dict:
    """Each method at its best batch size, and its tokens/s over plain decoding's best."""
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("clips") and r.get("identical", 0) == 1.0:  # only settings that keep every output
            if r["method"] not in best or r["tokens_per_s"] > best[r["method"]]["tokens_per_s"]:
                best[r["method"]] = {k: r[k] for k in ("batch_size", "tokens_per_s", "clips_per_s")}
    plain = [m for m in best if m.startswith(("target", "hf_"))]
    if not plain:
        return {"best": best}
    base = max(plain, key=lambda m: best[m]["tokens_per_s"])
    ratio = {m: b["tokens_per_s"] / best[base]["tokens_per_s"] for m, b in best.items()}
    return {"best": best, "best_plain": base, "best_vs_best": ratio}


def markdown(report: dict) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']}; held-out clips, "
        f"greedy, {report.get('dtype', 'float32')}, median of {report['repeats']} alternating runs; "
        f"speedup over plain decoding at the same batch size; identical = rows equal to that clip decoded alone.",
        "",
        "| method | batch | tokens/s | speedup | acceptance length | identical | draft ms/pass | verify ms/pass |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        if not r["clips"]:
            lines.append(f"| {r['method']} | {r['batch_size']} | failed on every clip: {r['error'][:80]} |||||| ")
            continue
        draft = f"{r['draft_ms_per_pass']:.2f}" if "draft_ms_per_pass" in r else ""
        verify = f"{r['verify_ms_per_pass']:.2f}" if "verify_ms_per_pass" in r else ""
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['acceptance_length']:.2f} | {100 * r['identical']:.0f}% | {draft} | {verify} |"
            + (f" failed on {r['failed_clips']} clips" if r.get("failed_clips") else "")
        )
    if "best_vs_best" in report:
        base = report["best_plain"]
        lines += ["", f"Best-vs-best (each at its own best batch size; baseline {base}):", ""]
        lines += ["| method | best batch | tokens/s | clips/s | over plain's best |", "| --- | --- | --- | --- | --- |"]
        for m, b in report["best"].items():
            lines.append(
                f"| {m} | {b['batch_size']} | {b['tokens_per_s']:.1f} | {b['clips_per_s']:.2f} | "
                f"{report['best_vs_best'][m]:.2f}x |"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="report.json")
    p.add_argument("--videos", help="folder of clips (default: held-out demo clips, generated)")
    p.add_argument("--model", default=str(ROOT / "models" / "demo-target"))
    p.add_argument("--drafter", default=str(ROOT / "models" / "demo-drafter"))
    p.add_argument("--text-drafter", default=str(ROOT / "models" / "demo-drafter-text-only"))
    p.add_argument("--clips", type=int, default=64, help="clips decoded at each batch size (>= the largest)")
    p.add_argument(
        "--batch1-clips", type=int, default=32, help="the first N clips are timed at batch 1 (the rest decoded once)"
    )
    p.add_argument("--batch-sizes", default="1,16,32,64", help="comma-separated (batch 1 always first)")
    p.add_argument("--seed", type=int, default=500, help="first held-out scene seed for generated clips")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--repetition-penalty", type=float, help="applied on every side (default: the checkpoint's generation config)"
    )
    p.add_argument("--lookup-tokens", type=int, default=4, help="tokens proposed per cycle by the prompt-lookup rows")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--rendered", action="store_true", help="rendered demo frames instead of encoded clips")
    p.add_argument(
        "--fixed-blocks",
        default="",
        help="also FLASH with each of these fixed block lengths (rows flash_k<n>), to check the adaptive policy",
    )
    p.add_argument("--no-continuous", action="store_true", help="skip the continuous-batching rows")
    p.add_argument("--frames", type=int, default=SAMPLED_FRAMES)
    p.add_argument(
        "--world",
        choices=("v1", "v2"),
        default="v1",
        help="v2: demo world v2's clips, models (models/demo-v2-*), prompt, 16 frames and a 200-token budget",
    )
    return p


def _use_v2_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """World v2's models, prompt, frames and token budget, wherever the v1 default was left."""
    from demo import world_v2 as v2

    v1_defaults = {a.dest: a.default for a in p._actions}
    for name, value in (
        ("model", ROOT / "models" / "demo-v2-target"),
        ("drafter", ROOT / "models" / "demo-v2-drafter"),
        ("text_drafter", ROOT / "models" / "demo-v2-drafter-text-only"),
        ("prompt", v2.PROMPT),
        ("max_new_tokens", 200),
        ("frames", v2.SAMPLED_FRAMES),
    ):
        if getattr(args, name) == v1_defaults[name]:
            setattr(args, name, str(value) if isinstance(value, Path) else value)


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    if args.world == "v2":  # the v2 defaults, where the v1 ones were left
        _use_v2_defaults(p, args)
    if not args.batch_sizes.startswith("1"):
        args.batch_sizes = "1," + args.batch_sizes  # rows are compared with each clip decoded alone
    largest = max(int(b) for b in args.batch_sizes.split(","))
    if largest > args.clips:
        p.error(
            f"--batch-sizes {args.batch_sizes} needs --clips >= {largest} (got {args.clips}): a batch larger than "
            "the clips would decode the same clips as a smaller one"
        )
    args.batch1_clips = min(args.batch1_clips, args.clips)
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
