"""FLASH speedup benchmark: every method on the same clips, in one run,
alternating methods and batch sizes, with warm-up and medians, and a check that
outputs are identical.

    python -m bench.speedup --out report.json [--videos DIR] [--model DIR] [--drafter DIR]
                                 [--text-drafter DIR] [--clips N] [--repeats R]
                                 [--batch-sizes 1,16,32,64] [--compile [--compile-backend B]]

Rows per batch size (greedy): `target` (flashcap's loop, no drafter),
`hf_generate` (Hugging Face generate), `flash` (fixed block), `flash_adaptive`
(BlockPolicy), and at batch 1 also `flash_text_only` (the ablation drafter),
`prompt_lookup` (Hugging Face prompt-lookup decoding, an outside peer) and
`prompt_lookup_loop` (the same method in flashcap's loop, `flash.lookup`:
Hugging Face's fails on video prompts in transformers 5.x). speedup = plain
time / method time on the same clips at the same batch size; identical = share
of clips whose tokens equal that clip decoded alone by `target`. A mismatch
(possible outside float64) is explained by the target's logit margin at the
first differing token.

Every row decodes every one of --clips clips (so no batch size may exceed it).
Each repeat is one round over every batch size, in a rotating order, and every
method within it, in a rotating order; the first round warms up (graph capture
included). The sweep goes on past the largest --batch-sizes, doubling, while a
method's best tokens/s sits at the largest size tried; the report's
`sweep.still_rising` names the methods that had not peaked when --clips
stopped it.

`--fixed-blocks 0,2,4` adds `flash_k0`, `flash_k2`, `flash_k4`: the FLASH drafter with that fixed
block length (0 is plain decoding in the same loop), the yardstick of `flash_adaptive`.

`target_continuous` and `flash_continuous` (batch > 1) decode every clip with
continuous batching (`flash.Engine`): at most `batch` rows decode at once and
waiting clips join as rows finish, so no batch runs half empty at its tail.
`--compile` adds each loop method with its passes compiled (`..._compiled`).

A captioning job is a throughput job, so every row also gives clips/s, the
spread of tokens/s over the repeats and the prefill / draft / verify split, and
the report ends with best-vs-best: each method at its own best batch size (most
tokens/s) over plain decoding at its best: the fastest of every plain method
(`target...` and `hf_...`, whatever their identity, which is shown), while a
FLASH setting counts only where it kept every output.
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
        self.backend = "inductor"  # torch.compile backend of the `..._compiled` rows

    def __call__(self, method: str, inputs) -> tuple[float, list[list[int]], flash.DecodeStats | None]:
        """Decode a processor batch with one method: (seconds, new tokens per row, stats)."""
        batch = inputs["input_ids"].shape[0]
        start = time.perf_counter()
        stats = None
        fixed = method.startswith("flash_k")  # flash_k3: the FLASH drafter with a fixed block of 3
        compiled = method.endswith("_compiled")  # target_compiled, flash_compiled: passes captured as graphs
        method = method.removesuffix("_compiled")
        if method in LOOP_METHODS or fixed:
            drafter = self.drafters.get("flash" if method == "flash_adaptive" or fixed else method)
            if method == "prompt_lookup_loop":  # fresh per call: it keeps each row's text
                drafter = PromptLookupDrafter(block_size=self.lookup, max_ngram=2)
            block = int(method.removeprefix("flash_k")) if fixed else None
            if method == "flash_adaptive":
                block = self.policies.setdefault(batch, flash.BlockPolicy(max_block=drafter.block_size))
            out = flash.generate(
                self.target,
                drafter,
                inputs,
                max_new_tokens=self.max_new,
                block_size=block,
                compile=self.backend if compiled else None,
                **self.penalty,
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
    base = method.removesuffix("_compiled")
    engine = flash.Engine(
        runner.target,
        runner.drafters.get(CONTINUOUS[base]),
        max_new_tokens=runner.max_new,
        compile=runner.backend if method.endswith("_compiled") else None,
        **runner.penalty,
    )
    start = time.perf_counter()
    keys = engine.run(n_clips, inputs_for, rows)
    seconds = time.perf_counter() - start
    return seconds, [engine.sequences[k] for k in keys], engine.stats


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


class BatchSize:
    """One batch size's methods over every clip, timed a round at a time: `run` alternates the
    batch sizes in each round, and the methods within each. Static methods decode consecutive
    groups of `batch` clips (units); continuous ones every clip through one engine."""

    def __init__(self, runner: Runner, inputs_for, n_clips: int, batch: int, methods: list[str], engines: list[str]):
        self.batch, self.methods, self.engines, self.n_clips = batch, methods, engines, n_clips
        self.units = [list(range(i, min(i + batch, n_clips))) for i in range(0, n_clips, batch)]
        self.attempt = _Attempts(runner, [inputs_for(u) for u in self.units], methods)
        self.times: Timings = {m: [[] for _ in self.units] for m in methods}
        self.outputs: dict[str, list[list[int]]] = {m: [[] for _ in range(n_clips)] for m in methods}
        self.stats: dict[str, list] = {m: [None for _ in self.units] for m in methods}
        self.runner, self.made = runner, {}
        self.inputs_for = inputs_for
        self.engine_times: dict[str, list[float]] = {m: [] for m in engines}
        self.engine_results: dict[str, tuple] = {}

    def _prepared(self, indices: list[int]):
        """Processor batches of the continuous rows, made once (in the warm-up), outside the timing."""
        if tuple(indices) not in self.made:
            self.made[tuple(indices)] = self.inputs_for(indices)
        return self.made[tuple(indices)]

    def warm(self, units: int) -> None:
        """Every method once on the first `units` units, every engine once over all clips (graph capture)."""
        for u in range(min(units, len(self.units))):
            for m in self.methods:
                self.attempt(m, u)
        for m in self.engines:
            self.engine_results[m] = continuous(self.runner, m, self._prepared, self.n_clips, self.batch)[1:]

    def round(self, rep: int) -> None:
        for u in range(len(self.units)):
            shift = (rep + u) % len(self.methods)
            for m in self.methods[shift:] + self.methods[:shift]:  # alternate the order
                result = self.attempt(m, u)
                if result is None:
                    continue
                seconds, tokens, st = result
                self.times[m][u].append(seconds)
                for c, t in zip(self.units[u], tokens):
                    self.outputs[m][c] = t
                self.stats[m][u] = st
        for m in self.engines if rep % 2 else self.engines[::-1]:
            seconds, tokens, stats = continuous(self.runner, m, self._prepared, self.n_clips, self.batch)
            self.engine_times[m].append(seconds)
            self.engine_results[m] = (tokens, stats)

    def rows(self, target, reference: list[list[int]], clips: list[Path]) -> list[dict]:
        rows = []
        for m in self.methods:
            rows.append(self._static_row(m, target, reference, clips))
        base = next(r for r in rows if r["method"] == "target")
        rows += [self._engine_row(m, reference, base) for m in self.engines]
        return rows

    def _static_row(self, m: str, target, reference: list[list[int]], clips: list[Path]) -> dict:
        failures, units = self.attempt.failures[m], self.units
        ok = [u for u in range(len(units)) if u not in failures]  # speed compared on the same units
        if not ok:
            error = next(iter(failures.values()))
            return {"method": m, "batch_size": self.batch, "clips": 0, "failed_clips": self.n_clips, "error": error}
        row = _method_row(m, self.batch, units, ok, self.times, self.outputs, reference)
        if failures:
            row["failed_clips"] = sum(len(units[u]) for u in failures)
            row["error"] = next(iter(failures.values()))
        sts = [self.stats[m][u] for u in ok if self.stats[m][u] is not None and self.stats[m][u].cycles]
        _add_decode_stats(row, m, sts)
        outputs = self.outputs[m]
        mismatches = [
            {"clip": clips[c].name, **first_difference_margin(target, self.inputs_for([c]), reference[c], outputs[c])}
            for u in ok
            for c in units[u]
            if outputs[c] != reference[c]
        ]
        if mismatches:
            row["mismatches"] = mismatches
        return row

    def _engine_row(self, m: str, reference: list[list[int]], base: dict) -> dict:
        tokens, stats = self.engine_results[m]
        total = statistics.median(self.engine_times[m])
        count = sum(len(t) for t in tokens)
        spent = stats.prefill_s + stats.draft_s + stats.verify_s
        row = {
            "method": m,
            "batch_size": self.batch,
            "clips": self.n_clips,
            "tokens": count,
            "tokens_per_s": count / total,
            "clips_per_s": self.n_clips / total,
            "spread": _spread([count / t for t in self.engine_times[m]]),
            "speedup": (count / total) / base["tokens_per_s"],  # over static plain decoding at this batch size
            "acceptance_length": stats.acceptance_length if stats.cycles else 1.0,
            "identical": sum(t == r for t, r in zip(tokens, reference)) / self.n_clips,
            "verify_ms_per_pass": 1000 * stats.verify_s / max(stats.cycles, 1),
            "split": {part: getattr(stats, f"{part}_s") / spent for part in ("prefill", "draft", "verify")},
        }
        if CONTINUOUS[m.removesuffix("_compiled")]:
            row["draft_ms_per_pass"] = 1000 * stats.draft_s / max(stats.cycles, 1)
        return row


def _spread(rates: list[float]) -> list[float]:
    """[min, max] of a row's tokens/s over its repeats."""
    return [min(rates), max(rates)] if rates else []


