"""The caption actor: loads the target and the drafter once (from a local
directory, s3:// or the Hub, through the node's checkpoint cache), then captions
batches of decoded videos with `flash.generate` (GPU when given, CPU otherwise).

Each video reaches the processor as the model card's own usage gives it: the
instruction inside the checkpoint's chat template, and the frames with their
real metadata (source fps, frame count, sampled indices), so time positions and
timestamps are the ones the model was trained with. Tokens are chosen as the
checkpoint's generation config says, unless the job sets a temperature.

Ray Data keeps `batches_per_actor` calls in flight per actor, each in its own
thread. A call runs the processor on its rows (CPU), then hands them to the
actor's one engine (`flash.shared.SharedEngine`), which decodes the rows of
every call in flight together: a call's rows join as slots free, so the device
does not idle while one batch's longest caption finishes, and each call returns
when its own rows are done. Each row is processed alone and batches are
collated from those outputs (`Target.collate`, equal to the processor's own
batch), so any grouping of rows can be decoded together.

Rows that arrive with a decode error pass through untouched; a row the
processor refuses gets its error and costs no other row. A device failure (a
CUDA error) is not the videos' fault: the actor exits without charging them,
Ray replaces it and the batches are retried. If the engine fails, every row in
it is decoded again alone, so a single bad input only costs its own row (which
gets the error). Rows are on the crash ledger (pipeline/ledger.py) from their
admission to the engine until their call returns: while they hold the model,
not while they wait for it. A row with a crash on record is not admitted: it is
captioned alone, and a row charged with `max_worker_crashes` deaths becomes an
error row.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import torch

import flash
from flash.shared import SharedEngine
from flash.suffix import SuffixDrafter, SuffixStore, WithSuffix
from pipeline import faults
from pipeline.checkpoints import resolve_checkpoint
from pipeline.config import DEFAULT_INSTRUCTION, RAW_PROMPT, SUFFIX, CaptionConfig, redact
from pipeline.decode import frames_of, video_metadata_of
from pipeline.ledger import Guard
from pipeline.storage import OutputStore, S3Settings

PROCESSED = "_processed"  # a row's processor output, made ahead of the model
DEVICE_FAILURE_EXIT = 75
SUFFIX_BLOCK = 8  # the most tokens suffix decoding proposes a cycle (it proposes fewer when unsure)
_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert", "NCCL error")


def is_device_failure(err: BaseException) -> bool:
    """An error of the accelerator itself (it leaves the process's device context unusable), as
    opposed to one of the input."""
    accelerator = getattr(torch, "AcceleratorError", None)
    return (accelerator is not None and isinstance(err, accelerator)) or any(m in str(err) for m in _DEVICE_ERRORS)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def actor_placement(cfg: CaptionConfig, model_dir, dtype: torch.dtype, device_bytes: int, drafter_dir=None):
    """Where the target goes on the actor's GPUs (one when gpus_per_actor <= 1, sharing its memory
    by that fraction): `gpu_memory_gib` per GPU if set, else `device_bytes`, with the caches of the
    actor's slots at the clip length the job samples. Raises flash.placement.TargetDoesNotFit."""
    from pathlib import Path

    from transformers import AutoConfig

    from flash.placement import GIB, plan_placement, video_prompt_tokens

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    gpus = max(1, int(cfg.gpus_per_actor))
    budget = cfg.gpu_memory_gib * GIB if cfg.gpu_memory_gib else device_bytes * min(1.0, cfg.gpus_per_actor or 1.0)
    frames = cfg.num_frames or cfg.max_frames or 32
    block = 8
    capacity = video_prompt_tokens(config, frames, cfg.max_side) + cfg.max_new_tokens + block + 1
    drafter = sum(f.stat().st_size for f in Path(drafter_dir).glob("*.safetensors")) if drafter_dir else 0
    slots = cfg.max_rows or cfg.batch_size
    return plan_placement(
        config, gpus=gpus, budget_bytes=int(budget), dtype=dtype, slots=slots, capacity=capacity, drafter_bytes=drafter
    )


