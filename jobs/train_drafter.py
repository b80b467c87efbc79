"""Train a FLASH drafter for a target by self-distillation: Ray Data builds the set, Ray Train trains.

    python jobs/train_drafter.py --model REF --videos URI --out URI [--storage URI] [--config YAML]
                                 [--steps N] [--workers W] [--gpu] [--batch B] [--resume]
                                 [--text-only] [--draft-vocab N] [--s3-endpoint URL]

REF is what the pipeline's --model takes (a local directory, s3://bucket/prefix/ or a Hub id);
URI is a local path or s3://bucket/prefix/. Prompt, frames and token budget come from the same
`CaptionConfig` as the captioning job (`--config`, the YAML both share; without it the pipeline's
defaults for this checkpoint), so the drafter learns on what it will serve.

1. The self-distillation set (a Ray Data job): the videos are listed and decoded as the pipeline
   does; actors holding the target (bfloat16 on GPU) answer each clip greedily and record its
   features over prompt + answer (`actors/distill.py`). Rows are written as Parquet shards, features
   in bfloat16, under `<storage>/distill/<digest>/`, the digest naming what made them (the target's
   files, prompt, frame sampling, token budget, dtype); `_key.json` there says it in full. A rerun
   distils only clips (uri, etag) that no shard holds yet: the set resumes shard by shard, grows
   with new clips, and a changed clip gets a new row. Other settings or another target: another set.
2. Training (Ray Train): W workers read the set through Ray Data (`get_dataset_shard`); each holds
   only the target's embedding and LM head, read straight from the safetensors shards that hold
   them (`flash.load_target_head`); the drafter is wrapped by `prepare_model` (DDP), trained in
   float32 (bfloat16 autocast on GPU) with --batch examples per worker per step, their gradients
   accumulated. A worker whose share of the set fits in --cache-gb keeps it in memory after the
   first epoch (reshuffled each epoch); a larger share streams again every epoch. Checkpoints
   go to `RunConfig(storage_path=<storage>)` every --checkpoint-every steps and at the last step.
   --steps is the total: `--steps 250 --resume` after a 150-step run trains 100 more, from the
   furthest checkpoint under <storage> of a drafter with the same settings (drafters may share a
   storage, and with it the set).
3. The drafter and `training_summary.json` (steps, resumed_from_step, per-slot top-1, ...) are
   written to --out.

--storage defaults to a sibling of --out (`<out>_train`): the drafter's own folder holds only the
drafter, so `--drafter <out>` fetches nothing else. --steps 0 writes an untrained drafter to --out
and starts no cluster. --text-only trains the ablation that never sees the visual latents.
--draft-vocab N drafts over N target tokens only (EAGLE-3's reduced draft vocabulary): every EOS id
and the tokens the target's own answers use most (`flash.train.draft_vocabulary`), saved with the
drafter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import flash  # noqa: E402
from flash.train import DistillExample, draft_vocabulary, drafter_loss  # noqa: E402
from pipeline.checkpoints import CONFIG_FILES, checkpoint_digest, resolve_checkpoint  # noqa: E402
from pipeline.config import DEFAULT_INSTRUCTION, RAW_PROMPT, CaptionConfig, load_config  # noqa: E402
from pipeline.inputs import list_videos  # noqa: E402
from pipeline.storage import OutputStore, S3Settings, arrow_filesystem, is_s3  # noqa: E402

DISTILL_FORMAT = 3


def settings_of(config: CaptionConfig) -> S3Settings:
    return S3Settings(config.s3_endpoint, config.s3_region, config.s3_max_attempts, config.s3_timeout_s)


def default_storage(out: str) -> str:
    return out.rstrip("/") + "_train"


# ------------------------------------------------------------------------------------------- distil


def distill_key(config: CaptionConfig, target_digest: str) -> dict:
    """What a self-distillation set depends on (its rows are keyed by clip)."""
    return {
        "format": DISTILL_FORMAT,
        "target": target_digest,
        "prompt": config.prompt or f"default: {DEFAULT_INSTRUCTION!r} with a chat template, else {RAW_PROMPT!r}",
        "num_frames": config.num_frames,
        "fps": config.fps,
        "max_frames": config.max_frames,
        "max_side": config.max_side,
        "max_new_tokens": config.max_new_tokens,
        "dtype": config.dtype or ("bfloat16" if config.gpus_per_actor > 0 else "float32"),
    }


def distill_dir(storage: str, key: dict) -> str:
    import hashlib

    return f"{storage.rstrip('/')}/distill/{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"


def _shard_keys(fs, path: str) -> set[tuple[str, str]]:
    """(uri, etag) of every row in the set's readable shards. A shard that cannot be read (cut off by
    a crash on a local disk) is removed: its clips are distilled again."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    keys: set[tuple[str, str]] = set()
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        try:
            table = pq.read_table(info.path, filesystem=fs, columns=["video_uri", "etag"])
        except Exception as err:  # noqa: BLE001 - any unreadable shard is redone
            print(f"distill: removing unreadable shard {info.path}: {type(err).__name__}: {err}", flush=True)
            fs.delete_file(info.path)
            continue
        keys.update(zip(table.column("video_uri").to_pylist(), table.column("etag").to_pylist()))
    return keys


