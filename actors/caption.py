"""The caption actor: loads the target and the drafter once (from a local
directory, s3:// or the Hub, through the node's checkpoint cache), then captions
batches of decoded videos with `flash.generate` (GPU when given, CPU otherwise).

Each video reaches the processor as the model card's own usage gives it: the
instruction inside the checkpoint's chat template, and the frames with their
real metadata (source fps, frame count, sampled indices), so time positions and
timestamps are the ones the model was trained with. Tokens are chosen as the
checkpoint's generation config says, unless the job sets a temperature.

Ray Data keeps `batches_per_actor` calls in flight per actor, each in its own
thread: a call runs the processor on its rows (CPU) while another holds the
model, and the model takes one batch at a time. Each row is processed alone and
the batch is collated from those outputs (`Target.collate`, equal to the
processor's own batch), so any grouping of rows can be decoded together.

Rows that arrive with a decode error pass through untouched; a row the
processor refuses gets its error and costs no other row. A device failure (a
CUDA error) is not the videos' fault: the actor exits without charging them,
Ray replaces it and the batch is retried. If a batch fails
in generation, its rows are retried one by one so a single bad input only costs
its own row (which gets the error). If a batch's rows were in flight when an
earlier worker process died (see pipeline/ledger.py), they are captioned one at
a time, and a row charged with `max_worker_crashes` deaths becomes an error row.
Rows are charged while they hold the model, not while they wait for it, so a
video that kills the process does not charge the next batch's rows.
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
from pipeline import faults
from pipeline.checkpoints import resolve_checkpoint
from pipeline.config import DEFAULT_INSTRUCTION, RAW_PROMPT, CaptionConfig
from pipeline.decode import frames_of, video_metadata_of
from pipeline.ledger import Guard
from pipeline.storage import S3Settings

PROCESSED = "_processed"  # a row's processor output, made ahead of the model
DEVICE_FAILURE_EXIT = 75
_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert", "NCCL error")


def is_device_failure(err: BaseException) -> bool:
    """An error of the accelerator itself (it leaves the process's device context unusable), as
    opposed to one of the input."""
    accelerator = getattr(torch, "AcceleratorError", None)
    return (accelerator is not None and isinstance(err, accelerator)) or any(m in str(err) for m in _DEVICE_ERRORS)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


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
        device = "cuda" if use_gpu else "cpu"
        dtype = DTYPES.get(cfg.dtype) or (torch.bfloat16 if use_gpu else torch.float32)
        if not use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        settings = S3Settings(cfg.s3_endpoint, cfg.s3_region, cfg.s3_max_attempts, cfg.s3_timeout_s)
        self.target = flash.load_target(
            resolve_checkpoint(cfg.model, settings), dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code
        )
        self.drafter = (
            flash.FlashDrafter.from_pretrained(resolve_checkpoint(cfg.drafter, settings), self.target)
            if cfg.drafter
            else None
        )
        instruction = cfg.prompt or (DEFAULT_INSTRUCTION if self.target.has_chat_template else RAW_PROMPT)
        self.prompt = self.target.video_prompt(instruction)
        # The decoding settings are checked once, here: a generation config flashcap cannot follow stops the actor.
        flash.SamplingParams.from_generation_config(self.target.model.generation_config, temperature=cfg.temperature)
        # One policy per actor: what it learns about acceptance and costs carries across batches.
        self.policy = (
            flash.BlockPolicy(max_block=self.drafter.block_size) if self.drafter and cfg.adaptive_block else None
        )
        self.node = _node_name()
        self.actor_id = f"{self.node}:{os.getpid()}"
        self._metrics = _Metrics()
        self.guard = Guard(ledger, "caption", self.config.max_worker_crashes)
        self._model_lock = threading.Lock()
        self.compile_status = {"active": cfg.compile, "fallback": None}  # the last engine's

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

    def _generate(self, rows: list[dict]) -> tuple[list[str], list[int], list[float], float]:
        faults.maybe_crash("generate", rows)
        started = time.perf_counter()
        engine = flash.Engine(
            self.target,
            self.drafter,
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
            block_size=self.policy,  # None: the drafter's fixed block
            compile=self.config.compile_backend if self.config.compile else None,
        )
        # At most max_rows videos decode at once; the others join as rows finish (continuous batching).
        keys = engine.run(
            len(rows), lambda group: self.inputs([rows[i] for i in group]), self.config.max_rows or len(rows)
        )
        elapsed = time.perf_counter() - started
        eos = set(self.target.eos_token_ids.tolist())
        sequences = [engine.sequences[k] for k in keys]
        tokenizer = self.target.processor.tokenizer
        texts = [tokenizer.decode([t for t in s if t not in eos], skip_special_tokens=True).strip() for s in sequences]
        lengths = [engine.stats.row_acceptance_length(k) for k in keys]
        self.compile_status = engine.compile_status
        return texts, [len(s) for s in sequences], lengths, elapsed

    def _caption(self, rows: list[dict]) -> None:
        """Fill caption/num_tokens/acceptance_length/generate_s/error on rows without a decode error."""

        def give_up(r: dict, crashes: int) -> None:
            r["error"] = self.guard.message(crashes)

        self.guard.run([r for r in rows if not r["error"]], self._caption_rows, give_up)

    def _caption_rows(self, todo: list[dict]) -> None:
        if not todo:
            return
        faults.maybe_crash("caption", todo)
        try:
            groups = [todo]
            results = [self._generate(todo)]
        except Exception as err:  # isolate the bad row: retry one by one
            self._exit_on_device_failure(err, todo)
            groups, results = [], []
            for r in todo:
                try:
                    results.append(self._generate([r]))
                    groups.append([r])
                except Exception as err:  # this input cannot be captioned: its row says why
                    self._exit_on_device_failure(err, todo)
                    r["error"] = f"caption failed: {type(err).__name__}: {err}"[:2000]
        for group, (texts, counts, accept, elapsed) in zip(groups, results):
            for r, text, count, length in zip(group, texts, counts, accept):
                r.update(caption=text, num_tokens=count, acceptance_length=length, generate_s=elapsed / len(group))

    def _exit_on_device_failure(self, err: Exception, rows: list[dict]) -> None:
        """A device error (CUDA's poisons the process's context) is not the videos' fault: release
        their ledger entries, so the death charges none of them, and exit; Ray replaces the actor
        and Ray Data retries the batch."""
        if not is_device_failure(err):
            return
        import sys

        print(f"[flashcap] device failure in {self.actor_id}: {err}; exiting for a fresh actor", file=sys.stderr)
        self.guard.done(rows)
        os._exit(DEVICE_FAILURE_EXIT)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for r in rows:
            r.update(caption="", num_tokens=0, acceptance_length=0.0, generate_s=0.0)
        self.prepare(rows)
        with self._model_lock:  # one batch on the model at a time; the next one's processor runs meanwhile
            started = time.perf_counter()
            self._caption(rows)
            busy = time.perf_counter() - started
        now = datetime.now(UTC)
        out = []
        for r in rows:
            out.append(
                {
                    "video_uri": str(r["video_uri"]),
                    "etag": str(r["etag"]),
                    "size": int(r["size"]),
                    "caption": r["caption"],
                    "num_tokens": int(r["num_tokens"]),
                    "acceptance_length": float(r["acceptance_length"]),
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
                    "busy_s": 0.0,
                    "rss_mb": _rss_mb(),
                    "compile": _compile_column(self.config.compile, self.compile_status),
                }
            )
        for row in out:
            row["busy_s"] = busy / len(out)
        self._metrics.record(out, busy)
        return pa.Table.from_pylist(out)


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
        self.busy.inc(busy)