class CaptionActor:
    def __init__(self, config: dict, ledger=None) -> None:
        self.config = cfg = CaptionConfig.model_validate(config)
        use_gpu = cfg.gpus_per_actor > 0
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError(
                f"gpus_per_actor={cfg.gpus_per_actor} but CUDA is not available on {socket.gethostname()} "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): check the NVIDIA driver "
                "and the torch build, or set gpus_per_actor 0 to caption on CPUs"
            )
        if not use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        settings = S3Settings(cfg.s3_endpoint, cfg.s3_region, cfg.s3_max_attempts, cfg.s3_timeout_s)
        drafter_dir = resolve_checkpoint(cfg.drafter, settings) if cfg.drafter and cfg.drafter != SUFFIX else None
        self.target = self._load_target(cfg, settings, use_gpu, drafter_dir)
        if cfg.drafter == SUFFIX:  # what it drafts from, the actor's captions, outlives every engine
            self.drafter = SuffixDrafter(SuffixStore(), block_size=SUFFIX_BLOCK)
        elif drafter_dir:
            self.drafter = flash.FlashDrafter.from_pretrained(drafter_dir, self.target)
            if cfg.suffix:
                self.drafter = WithSuffix(self.drafter, SuffixDrafter(SuffixStore()))
        else:
            self.drafter = None
        suffix = self.drafter.suffix if isinstance(self.drafter, WithSuffix) else self.drafter
        if isinstance(suffix, SuffixDrafter):  # no cold start on a rerun: the output's captions so far
            self._warm(suffix.store, settings)
        instruction = cfg.prompt or (DEFAULT_INSTRUCTION if self.target.has_chat_template else RAW_PROMPT)
        self.prompt = self.target.video_prompt(instruction)
        # The decoding settings are checked once, here: a generation config flashcap cannot follow stops the actor.
        flash.SamplingParams.from_generation_config(self.target.model.generation_config, temperature=cfg.temperature)
        # One policy per actor: what it learns about acceptance and costs carries across batches.
        self.policy = (
            flash.BlockPolicy(max_block=self.drafter.block_size)
            if self.drafter and cfg.adaptive_block and not isinstance(self.drafter, SuffixDrafter)
            else None  # suffix decoding sizes each row's proposal itself
        )
        self.node = _node_name()
        self.actor_id = f"{self.node}:{os.getpid()}"
        self._metrics = _Metrics()
        self.guard = Guard(ledger, "caption", self.config.max_worker_crashes)
        self.compile_status = {"active": cfg.compile, "fallback": None}  # the last engine's
        # One engine for the actor's life: the rows of every call in flight decode in its slots.
        self.shared = SharedEngine(
            lambda: self._engine(cfg.max_rows or cfg.batch_size),
            lambda rows: self.inputs(rows),
            cfg.max_rows or cfg.batch_size,
            admit=self._admit,
            failed=self._exit_on_device_failure,
        )
        self._model_lock = self.shared.lock  # held by whatever uses the model
        self._on_ledger: dict[int, dict] = {}  # rows admitted and not yet returned, by id()
        self._ledger_lock = threading.Lock()

    def _load_target(self, cfg: CaptionConfig, settings: S3Settings, use_gpu: bool, drafter_dir) -> flash.Target:
        """The target, on the actor's GPUs as its placement says (the drafter's weights counted beside
        its LM head): a target that cannot fit is refused here, with the sizes, before any weight loads."""
        dtype = DTYPES.get(cfg.dtype) or (torch.bfloat16 if use_gpu else torch.float32)
        model_dir = resolve_checkpoint(cfg.model, settings)
        device_map = None
        if use_gpu:
            total = torch.cuda.get_device_properties(0).total_memory
            self.placement = actor_placement(cfg, model_dir, dtype, total, drafter_dir)
            device_map = self.placement.device_map if self.placement.gpus > 1 else None
        return flash.load_target(
            model_dir,
            dtype=dtype,
            device="cuda" if use_gpu else "cpu",
            trust_remote_code=cfg.trust_remote_code,
            device_map=device_map,
        )

    def _warm(self, store: SuffixStore, settings: S3Settings) -> None:
        """Suffix decoding's store, filled with the newest captions the output holds (what earlier runs
        of this job wrote, tokenized as the target wrote them: ending at EOS)."""
        try:
            captions = OutputStore(self.config.output, settings).recent_captions(store.max_sequences)
        except Exception as err:  # noqa: BLE001 - an unreadable output only costs the warm start
            print(redact(f"[flashcap] suffix decoding starts cold: the output's captions could not be read ({err})"))
            return
        tokenizer, eos = self.target.processor.tokenizer, int(self.target.eos_token_ids[0])
        for caption in reversed(captions):  # oldest first: the newest are evicted last
            store.add(tokenizer(caption, add_special_tokens=False)["input_ids"] + [eos])

    def process(self, row: dict):
        """The processor's output for one decoded row: prompt, frames and the video's real metadata."""
        return self.target.processor(
            text=[self.prompt],
            videos=[frames_of(row)],
            video_metadata=[video_metadata_of(row)],
            do_sample_frames=False,  # the frames were sampled when decoding; the metadata says which
            return_tensors="pt",
        )

    def prepare(self, rows: list[dict]) -> None:
        """Run the processor on each row ahead of the model (outside the model lock); a row the
        processor cannot take gets its error here and costs nothing else."""
        for r in rows:
            if r["error"] or PROCESSED in r:
                continue
            try:
                r[PROCESSED] = self.process(r)
            except Exception as err:
                r["error"] = f"processing failed: {type(err).__name__}: {err}"[:2000]

    def inputs(self, rows: list[dict]):
        """The model's batch for decoded rows: their processor outputs, left-padded together."""
        return self.target.collate([r[PROCESSED] if PROCESSED in r else self.process(r) for r in rows])

    def _engine(self, max_rows: int | None = None) -> flash.Engine:
        # a drafter that keeps its rows on the host drafts for each engine apart (one per engine)
        fork = getattr(self.drafter, "fork", None)
        return flash.Engine(
            self.target,
            fork() if fork else self.drafter,
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
            block_size=self.policy,  # None: the drafter's fixed block
            max_rows=max_rows,
            compile=self.config.compile_backend if self.config.compile else None,
        )

    def text(self, tokens: list[int]) -> str:
        eos = set(self.target.eos_token_ids.tolist())
        return self.target.processor.tokenizer.decode(
            [t for t in tokens if t not in eos], skip_special_tokens=True
        ).strip()

    def _generate(self, rows: list[dict]) -> tuple[list[str], list[int], list[float], float]:
        """Caption rows on an engine of their own (the caller holds the model lock)."""
        faults.maybe_crash("generate", rows)
        started = time.perf_counter()
        engine = self._engine()
        keys = engine.admit(self.inputs(rows))
        while engine.live:
            engine.step()
        elapsed = time.perf_counter() - started
        sequences = [engine.sequences[k] for k in keys]
        lengths = [engine.stats.row_acceptance_length(k) for k in keys]
        for r, k in zip(rows, keys):
            r["suffix_tokens"] = engine.stats.row_suffix.get(k, 0)
        self.compile_status = engine.compile_status
        return [self.text(s) for s in sequences], [len(s) for s in sequences], lengths, elapsed

    def _caption(self, rows: list[dict]) -> None:
        """Fill caption/num_tokens/acceptance_length/generate_s/error on rows without a decode error:
        through the actor's engine, beside the rows of the other calls in flight."""
        todo = [r for r in rows if not r["error"]]
        requests = self.shared.decode(todo)
        if self.shared.compile_status is not None:
            self.compile_status = self.shared.compile_status
        admitted = [q.item for q in requests if not q.held]
        try:
            for q in requests:
                if q.tokens is not None:
                    _fill(q.item, self.text(q.tokens), len(q.tokens), q.acceptance_length, q.seconds)
                    q.item["suffix_tokens"] = q.suffix_tokens
            failed = [q.item for q in requests if q.error is not None]
            if failed:  # the engine failed with them in it: each alone, so a bad input costs only its row
                with self._model_lock:
                    self._caption_rows(failed, together=False)
        finally:
            self._off_ledger(admitted)
        held = [q.item for q in requests if q.held]  # a crash on record: each alone, on the ledger alone
        for r in held:
            with self._model_lock:
                self.guard.run([r], self._caption_rows, self._give_up)

    def _give_up(self, r: dict, crashes: int) -> None:
        r["error"] = self.guard.message(crashes)

    def _admit(self, rows: list[dict]) -> list[bool]:
        """Rows about to join the engine go on the ledger; a row with a crash on record is held out
        (its caller captions it alone)."""
        crashes = self.guard.begin(rows)
        held = [r for r, c in zip(rows, crashes) if c]
        self.guard.done(held)
        admitted = [r for r, c in zip(rows, crashes) if not c]
        with self._ledger_lock:
            self._on_ledger.update((id(r), r) for r in admitted)
        faults.maybe_crash("caption", admitted)
        faults.maybe_crash("generate", admitted)
        return [not c for c in crashes]

    def _off_ledger(self, rows: list[dict]) -> None:
        with self._ledger_lock:
            for r in rows:
                self._on_ledger.pop(id(r), None)
        self.guard.done(rows)

    def _caption_rows(self, todo: list[dict], together: bool = True) -> None:
        """Caption rows on an engine of their own (the caller holds the model lock): together, then
        one by one if that fails."""
        if not todo:
            return
        faults.maybe_crash("caption", todo)
        groups, results = [], []
        if together:
            try:
                results, groups = [self._generate(todo)], [todo]
            except Exception as err:
                self._exit_on_device_failure(err, todo)
        if not groups:
            for r in todo:
                try:
                    results.append(self._generate([r]))
                    groups.append([r])
                except Exception as err:  # this input cannot be captioned: its row says why
                    self._exit_on_device_failure(err, [r])
                    r["error"] = f"caption failed: {type(err).__name__}: {err}"[:2000]
        for group, (texts, counts, accept, elapsed) in zip(groups, results):
            for r, text, count, length in zip(group, texts, counts, accept):
                _fill(r, text, count, length, elapsed / len(group))

    def _exit_on_device_failure(self, err: BaseException, rows: list[dict]) -> None:
        """A device error (CUDA's poisons the process's context) is not the videos' fault: release
        the ledger entries of every row in flight, so the death charges none of them, and exit; Ray
        replaces the actor and Ray Data retries the batches."""
        if not is_device_failure(err):
            return
        import sys

        print(f"[flashcap] device failure in {self.actor_id}: {err}; exiting for a fresh actor", file=sys.stderr)
        with self._ledger_lock:
            in_flight = list(self._on_ledger.values())
        self.guard.done(in_flight + [r for r in rows if id(r) not in self._on_ledger])
        os._exit(DEVICE_FAILURE_EXIT)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for r in rows:
            r.update(caption="", num_tokens=0, acceptance_length=0.0, generate_s=0.0, suffix_tokens=0)
        self.prepare(rows)  # outside the model lock: beside the other calls' decoding
        self._caption(rows)
        now = datetime.now(UTC)
        out = []
        for r in rows:
            out.append(
                {
                    "video_uri": str(r["video_uri"]),
                    "etag": str(r["etag"]),
                    "size": int(r["size"]),
                    **{c: r.get(c, default) for c, default in CARRIED.items()},
                    "caption": r["caption"],
                    "num_tokens": int(r["num_tokens"]),
                    "acceptance_length": float(r["acceptance_length"]),
                    "suffix_tokens": int(r["suffix_tokens"]),
                    "decode_s": float(r["decode_s"]),
                    "generate_s": float(r["generate_s"]),
                    "model": self.config.model,
                    "drafter": self.config.drafter or "",
                    "error": str(r["error"]),
                    # Errors found here (processing, generation, repeated worker deaths) are the input's own.
                    "error_kind": (r.get("error_kind") or "permanent") if r["error"] else "",
                    "worker_node": self.node,
                    "finished_at": now,
                    "actor": self.actor_id,
                    "busy_s": float(r["generate_s"]),  # its share of the model's time
                    "rss_mb": _rss_mb(),
                    "compile": _compile_column(self.config.compile, self.compile_status),
                }
            )
        self._metrics.record(out, sum(row["busy_s"] for row in out))
        return pa.Table.from_pylist(out)