def build_distill_set(config: CaptionConfig, storage: str, target_digest: str) -> tuple[str, list, int]:
    """Distil the clips no shard holds yet. Returns (the set's path in its filesystem, the listed
    clips' (uri, etag) keys, how many clips were distilled now). Ray must be initialised."""
    from actors.distill import DistillActor
    from pipeline.run import _build_dataset

    settings = settings_of(config)
    key = distill_key(config, target_digest)
    fs, path = arrow_filesystem(distill_dir(storage, key), settings)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/_key.json") as f:
        f.write(json.dumps(key, indent=2).encode())
    objects = list_videos(config.input, config.include, settings)
    if not objects:
        raise ValueError(f"no videos under {config.input}")
    done = _shard_keys(fs, path)
    todo = [o for o in objects if (o.uri, o.etag) not in done]
    print(f"distill: {len(objects)} clips, {len(objects) - len(todo)} already in {path}, {len(todo)} to distil")
    if todo:
        started = time.time()
        ds = _build_dataset(config, todo, settings, actor=DistillActor)
        ds.write_parquet(path, filesystem=fs)
        print(f"distill: {len(todo)} clips in {time.time() - started:.0f}s", flush=True)
    return path, [(o.uri, o.etag) for o in objects], len(todo)


def read_distill_set(fs, path: str, keys: list, columns: list[str] | None = None):
    """The set's rows for the listed clips (the newest row per clip), without error rows."""
    import ray.data

    wanted = set(keys)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=columns, file_extensions=["parquet"])
    return ds.filter(lambda r: not r["error"] and (r["video_uri"], r["etag"]) in wanted)


# ------------------------------------------------------------------------------------------- train


class DistillLoss(nn.Module):
    """The drafter's distillation loss as a module's forward, so DDP sees every step."""

    def __init__(self, drafter: flash.FlashDrafter, noise: float) -> None:
        super().__init__()
        self.drafter, self.noise = drafter, noise

    def forward(self, example: DistillExample) -> tuple[torch.Tensor, dict[str, float]]:
        return drafter_loss(self.drafter, example, noise=self.noise)


def target_head_dir(ref: str, settings: S3Settings) -> Path:
    """A local directory with the checkpoint's configs and only the weight files that hold the
    embedding and the LM head (all of them for an unsharded checkpoint)."""
    small = resolve_checkpoint(ref, settings, only=CONFIG_FILES)
    files = flash.target.head_files(small)
    return resolve_checkpoint(ref, settings, only=CONFIG_FILES + tuple(files or ("*.safetensors",)))


