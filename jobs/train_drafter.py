"""Train a FLASH drafter for a target by self-distillation, on Ray Train.

    python jobs/train_drafter.py --model DIR --videos DIR --out DIR [--steps N] [--workers W]
                                 [--text-only] [--draft-vocab N] [--resume]

1. The target captions every clip in --videos itself (greedy, batched) and its
   features over prompt + answer are recorded (`<out>/distill.pt`). The set
   names what made it (a digest of the target's weights and configs, of the
   clips, and the prompt, frames and token budget); a rerun reuses it only if
   all of them are unchanged, and rebuilds it otherwise.
2. A `TorchTrainer` runs W workers (CPU here, GPU with --gpu) over shards of
   that set; rank 0 reports a checkpoint every --checkpoint-every steps.
   --resume continues from the newest checkpoint under <out>/ray_train.
3. The final drafter is written to --out (safetensors + JSON config).

--steps 0 writes an initialised, untrained drafter and starts no cluster.
--text-only trains the ablation that never sees the visual latents.
--draft-vocab N drafts over N target tokens only (EAGLE-3's reduced draft
vocabulary): every EOS id and the tokens the target's own answers in the
self-distillation set use most (`flash.train.draft_vocabulary`), saved with the
drafter; each drafted slot then reads N rows of the LM head instead of all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import flash  # noqa: E402
from flash.train import DistillExample, distill_example, draft_vocabulary, drafter_loss  # noqa: E402


def _clips(videos: Path) -> list[Path]:
    clips = sorted(p for p in videos.iterdir() if p.suffix.lower() in {".mp4", ".mkv", ".webm", ".avi", ".mov"})
    if not clips:
        raise ValueError(f"no video files in {videos}")
    return clips


def build_distill_set(
    model_dir: str, videos: Path, prompt: str, frames: int, max_new_tokens: int, batch: int = 16
) -> list[dict]:
    """The target captions each clip itself; record its features over prompt + answer."""
    from pipeline.decode import decode_video, video_metadata

    target = flash.load_target(model_dir, dtype=torch.float32)
    clips = _clips(videos)
    examples: list[dict] = []
    started = time.time()
    for first in range(0, len(clips), batch):
        chunk = clips[first : first + batch]
        decoded = [decode_video(c.read_bytes(), frames) for c in chunk]
        clip_frames = [f for f, _ in decoded]
        metadata = [video_metadata(info) for _, info in decoded]  # real time positions, as the pipeline gives them
        common = dict(do_sample_frames=False, return_tensors="pt")
        inputs = target.processor(
            text=[prompt] * len(chunk), videos=clip_frames, video_metadata=metadata, padding=True, **common
        )
        answers = flash.generate(target, None, inputs, max_new_tokens=max_new_tokens).sequences
        for f, meta, answer in zip(clip_frames, metadata, answers):
            one = target.processor(text=[prompt], videos=[f], video_metadata=[meta], **common)
            examples.append(distill_example(target, one, answer).as_dict())
        print(f"distill: {len(examples)}/{len(clips)} clips ({time.time() - started:.0f}s)", flush=True)
    return examples


DISTILL_FORMAT = 2
# Files of a checkpoint directory that decide what the target answers (logs and READMEs do not).
_MODEL_FILES = ("*.safetensors", "*.bin", "*config.json", "tokenizer*", "vocab*", "merges.txt", "chat_template*")


def _digest(paths: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def distill_key(model_dir: str | Path, videos: Path, prompt: str, frames: int, max_new_tokens: int) -> dict:
    """What a self-distillation set depends on; a set is reused only under an equal key."""
    model = Path(model_dir)
    files = sorted({p for pattern in _MODEL_FILES for p in model.glob(pattern) if p.is_file()})
    return {
        "format": DISTILL_FORMAT,
        "target": _digest(files, model),
        "clips": _digest(_clips(videos), videos),
        "prompt": prompt,
        "frames": frames,
        "max_new_tokens": max_new_tokens,
    }


def load_or_build_distill(
    path: Path, model_dir: str, videos: Path, prompt: str, frames: int, max_new_tokens: int
) -> tuple[list[dict], bool]:
    """The self-distillation set at `path` if it was made by this target from these clips and settings;
    otherwise build it there. Returns (examples, whether it was built)."""
    path, videos = Path(path), Path(videos)
    key = distill_key(model_dir, videos, prompt, frames, max_new_tokens)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        old = saved.get("key") if isinstance(saved, dict) else None
        if old == key:
            print(f"distill: reusing {path} ({len(saved['examples'])} clips)", flush=True)
            return saved["examples"], False
        if old is None:
            why = "does not record what made it"
        else:
            why = "was made with a different " + ", ".join(sorted(k for k in key if old.get(k) != key[k]))
        print(f"distill: {path} {why}; rebuilding it", flush=True)
    examples = build_distill_set(model_dir, videos, prompt, frames, max_new_tokens)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "examples": examples}, tmp)
    os.replace(tmp, path)
    return examples, True


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    device = ray.train.torch.get_device()
    target = flash.load_target(config["model"], dtype=torch.float32, device=device)
    data = [DistillExample.from_dict(d) for d in torch.load(config["distill"], weights_only=True)["examples"]]
    drafter_config = flash.DrafterConfig(**config["drafter"])
    draft_ids = None
    if drafter_config.draft_vocab_size > 0:  # every rank picks the same ids from the whole set
        draft_ids = draft_vocabulary(data, drafter_config.draft_vocab_size, target.eos_token_ids, target.vocab_size)
        if rank == 0:
            print(f"draft vocabulary: {len(draft_ids)} ids, {_coverage(data, draft_ids):.1%} of answer tokens")
    drafter = flash.FlashDrafter.for_target(target, drafter_config, draft_ids)
    drafter.train()
    opt = torch.optim.AdamW(drafter.parameters(), lr=config["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    start_step = 0
    # A restarted worker group resumes from this run's newest checkpoint; --resume from an earlier run's.
    checkpoint = ray.train.get_checkpoint()
    resume_dir = config.get("resume_from")
    if checkpoint or resume_dir:
        with checkpoint.as_directory() if checkpoint else _as_is(resume_dir) as d:
            state = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=True)
            drafter.load_state_dict(state["drafter"])
            opt.load_state_dict(state["optimizer"])
            start_step = int(state["step"])
    module = drafter
    if world > 1:  # one set of weights: rank 0's
        for p in module.parameters():
            torch.distributed.broadcast(p.data, src=0)

    shard = data[rank::world]
    generator = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    steps, batch = config["steps"], config["batch"]

    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=steps, initial=start_step, desc="drafter", mininterval=5)
    for step in range(start_step + 1, steps + 1):
        lr = config["lr"] * min(1.0, step / max(1, config["warmup"]))
        for group in opt.param_groups:
            group["lr"] = lr
        picks = torch.randint(len(shard), (batch,), generator=generator).tolist()
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for i in picks:
            loss, metrics = drafter_loss(module, shard[i], noise=config["noise"])
            (loss / batch).backward()
            loss_sum += loss.item() / batch
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / batch
        if world > 1:  # data parallel: average gradients across ranks
            for p in module.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_sum:.3f}", top1=f"{totals.get('top1_slot0', 0):.2f}")
        if step % config["checkpoint_every"] == 0 or step == steps:
            metrics = {"step": step, "loss": loss_sum, **totals}
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    torch.save(
                        {"drafter": module.state_dict(), "optimizer": opt.state_dict(), "step": step},
                        os.path.join(d, "train_state.pt"),
                    )
                    module.save_pretrained(os.path.join(d, "drafter"))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)
    if progress is not None:
        progress.close()


def _coverage(examples: list[DistillExample], draft_ids: torch.Tensor) -> float:
    """Share of the answers' tokens that are in the draft vocabulary."""
    answers = torch.cat([ex.input_ids[ex.answer_start :] for ex in examples])
    return torch.isin(answers, draft_ids.cpu()).float().mean().item() if answers.numel() else 1.0


