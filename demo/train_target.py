"""Train a demo target from scratch on the CPU: a small Qwen2.5-VL (Hugging
Face's class, 8 decoder layers) that learns to caption demo-world videos.

    python -m demo.train_target [--world v1|v2] [--out DIR] [--steps N] [--batch B]

World v1 (demo/world.py, short templated captions) trains models/demo-target; world v2
(demo/world_v2.py, long time-ordered captions) trains models/demo-v2-target. Training clips
use seeds >= 1,000,000; the held-out range is below that (the sample videos, tests and benchmarks
use it). Evaluation decodes real H.264 files and reports exact-match captions and, for v2, the
share of clauses right (demo.world_v2.clause_accuracy).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature

import demo.world_v2 as v2
import flash
from demo.tiny_models import build_qwen2_5_vl
from demo.world import (
    FRAMES,
    PROMPT,
    SAMPLED_FRAMES,
    decode_frames,
    encode_mp4,
    render,
    sample_indices,
    scene_for_seed,
    vocabulary,
)
from demo.world import clip_metadata as clip_metadata_v1

TRAIN_SEED_START = 1_000_000
TARGET_SIZES = dict(
    hidden_size=128,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=384,
    vision_depth=4,
    vision_hidden=96,
    image_side=112,
    # Qwen2.5-VL's released value. Clips are 16 frames at 8 fps, 4 sampled, so with the clip's metadata
    # each temporal patch spans 1 s and the two patches sit at time positions 0 and 2.
    tokens_per_second=2,
    num_frames=SAMPLED_FRAMES,  # the video processor's default, so the pipeline samples what training saw
)
# World v2: 16 frames of 4-8 s clips (8 temporal patches), captions of 60-170 words.
TARGET_SIZES_V2 = dict(
    TARGET_SIZES,
    hidden_size=192,
    num_heads=6,
    intermediate_size=576,
    num_frames=v2.SAMPLED_FRAMES,
)
WORLDS = ("v1", "v2")
DEFAULT_OUT = {"v1": "models/demo-target", "v2": "models/demo-v2-target"}
MAX_NEW_TOKENS = {"v1": 48, "v2": 200}


def training_scenes(rng: np.random.Generator, batch: int, object_weights: tuple[float, ...] | None = None):
    """`batch` training scenes; object_weights (w1, w2, w3): relative shares of one-, two- and three-object
    scenes (None: the world's own mix, a third each)."""
    if object_weights is None:
        return [scene_for_seed(int(s)) for s in rng.integers(TRAIN_SEED_START, 2**31 - 1, size=batch)]
    shares = np.asarray(object_weights, dtype=np.float64)
    if shares.shape != (3,) or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError(f"object weights must be three non-negative numbers, not all 0; got {object_weights}")
    scenes = []
    for n in rng.choice(3, size=batch, p=shares / shares.sum()) + 1:
        scene = scene_for_seed(int(rng.integers(TRAIN_SEED_START, 2**31 - 1)))
        while len(scene.objects) != n:  # the object count is uniform over seeds: about 3 draws
            scene = scene_for_seed(int(rng.integers(TRAIN_SEED_START, 2**31 - 1)))
        scenes.append(scene)
    return scenes


def _clips(world: str, rng: np.random.Generator, batch: int, object_weights=None):
    """(frames, metadata, prompt, caption) of `batch` training clips of the world."""
    if world == "v1":
        for scene in training_scenes(rng, batch, object_weights):
            frames = render(scene, only=sample_indices(FRAMES, SAMPLED_FRAMES))
            yield frames, clip_metadata_v1(len(frames)), PROMPT, scene.caption()
        return
    for seed in rng.integers(TRAIN_SEED_START, 2**31 - 1, size=batch):
        clip = v2.clip_for_seed(int(seed))
        metadata = v2.clip_metadata(clip)
        yield v2.render(clip, only=metadata["frames_indices"]), metadata, v2.PROMPT, clip.caption()


def training_batch(processor, rng: np.random.Generator, batch: int, object_weights=None, world: str = "v1"):
    texts, videos, metadata = [], [], []
    for frames, meta, prompt, caption in _clips(world, rng, batch, object_weights):
        frames = frames.astype(np.int16) + rng.integers(-3, 4, size=frames.shape, dtype=np.int16)  # codec noise
        videos.append(np.clip(frames, 0, 255).astype(np.uint8))
        texts.append(f"{prompt} {caption}<|im_end|>")
        metadata.append(meta)
    inputs = processor(
        text=texts, videos=videos, video_metadata=metadata, do_sample_frames=False, return_tensors="pt", padding=True
    )
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    # Learn only the caption: mask everything up to and including "assistant".
    tokenizer = processor.tokenizer
    assistant = tokenizer.convert_tokens_to_ids("assistant")
    for row in range(labels.shape[0]):
        start = (inputs["input_ids"][row] == assistant).nonzero()[-1].item()
        labels[row, : start + 1] = -100
    return inputs, labels


class EMA:
    """An exponential moving average of a model's parameters (decay warmed up as (1 + t) / (10 + t))."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach(), 1.0 - decay)

    @torch.no_grad()
    def swap_in(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Load the average into the model; return the live weights for `swap_out`."""
        live = {}
        for name, param in model.named_parameters():
            live[name] = param.detach().clone()
            param.copy_(self.shadow[name])
        return live

    @torch.no_grad()
    def swap_out(self, model: torch.nn.Module, live: dict[str, torch.Tensor]) -> None:
        for name, param in model.named_parameters():
            param.copy_(live[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {n: t.clone() for n, t in state["shadow"].items()}


_WORKER_PROCESSOR = None


def _init_worker(processor_dir: str) -> None:
    global _WORKER_PROCESSOR
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    _WORKER_PROCESSOR = AutoProcessor.from_pretrained(processor_dir)


def _worker_batch(task: tuple) -> tuple[dict[str, np.ndarray], np.ndarray]:
    # Numpy, not tensors: torch would pass tensors between processes as file descriptors, which
    # failed on the GPU machine ("received 0 items of ancdata") and killed the pool's result thread.
    seed, step, batch, object_weights, world = task
    rng = np.random.default_rng([seed, step])
    inputs, labels = training_batch(_WORKER_PROCESSOR, rng, batch, object_weights, world)
    return {k: v.numpy() for k, v in inputs.items()}, labels.numpy()


def batches(
    processor,
    processor_dir: str,
    rng,
    seed: int,
    first_step: int,
    steps: int,
    batch: int,
    workers: int,
    object_weights: tuple[float, ...] | None = None,
    world: str = "v1",
):
    """Training batches for steps first_step..steps. With workers, prepared ahead in worker processes
    (for fast accelerators), each step's scenes drawn from its own seed (seed, step), so a resumed run
    continues the same stream; without, drawn in turn from `rng` (kept in the resume state)."""
    if workers <= 0:
        for _ in range(first_step, steps + 1):
            yield training_batch(processor, rng, batch, object_weights, world)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (processor_dir,)) as pool:
        tasks = ((seed, step, batch, object_weights, world) for step in range(first_step, steps + 1))
        for arrays, labels in pool.imap(_worker_batch, tasks, chunksize=1):
            yield BatchFeature({k: torch.from_numpy(v) for k, v in arrays.items()}), torch.from_numpy(labels)


def evaluate(
    target, seeds: range, max_new_tokens: int = 48, rendered: bool = False, world: str = "v1"
) -> tuple[float, list[dict], dict]:
    """Exact-match rate on real mp4 clips decoded with decord (rendered: the renderer's frames, no
    codec), the rows, and (v2) clause counts summed over the clips (v2.clause_accuracy's keys)."""
    tok = target.processor.tokenizer
    hits, rows, clauses = 0, [], {}
    for s in seeds:
        if world == "v1":
            scene = scene_for_seed(s)
            want, prompt = scene.caption(), PROMPT
            if rendered:
                frames = render(scene, only=sample_indices(FRAMES, SAMPLED_FRAMES))
            else:
                frames = decode_frames(encode_mp4(render(scene)))
            metadata = clip_metadata_v1(len(frames))
        else:
            clip = v2.clip_for_seed(s)
            want, prompt = clip.caption(), v2.PROMPT
            frames, metadata = v2.clip_frames(clip, rendered)
        inputs = target.processor(
            text=[prompt], videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
        )
        out = flash.generate(target, None, inputs, max_new_tokens=max_new_tokens)
        text = tok.decode(out.sequences[0], skip_special_tokens=True).strip()
        hits += text == want
        if world == "v2":
            for key, n in v2.clause_accuracy(text, want).items():
                clauses[key] = clauses.get(key, 0) + n
        rows.append({"seed": s, "got": text, "want": want})
    return hits / len(seeds), rows, clauses


def evaluate_only(out: Path, args: argparse.Namespace) -> None:
    """Score a finished checkpoint on a range of held-out seeds and write <out>/heldout_eval.json."""
    first, last = (int(x) for x in args.evaluate.split("-"))
    if not 0 <= first <= last < TRAIN_SEED_START:
        raise SystemExit(f"--evaluate {args.evaluate}: held-out seeds are 0-{TRAIN_SEED_START - 1}")
    if args.threads:
        torch.set_num_threads(args.threads)
    target = flash.load_target(out, dtype=torch.float32, device=args.device)
    started = time.time()
    exact, rows, clauses = evaluate(
        target, range(first, last + 1), MAX_NEW_TOKENS[args.world], args.eval_rendered, args.world
    )
    report = {"world": args.world, "seeds": [first, last], "exact_match": exact}
    if args.world == "v2":
        report["clauses"] = v2.clause_summary(clauses)
    report["seconds"] = round(time.time() - started, 1)
    report["eval_frames"] = "rendered" if args.eval_rendered else "h264"
    report["rows"] = rows
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2), flush=True)
    (out / "heldout_eval.json").write_text(json.dumps(report, indent=1) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=WORLDS, default="v1", help="the demo world to learn (see the docstring)")
    parser.add_argument("--out", help="checkpoint folder (default: models/demo-target; v2: models/demo-v2-target)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-clips", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/train_state (same --steps)")
    parser.add_argument("--init", help="start from this trained checkpoint's weights (new optimizer and schedule)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="evaluate and save an exponential moving average of the weights with this decay (e.g. 0.999; 0: off)",
    )
    parser.add_argument(
        "--object-weights",
        help="relative shares of one-, two- and three-object training scenes, e.g. 1,1,2 (default: a third each)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument(
        "--data-workers", type=int, default=0, help="processes preparing batches ahead (0: in the training loop)"
    )
    parser.add_argument(
        "--eval-rendered", action="store_true", help="evaluate on rendered frames (machines without PyAV/decord)"
    )
    parser.add_argument(
        "--evaluate",
        metavar="FIRST-LAST",
        help="no training: score the checkpoint in --out on these held-out seeds (e.g. 100-399) "
        "into <out>/heldout_eval.json",
    )
    return parser


@dataclass
class _Run:
    """What a training run carries from step to step: the model and its optimizer, the batch stream's
    generator, the evaluation log and the best score so far (all of it in the resume state)."""

    target: flash.Target
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    rng: np.random.Generator
    log: list[dict] = field(default_factory=list)
    best: float = -1.0
    first_step: int = 1


def _load_or_build(args: argparse.Namespace, out: Path, sizes: dict, words: list[str]) -> flash.Target:
    """The model to train: --init's weights, the checkpoint in `out` (--resume), or a fresh one built there."""
    if args.init:
        target = flash.load_target(args.init, dtype=torch.float32, device=args.device)
        out.mkdir(parents=True, exist_ok=True)
        return target
    if not args.resume:
        build_qwen2_5_vl(out, words, seed=args.seed, **sizes)
    return flash.load_target(out, dtype=torch.float32, device=args.device)


def _new_run(target: flash.Target, args: argparse.Namespace) -> _Run:
    """AdamW with a linear warm-up into a cosine decay over --steps."""
    opt = torch.optim.AdamW(target.model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(200, args.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))
    )
    rng = np.random.default_rng(args.seed)
    return _Run(target, opt, sched, EMA(target.model, args.ema) if args.ema else None, rng)