# Columns of a decoded row that its output row keeps as they are (and their value in rows without them).
CARRIED = {"clip_start_s": 0.0, "clip_end_s": 0.0, "shard_uri": "", "source_meta": "", "object_rows": 1}


def _fill(r: dict, caption: str, num_tokens: int, acceptance_length: float, seconds: float) -> None:
    r.update(caption=caption, num_tokens=num_tokens, acceptance_length=acceptance_length, generate_s=seconds)


def _compile_column(asked: bool, status: dict) -> str:
    """How this actor's passes ran: "" (eager, as configured), "active", or "fallback: why"."""
    if not asked:
        return ""
    return "active" if status["active"] else f"fallback: {status['fallback']}"


def _rss_mb() -> float:
    """This process's private resident memory (Linux RssAnon: heap and tensors, without the shared
    object-store pages a Ray worker maps as it reads blocks); peak RSS as a fallback elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_ray() -> bool:
    import ray

    return ray.is_initialized()  # never start a Ray instance from here


def _node_name() -> str:
    if not _in_ray():  # outside Ray (benchmarks, notebooks): the host name is enough
        return socket.gethostname()
    import ray

    return ray.get_runtime_context().get_node_id()[:12] + "@" + socket.gethostname()


class _Metrics:
    """Ray metrics for the dashboard (no-ops outside Ray)."""

    def __init__(self) -> None:
        self.clips = None
        if not _in_ray():
            return
        try:
            from ray.util.metrics import Counter, Gauge

            self.clips = Counter("flashcap_clips_total", "Clips captioned or failed", tag_keys=("status",))
            self.tokens = Counter("flashcap_tokens_total", "Caption tokens generated")
            self.busy = Counter("flashcap_busy_seconds_total", "Seconds caption actors spent on batches")
            self.acceptance = Gauge("flashcap_acceptance_length", "Mean FLASH acceptance length of the last batch")
        except Exception:  # metrics are best effort
            self.clips = None

    def record(self, rows: list[dict], busy: float) -> None:
        if self.clips is None:
            return
        ok = [r for r in rows if not r["error"]]
        if ok:
            self.clips.inc(len(ok), tags={"status": "ok"})
            self.tokens.inc(sum(r["num_tokens"] for r in ok))
            self.acceptance.set(float(np.mean([r["acceptance_length"] for r in ok])))
        if len(ok) < len(rows):
            self.clips.inc(len(rows) - len(ok), tags={"status": "error"})
        if busy > 0:  # a Ray counter takes only positive increments
            self.busy.inc(busy)