class _as_is:
    """A context manager yielding a local directory unchanged."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        return None


def latest_checkpoint(storage: Path) -> Path | None:
    """The newest checkpoint of any earlier run under storage, if any."""
    found = sorted(storage.glob("*/checkpoint_*/train_state.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def main(argv: list[str] | None = None) -> None:
    from jobs.demo_world import PROMPT, SAMPLED_FRAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="target checkpoint directory")
    parser.add_argument("--videos", help="folder of training clips (needed unless --steps 0)")
    parser.add_argument("--out", required=True, help="where the drafter is written")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="examples per worker per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.05, help="uniform noise on input features")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--text-only", action="store_true", help="ablation: no visual latents")
    parser.add_argument(
        "--no-refine", action="store_true", help="no sequential refinement: a block's slots are read in one pass"
    )
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="draft over this many target tokens (the answers' most frequent, plus EOS); 0: the whole vocabulary",
    )
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--frames", type=int, default=SAMPLED_FRAMES)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--distill", help="self-distillation set to (re)use (default: <out>/distill.pt)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    drafter_config = flash.DrafterConfig(
        block_size=args.block_size,
        num_layers=args.num_layers,
        use_visual_latents=not args.text_only,
        refine=not args.no_refine,
        draft_vocab_size=args.draft_vocab,
    )
    if args.steps == 0 and args.draft_vocab:
        parser.error("--draft-vocab picks its tokens from the target's answers: it needs --videos and --steps > 0")
    if args.steps == 0:
        target = flash.load_target(args.model, dtype=torch.float32)
        flash.FlashDrafter.for_target(target, drafter_config).save_pretrained(out)
        print(f"wrote an untrained drafter to {out}")
        return
    if not args.videos:
        parser.error("--videos is required unless --steps 0")

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out.mkdir(parents=True, exist_ok=True)
    distill = Path(args.distill).resolve() if args.distill else out / "distill.pt"
    load_or_build_distill(distill, args.model, Path(args.videos), args.prompt, args.frames, args.max_new_tokens)
    storage = out / "ray_train"
    name = "drafter-" + time.strftime("%Y%m%d-%H%M%S")
    resume = latest_checkpoint(storage) if args.resume else None
    if args.resume and resume is None:
        print("no checkpoint to resume from; starting fresh", flush=True)

    from dataclasses import asdict

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            **({} if os.environ.get("RAY_ADDRESS") else {"_node_ip_address": "127.0.0.1"}),
        )
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_worker = max(1, cpus // args.workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": str(Path(args.model).resolve()),
            "distill": str(distill),
            "drafter": asdict(drafter_config),
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "noise": args.noise,
            "checkpoint_every": args.checkpoint_every,
            "seed": args.seed,
            "threads": per_worker,
        },
        scaling_config=ScalingConfig(
            num_workers=args.workers,
            use_gpu=args.gpu,
            resources_per_worker={"CPU": min(per_worker, cpus / args.workers)},
        ),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    started = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        target = flash.load_target(args.model, dtype=torch.float32)
        drafter = flash.FlashDrafter.from_pretrained(Path(d) / "drafter", target)
        drafter.save_pretrained(out)
    summary = {
        "steps": args.steps,
        "workers": args.workers,
        "seconds": time.time() - started,
        "metrics": result.metrics,
        "config": asdict(drafter.config),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote drafter to {out} ({summary['seconds']:.0f}s); last metrics {result.metrics}")


if __name__ == "__main__":
    main()