def _resume(run: _Run, state_dir: Path, metric: str) -> None:
    """Continue from the latest saved step: weights, optimizer, schedule, batch stream, log and EMA."""
    state = torch.load(state_dir / "state.pt", weights_only=False, map_location="cpu")
    run.target.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.rng = state["rng"]
    run.first_step, run.best, run.log = state["step"] + 1, state["best"], state["log"]
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    print(f"resumed at step {state['step']} (best {metric} {run.best:.3f})", flush=True)


def _save_state(run: _Run, state_dir: Path, step: int) -> None:
    """The latest step's resume state, <out>/train_state/state.pt."""
    state_dir.mkdir(exist_ok=True)
    torch.save(
        {
            "model": run.target.model.state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "rng": run.rng,
            "step": step,
            "best": run.best,
            "log": run.log,
            "ema": run.ema.state_dict() if run.ema is not None else None,
        },
        state_dir / "state.pt",
    )


def _object_weights(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[float, ...] | None:
    """--object-weights as numbers (None: the world's own mix), refused outside world v1 or when invalid."""
    if args.object_weights and args.world != "v1":
        parser.error("--object-weights is for world v1 (its scenes have one to three objects)")
    if not args.object_weights:
        return None
    object_weights = tuple(float(w) for w in args.object_weights.split(","))
    training_scenes(np.random.default_rng(0), 1, object_weights)  # refuse bad weights before training
    return object_weights


def _train_step(run: _Run, inputs: BatchFeature, labels: torch.Tensor, step: int, device: str) -> torch.Tensor:
    """One optimizer step (gradients clipped to norm 1); returns the loss."""
    model = run.target.model
    model.train()
    loss = model(**inputs.to(device), labels=labels.to(device)).loss
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    run.opt.step()
    run.sched.step()
    if run.ema is not None:
        run.ema.update(model, step)
    return loss


def _evaluate_and_keep_best(
    run: _Run, args: argparse.Namespace, out: Path, step: int, loss: float, started: float, metric: str
) -> float:
    """Score the held-out clips (the EMA's weights where there is one), log it, and save the checkpoint
    to `out` when it is the best so far; returns the score."""
    model = run.target.model
    model.eval()
    live = run.ema.swap_in(model) if run.ema is not None else None  # evaluate (and save) the average
    exact, rows, clauses = evaluate(
        run.target, range(0, args.eval_clips), MAX_NEW_TOKENS[args.world], args.eval_rendered, args.world
    )
    elapsed = time.time() - started
    entry = {"step": step, "loss": loss, "exact_match": exact, "seconds": elapsed}
    if args.world == "v2":
        entry["clause_accuracy"] = clauses["right"] / max(1, clauses["total"])
        entry["clauses"] = v2.clause_summary(clauses)
    run.log.append(entry)
    acc = entry[metric]
    print(f"eval step {step}: {metric} {acc:.3f}, exact match {exact:.3f} ({elapsed:.0f}s)", flush=True)
    for r in rows[:3]:
        if r["got"] != r["want"]:
            print("  got :", r["got"], "\n  want:", r["want"], flush=True)
    if acc >= run.best:
        run.best = acc
        model.save_pretrained(out, safe_serialization=True)
        run.target.processor.save_pretrained(out)
    if live is not None:
        run.ema.swap_out(model, live)
    return acc


def _write_training_log(
    out: Path, args: argparse.Namespace, run: _Run, sizes: dict, object_weights, n_params: int, metric: str
) -> None:
    """<out>/training_log.json: the run's settings, its evaluation log and its best score so far."""
    (out / "training_log.json").write_text(
        json.dumps(
            {
                "world": args.world,
                "sizes": sizes,
                "batch": args.batch,
                "lr": args.lr,
                "ema": args.ema,
                "object_weights": object_weights,
                "steps": args.steps,
                "parameters": n_params,
                "log": run.log,
                f"best_{metric}": run.best,
                "torch_threads": torch.get_num_threads(),
                "device": args.device,
                "data_workers": args.data_workers,
                "eval_frames": "rendered" if args.eval_rendered else "h264",
            },
            indent=2,
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out or DEFAULT_OUT[args.world])
    if args.evaluate:
        evaluate_only(out, args)
        return
    sizes = TARGET_SIZES if args.world == "v1" else TARGET_SIZES_V2
    words = vocabulary() if args.world == "v1" else v2.vocabulary()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    target = _load_or_build(args, out, sizes, words)
    target.model.requires_grad_(True)
    n_params = sum(p.numel() for p in target.model.parameters())
    print(f"target: {n_params / 1e6:.2f}M parameters", flush=True)

    run = _new_run(target, args)
    metric = "exact_match" if args.world == "v1" else "clause_accuracy"
    started = time.time()
    state_dir = out / "train_state"  # the latest step (weights + optimizer), not shipped: see .gitignore
    if args.resume and (state_dir / "state.pt").is_file():
        _resume(run, state_dir, metric)
    object_weights = _object_weights(parser, args)
    stream = batches(
        target.processor,
        target.path,
        run.rng,
        args.seed,
        run.first_step,
        args.steps,
        args.batch,
        args.data_workers,
        object_weights,
        args.world,
    )
    for step, (inputs, labels) in zip(range(run.first_step, args.steps + 1), stream):
        loss = _train_step(run, inputs, labels, step, args.device)
        if step % 50 == 0:
            print(
                f"step {step} loss {loss.item():.4f} lr {run.sched.get_last_lr()[0]:.2e} {time.time() - started:.0f}s",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            acc = _evaluate_and_keep_best(run, args, out, step, loss.item(), started, metric)
            _save_state(run, state_dir, step)
            _write_training_log(out, args, run, sizes, object_weights, n_params, metric)
            if acc == 1.0 and step >= args.steps // 2:
                print("perfect held-out exact match; stopping early", flush=True)
                break
    print(f"done: best {metric} {run.best:.3f} in {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