def _drafter_and_optimizer(config: dict, device: torch.device) -> tuple[flash.FlashDrafter, torch.optim.Optimizer, int]:
    """The worker's drafter (on the target's embedding and LM head) and its optimizer, at the step of
    the checkpoint to continue from (0: a fresh start). A restarted worker group resumes from this
    run's newest checkpoint; --resume from an earlier run's (one with the same drafter config:
    `latest_checkpoint`)."""
    import ray.train

    settings = S3Settings(**config["s3"])
    head = flash.load_target_head(
        target_head_dir(config["model"], settings),
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        device=device,
    )
    drafter_config = flash.DrafterConfig(**config["drafter"])
    draft_ids = torch.tensor(config["draft_ids"], dtype=torch.long) if config["draft_ids"] else None
    drafter = flash.FlashDrafter.for_target(head, drafter_config, draft_ids).float().train()
    opt = torch.optim.AdamW(drafter.parameters(), lr=config["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config["resume_from"]:
        fs, _ = arrow_filesystem(config["storage"], settings)
        checkpoint = ray.train.Checkpoint(config["resume_from"], filesystem=fs)
    if checkpoint is None:
        return drafter, opt, 0
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=True)
    drafter.load_state_dict(state["drafter"])
    opt.load_state_dict(state["optimizer"])
    return drafter, opt, int(state["step"])


def _examples(seed: int, rank: int, cache_bytes: int) -> Iterator[DistillExample]:
    """This worker's share of the set, epoch after epoch. A shard that fits in `cache_bytes` is kept
    after its first pass and reshuffled for every later epoch; a larger one streams again each epoch
    (the set's block order is randomized per epoch)."""
    import ray.train

    from actors.distill import row_to_example

    shard = ray.train.get_dataset_shard("train")
    order = torch.Generator().manual_seed(seed * 1000 + rank)
    cache: list | None = []
    size = 0
    for row in shard.iter_rows():
        example = row_to_example(row)
        if cache is not None:
            size += example.features.numel() * example.features.element_size()
            if size <= cache_bytes:
                cache.append(example)
            else:
                cache = None
        yield example
    while True:
        if cache:
            for i in torch.randperm(len(cache), generator=order).tolist():
                yield cache[i]
        else:
            for row in shard.iter_rows():
                yield row_to_example(row)


def _accumulate(
    model: nn.Module, stream: Iterator[DistillExample], batch: int, on_gpu: bool
) -> tuple[float, dict[str, float]]:
    """Gradients of `batch` examples, one at a time, synced across workers on the last; returns the
    mean loss and the mean of each metric."""
    totals: dict[str, float] = {}
    loss_sum = 0.0
    for i in range(batch):
        sync = i == batch - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext():
                loss, metrics = model(next(stream))
            (loss / batch).backward()
        loss_sum += loss.item() / batch
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value / batch
    return loss_sum, totals


def _report(metrics: dict, rank: int, drafter: flash.FlashDrafter, opt: torch.optim.Optimizer) -> None:
    """Report the step's metrics to Ray Train; rank 0 attaches the checkpoint (the training state, the
    step and the drafter as a checkpoint folder)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    step = metrics["step"]
    with tempfile.TemporaryDirectory() as d:
        torch.save(
            {"drafter": drafter.state_dict(), "optimizer": opt.state_dict(), "step": step},
            os.path.join(d, "train_state.pt"),
        )
        Path(d, "state.json").write_text(json.dumps({"step": step}))
        drafter.save_pretrained(os.path.join(d, "drafter"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    device = ray.train.torch.get_device()
    drafter, opt, start_step = _drafter_and_optimizer(config, device)
    model = ray.train.torch.prepare_model(
        DistillLoss(drafter, config["noise"]), parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    core = model.module if hasattr(model, "module") else model
    stream = _examples(config["seed"], rank, config["cache_bytes"])
    steps, batch = config["steps"], config["batch"]
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=steps, initial=start_step, desc="drafter", mininterval=5, file=sys.stdout)
    started, seen = time.time(), 0
    for step in range(start_step + 1, steps + 1):
        lr = config["lr"] * min(1.0, step / max(1, config["warmup"]))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum, totals = _accumulate(model, stream, batch, device.type == "cuda")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += batch * world
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{loss_sum:.3f}",
                top1="/".join(f"{v:.2f}" for k, v in totals.items() if k.startswith("top1_slot")),
                ex_per_s=f"{seen / max(time.time() - started, 1e-9):.1f}",
            )
        if step % config["checkpoint_every"] == 0 or step == steps:
            metrics = {"step": step, "loss": loss_sum, "examples_per_s": seen / (time.time() - started), **totals}
            _report(metrics, rank, core.drafter, opt)
    if progress is not None:
        progress.close()


def latest_checkpoint(storage: str, settings: S3Settings, drafter: dict) -> tuple[str, int] | None:
    """(path in the storage filesystem, step) of the furthest checkpoint of an earlier run of this
    drafter (`drafter`: its config, sized for the target), if any. Checkpoints of other drafters in
    the same storage are passed over; a storage that holds only those is an error."""
    import pyarrow.fs as pafs

    fs, root = arrow_filesystem(storage, settings)
    found, others = [], []
    for run in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if run.type != pafs.FileType.Directory or run.base_name == "distill":
            continue
        for ckpt in fs.get_file_info(pafs.FileSelector(run.path, allow_not_found=True)):
            if ckpt.type != pafs.FileType.Directory or not ckpt.base_name.startswith("checkpoint_"):
                continue
            try:
                with fs.open_input_stream(f"{ckpt.path}/state.json") as f:
                    step = int(json.loads(f.read())["step"])
                with fs.open_input_stream(f"{ckpt.path}/drafter/{flash.drafter.CONFIG_NAME}") as f:
                    saved = json.loads(f.read())
            except (OSError, ValueError, KeyError):  # incomplete: no state.json or drafter config yet
                continue
            entry = (step, ckpt.mtime.timestamp() if ckpt.mtime else 0.0, ckpt.path)
            differs = sorted(k for k, v in drafter.items() if saved.get(k) != v)
            if differs:
                others.append((*entry, differs))
            else:
                found.append(entry)
    if not found and others:
        step, _, path, differs = max(others)
        raise ValueError(
            f"--resume: no checkpoint under {storage} is of this drafter; the furthest ({path}, step {step}) "
            f"differs in {', '.join(differs)}. Pass that run's drafter flags, or another --storage."
        )
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def write_drafter(folder: Path, out: str, settings: S3Settings) -> None:
    """Every file of a local drafter folder into --out (a local directory or an S3 prefix)."""
    store = OutputStore(out, settings)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            store.write_bytes(path.name, path.read_bytes())


def _draft_ids(fs, path: str, keys: list, size: int, head: flash.TargetHead) -> list[int]:
    """The draft vocabulary from the answers of the whole set (token columns only), on the driver."""
    rows = read_distill_set(
        fs, path, keys, columns=["video_uri", "etag", "error", "input_ids", "visual_mask", "answer_start"]
    )
    examples = [
        DistillExample(
            torch.tensor(r["input_ids"]), None, torch.tensor(r["visual_mask"], dtype=torch.bool), int(r["answer_start"])
        )
        for r in rows.iter_rows()
    ]
    ids = draft_vocabulary(examples, size, head.eos_token_ids, head.vocab_size)
    answers = torch.cat([ex.input_ids[ex.answer_start :] for ex in examples])
    coverage = torch.isin(answers, ids).float().mean().item() if answers.numel() else 1.0
    print(f"draft vocabulary: {len(ids)} ids, {coverage:.1%} of answer tokens", flush=True)
    return ids.tolist()


# -------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="target: directory, s3:// prefix or Hub id (default: the config's model)")
    parser.add_argument("--videos", help="training clips: directory or s3:// prefix (needed unless --steps 0)")
    parser.add_argument("--out", required=True, help="where the drafter goes: directory or s3:// prefix")
    parser.add_argument("--storage", help="distillation set and Ray Train checkpoints (default: <out>_train)")
    parser.add_argument("--config", help="the captioning job's YAML: prompt, frames, token budget, S3 settings")
    parser.add_argument("--s3-endpoint", help="endpoint URL of an S3-compatible store (default: the config's)")
    parser.add_argument("--steps", type=int, default=2000, help="total optimizer steps (a resumed run included)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="examples per worker per step (gradients accumulated)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.05, help="uniform noise on input features")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--text-only", action="store_true", help="ablation: no visual latents")
    parser.add_argument("--compression", type=int, default=9, help="visual tokens pooled into one latent")
    parser.add_argument("--max-latents", type=int, default=64, help="cap on the visual latents per clip")
    parser.add_argument(
        "--no-refine", action="store_true", help="no sequential refinement: a block's slots are read in one pass"
    )
    parser.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="draft over this many target tokens (the answers' most frequent, plus EOS); 0: the whole vocabulary",
    )
    parser.add_argument("--max-new-tokens", type=int, help="answer budget (default: the config's)")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the furthest checkpoint under --storage of a drafter with these settings",
    )
    parser.add_argument(
        "--cpus-per-worker", type=float, help="CPUs per training worker (default: the cluster's, less one, shared)"
    )
    parser.add_argument(
        "--cache-gb",
        type=float,
        default=4.0,
        help="a worker keeps its share of the set in memory after the first epoch if it fits in this (float32)",
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU per training worker and per distillation actor")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def build_config(args: argparse.Namespace) -> CaptionConfig:
    """The captioning job's configuration with this run's target and clips; the distillation
    answers greedily, with the target alone, and its rows go to the set, not to `output`."""
    from pipeline.run import with_checkpoint_defaults

    overrides = {"model": args.model, "s3_endpoint": args.s3_endpoint, "max_new_tokens": args.max_new_tokens}
    config = load_config(args.config, input=args.videos, output=args.out, **overrides)
    update: dict = {"drafter": None, "temperature": 0.0, "report": False}
    if args.gpu and config.gpus_per_actor == 0:
        update["gpus_per_actor"] = 1.0
    config = config.model_copy(update=update)
    return with_checkpoint_defaults(config, settings_of(config))


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps == 0 and args.draft_vocab:
        parser.error("--draft-vocab picks its tokens from the target's answers: it needs --videos and --steps > 0")
    if args.steps > 0 and not args.videos:
        parser.error("--videos is required unless --steps 0")


def _target_without_clips(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, S3Settings]:
    """--steps 0: the target and the S3 settings, from the flags or the config's YAML (no clips to check)."""
    import yaml

    raw = yaml.safe_load(Path(args.config).read_text()) or {} if args.config else {}
    model = args.model or raw.get("model")
    if not model:
        parser.error("--model is required (or a --config that names the model)")
    return model, S3Settings(args.s3_endpoint or raw.get("s3_endpoint"), raw.get("s3_region"))


def _drafter_config(args: argparse.Namespace) -> flash.DrafterConfig:
    return flash.DrafterConfig(
        block_size=args.block_size,
        num_layers=args.num_layers,
        use_visual_latents=not args.text_only,
        refine=not args.no_refine,
        draft_vocab_size=args.draft_vocab,
        compression=args.compression,
        max_latents=args.max_latents,
    )


def _write_untrained(model: str, settings: S3Settings, drafter_config: flash.DrafterConfig, out: str) -> None:
    head = flash.load_target_head(target_head_dir(model, settings))
    with tempfile.TemporaryDirectory() as d:
        flash.FlashDrafter.for_target(head, drafter_config).save_pretrained(d)
        write_drafter(Path(d), out, settings)
    print(f"wrote an untrained drafter to {out}")


def _start_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one, unless Ray is already up."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            include_dashboard=False,
            **({} if os.environ.get("RAY_ADDRESS") else {"_node_ip_address": "127.0.0.1"}),
        )
    ray.data.DataContext.get_current().enable_progress_bars = False