def _add_decode_stats(row: dict, m: str, sts: list[flash.DecodeStats]) -> None:
    """Acceptance, ms per draft/verify pass and the prefill/draft/verify split of `sts` into `row`."""
    if sts and not m.startswith("target"):
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
    repeats = min(len(times[m][u]) for u in ok)
    per_repeat = [sum(times[m][u][r] for u in ok) for r in range(repeats)]
    return {
        "method": m,
        "batch_size": batch,
        "clips": len(ok_clips),
        "tokens": tokens,
        "tokens_per_s": tokens / total_time,
        "clips_per_s": len(ok_clips) / total_time,
        "spread": _spread([tokens / t for t in per_repeat]),
        "speedup": base_time / total_time,
        "acceptance_length": 1.0,
        "identical": sum(same) / len(same),
    }


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


def _methods(batch: int, fixed_blocks: list[int], drafters: dict, compiled: bool) -> list[str]:
    """The static rows measured at this batch size, less those whose drafter is missing."""
    wanted = METHODS if batch == 1 else ["target", "hf_generate", "flash", "flash_adaptive"]
    wanted = wanted + [f"flash_k{k}" for k in fixed_blocks]
    wanted += ["target_compiled", "flash_compiled"] if compiled else []
    return [m for m in wanted if not m.startswith("flash") or _drafter_of(m) in drafters]