def _worker_cpus(args: argparse.Namespace) -> tuple[float, int]:
    """CPUs per training worker and its torch threads. One CPU is left to Ray Data, which streams the
    set to the workers while they train: workers holding every CPU would wait forever for rows that no
    task can be scheduled to read."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    worker_cpus = max(0.25, min(float(args.cpus_per_worker or 1e9), (cpus - 1) / args.workers))
    return worker_cpus, max(1, int(worker_cpus))


def _fit(args: argparse.Namespace, storage: str, settings: S3Settings, loop_config: dict, dataset):
    """Ray Train over `dataset` with `loop_config` for every worker; the final checkpoint and metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    worker_cpus, threads = _worker_cpus(args)
    storage_fs, storage_path = arrow_filesystem(storage, settings)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "threads": threads},
        datasets={"train": dataset},
        scaling_config=ScalingConfig(
            num_workers=args.workers,
            use_gpu=args.gpu,
            resources_per_worker={"CPU": worker_cpus},
        ),
        run_config=RunConfig(
            name="drafter-" + time.strftime("%Y%m%d-%H%M%S"),
            storage_path=storage_path,
            storage_filesystem=storage_fs if is_s3(storage) else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    return result.checkpoint, dict(result.metrics or {})


def _loop_config(
    args: argparse.Namespace, model: str, settings: S3Settings, storage: str, drafter_config, draft_ids, resume
) -> dict:
    """What every training worker is given (its torch threads are added by `_fit`)."""
    return {
        "model": model,
        "s3": asdict(settings),
        "storage": storage,
        "drafter": asdict(drafter_config),
        "draft_ids": draft_ids,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "noise": args.noise,
        "checkpoint_every": args.checkpoint_every,
        "seed": args.seed,
        "resume_from": resume[0] if resume else None,
        "cache_bytes": int(args.cache_gb * 2**30),
    }


def _write_trained(
    checkpoint, head: flash.TargetHead, out: str, settings: S3Settings, started: float, **summary
) -> None:
    """The checkpoint's drafter and training_summary.json (its step, then `summary`, the seconds since
    `started` after the workers) into --out."""
    with checkpoint.as_directory() as d:
        drafter = flash.FlashDrafter.from_pretrained(Path(d) / "drafter", head)
        final_step = json.loads(Path(d, "state.json").read_text())["step"]
        with tempfile.TemporaryDirectory() as local:
            drafter.save_pretrained(local)
            summary = {
                "steps": final_step,
                "resumed_from_step": summary["resumed_from_step"],
                "workers": summary["workers"],
                "seconds": time.time() - started,
                "distillation_set": summary["distillation_set"],
                "metrics": summary["metrics"],
                "config": asdict(drafter.config),
            }
            Path(local, "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            write_drafter(Path(local), out, settings)
    print(f"wrote drafter to {out} ({summary['seconds']:.0f}s); last metrics {summary['metrics']}")


def _resume_point(
    parser: argparse.ArgumentParser, args: argparse.Namespace, storage: str, settings: S3Settings, drafter: dict
) -> tuple[str, int] | None:
    """With --resume, the furthest checkpoint of this drafter under `storage` (`latest_checkpoint`)."""
    if not args.resume:
        return None
    try:
        resume = latest_checkpoint(storage, settings, drafter)
    except ValueError as err:
        parser.error(str(err))
    if resume is None:
        print("no checkpoint to resume from; starting fresh", flush=True)
    return resume


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    out = args.out if is_s3(args.out) else str(Path(args.out).expanduser().resolve())
    if args.steps == 0:  # no clips: the target and the S3 settings are all it needs
        model, settings = _target_without_clips(parser, args)
        _write_untrained(model, settings, _drafter_config(args), out)
        return
    try:
        config = build_config(args)
    except ValueError as err:
        parser.error(str(err))
    settings, drafter_config = settings_of(config), _drafter_config(args)

    import ray.train

    storage = args.storage or default_storage(out)
    storage = storage if is_s3(storage) else str(Path(storage).expanduser().resolve())
    _start_ray()
    started = time.time()
    path, keys, distilled = build_distill_set(config, storage, checkpoint_digest(config.model, settings))
    fs, _ = arrow_filesystem(storage, settings)

    head = flash.load_target_head(target_head_dir(config.model, settings))
    draft_ids = _draft_ids(fs, path, keys, args.draft_vocab, head) if args.draft_vocab else None
    if draft_ids is not None:
        drafter_config.draft_vocab_size = len(draft_ids)
    resume = _resume_point(parser, args, storage, settings, asdict(drafter_config.sized_for(head)))
    resumed_from = resume[1] if resume else None

    result_metrics: dict = {}
    if resumed_from is not None and resumed_from >= args.steps:
        print(
            f"the checkpoint to resume from is at step {resumed_from} >= --steps {args.steps}: nothing to train",
            flush=True,
        )
        checkpoint = ray.train.Checkpoint(resume[0], filesystem=fs)
    else:
        loop_config = _loop_config(args, config.model, settings, storage, drafter_config, draft_ids, resume)
        dataset = read_distill_set(fs, path, keys).randomize_block_order()
        checkpoint, result_metrics = _fit(args, storage, settings, loop_config, dataset)
    _write_trained(
        checkpoint,
        head,
        out,
        settings,
        started,
        resumed_from_step=resumed_from,
        workers=args.workers,
        distillation_set={"path": path, "clips": len(keys), "distilled_now": distilled},
        metrics=result_metrics,
    )


if __name__ == "__main__":
    main()