def _drafter_of(method: str) -> str:
    return "flash_text_only" if method == "flash_text_only" else "flash"


def _engines(batch: int, drafters: dict, args: argparse.Namespace) -> list[str]:
    """The continuous-batching rows at this batch size."""
    if batch == 1 or args.no_continuous:
        return []
    names = [m for m in CONTINUOUS if CONTINUOUS[m] is None or CONTINUOUS[m] in drafters]
    return names + ([f"{m}_compiled" for m in names] if args.compile else [])


def _rising(rows: list[dict], largest: int) -> list[str]:
    """Methods whose most tokens/s came at the largest batch size tried: their sweep has not peaked."""
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("clips") and (r["method"] not in best or r["tokens_per_s"] > best[r["method"]]["tokens_per_s"]):
            best[r["method"]] = r
    return sorted(m for m, r in best.items() if r["batch_size"] == largest and largest > 1)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    target, drafters = _load_models(args)
    clips, frames, metadata = _clips(args)
    inputs_for = _inputs_maker(target, args.prompt, frames, metadata)
    runner = Runner(target, drafters, args.max_new_tokens, args.lookup_tokens, args.repetition_penalty)
    runner.backend = args.compile_backend
    fixed_blocks = [int(k) for k in args.fixed_blocks.split(",")] if args.fixed_blocks else []
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    def measured(batch: int) -> BatchSize:
        methods = _methods(batch, fixed_blocks, drafters, args.compile)
        size = BatchSize(runner, inputs_for, len(clips), batch, methods, _engines(batch, drafters, args))
        size.warm(args.warmup)
        return size

    measures = {b: measured(b) for b in sizes}
    for rep in range(args.repeats):  # each round: every batch size, in a rotating order
        shift = rep % len(sizes)
        for b in sizes[shift:] + sizes[:shift]:
            measures[b].round(rep)
    reference = measures[1].outputs["target"]  # every clip decoded alone
    rows = [r for b in sizes for r in measures[b].rows(target, reference, clips)]
    while _rising(rows, sizes[-1]) and 2 * sizes[-1] <= len(clips):  # sweep on until it peaks
        sizes.append(2 * sizes[-1])
        measures[sizes[-1]] = measured(sizes[-1])
        for rep in range(args.repeats):
            measures[sizes[-1]].round(rep)
        rows += measures[sizes[-1]].rows(target, reference, clips)
    return {
        "machine": machine(),
        "date": date.today().isoformat(),
        **best_vs_best(rows),
        "sweep": {"batch_sizes": sizes, "still_rising": _rising(rows, sizes[-1])},
        "world": args.world,
        "clips": len(clips),
        "model": args.model,
        "drafter": args.drafter,
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
        "repeats": args.repeats,
        "device": args.device,
        "dtype": args.dtype,
        "compile_backend": args.compile_backend if args.compile else None,
        "rows": rows,
    }


def best_vs_best(rows: list[dict]) -> dict:
    """Each method at its best batch size, and its tokens/s over plain decoding's best. Every plain
    method (`target...`, `hf_...`) is a candidate whatever its identity (shown beside it); a FLASH
    setting counts only where it kept every output."""
    best: dict[str, dict] = {}
    for r in rows:
        plain = r["method"].startswith(("target", "hf_"))
        if r.get("clips") and (plain or r.get("identical", 0) == 1.0):
            if r["method"] not in best or r["tokens_per_s"] > best[r["method"]]["tokens_per_s"]:
                keys = ("batch_size", "tokens_per_s", "clips_per_s", "identical", "spread")
                best[r["method"]] = {k: r[k] for k in keys if k in r}
    plain = [m for m in best if m.startswith(("target", "hf_"))]
    if not plain:
        return {"best": best}
    base = max(plain, key=lambda m: best[m]["tokens_per_s"])
    ratio = {m: b["tokens_per_s"] / best[base]["tokens_per_s"] for m, b in best.items()}
    return {"best": best, "best_plain": base, "best_vs_best": ratio}


def markdown(report: dict) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']}; held-out clips, "
        f"greedy, {report.get('dtype', 'float32')}, median of {report['repeats']} alternating rounds; "
        f"speedup over plain decoding at the same batch size; identical = rows equal to that clip decoded alone.",
        "",
        "| method | batch | tokens/s (min–max) | speedup | acceptance length | identical | draft ms/pass "
        "| verify ms/pass |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        if not r.get("clips"):
            lines.append(f"| {r['method']} | {r['batch_size']} | failed on every clip: {r['error'][:80]} |||||| ")
            continue
        draft = f"{r['draft_ms_per_pass']:.2f}" if "draft_ms_per_pass" in r else ""
        verify = f"{r['verify_ms_per_pass']:.2f}" if "verify_ms_per_pass" in r else ""
        spread = "–".join(f"{x:.0f}" for x in r.get("spread", []))
        lines.append(
            f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.1f} ({spread}) | {r['speedup']:.2f}x | "
            f"{r['acceptance_length']:.2f} | {100 * r['identical']:.0f}% | {draft} | {verify} |"
            + (f" failed on {r['failed_clips']} clips" if r.get("failed_clips") else "")
        )
    if "best_vs_best" in report:
        base = report["best_plain"]
        lines += ["", f"Best-vs-best (each at its own best batch size; baseline {base}):", ""]
        lines += [
            "| method | best batch | tokens/s | clips/s | identical | over plain's best |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for m, b in report["best"].items():
            lines.append(
                f"| {m} | {b['batch_size']} | {b['tokens_per_s']:.1f} | {b['clips_per_s']:.2f} | "
                f"{100 * b.get('identical', 1.0):.0f}% | {report['best_vs_best'][m]:.2f}x |"
            )
    sweep = report.get("sweep")
    if sweep and sweep["still_rising"]:
        lines += ["", f"Still rising at batch {sweep['batch_sizes'][-1]} (more clips needed): "
                  + ", ".join(sweep["still_rising"])]  # fmt: skip
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
        "--batch-sizes",
        default="1,16,32,64",
        help="comma-separated (batch 1 always first); doubled on while a method's tokens/s still rises (up to --clips)",
    )
    p.add_argument("--compile", action="store_true", help="add rows with the passes compiled (..._compiled)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
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
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
