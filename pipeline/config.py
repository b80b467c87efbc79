"""The job's configuration: one frozen pydantic model, validated once, before
any cluster work starts. Built from a YAML file and/or command-line flags
(flags win)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

VIDEO_PATTERNS = ("*.mp4", "*.mkv", "*.webm", "*.avi", "*.mov", "*.m4v")
DEFAULT_INSTRUCTION = "Describe this video in detail."
# The prompt of checkpoints without a chat template (the bundled demo target is one).
RAW_PROMPT = (
    "<|im_start|>user <|vision_start|><|video_pad|><|vision_end|> describe the video .<|im_end|><|im_start|>assistant"
)
SUFFIX = "suffix"  # the drafter that is no checkpoint: suffix decoding (flash/suffix.py)
DEFAULT_NUM_FRAMES = 8
DEFAULT_MAX_FRAMES = 64


class CaptionConfig(BaseModel):
    """Everything a captioning job needs. Every field is documented; unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: str = Field(
        default="",
        description="Videos to caption: s3://bucket/prefix/ or a local directory (searched recursively); "
        "or give a manifest.",
    )
    output: str = Field(description="Where Parquet captions go: s3://bucket/prefix/ or a local directory.")
    manifest: str | None = Field(
        default=None,
        description="The objects to caption, from a Parquet or CSV file (local or s3://): columns video_uri "
        "(optional etag, size) or S3 Inventory's bucket, key, size, e_tag; instead of listing input.",
    )
    retry_errors: bool = Field(
        default=False, description="Caption again the videos whose rows are transient errors (error_kind)."
    )
    dry_run: bool = Field(
        default=False, description="Print the plan (listed, already done, to caption, to retry) and exit."
    )
    include: tuple[str, ...] = Field(
        default=VIDEO_PATTERNS,
        description="Glob patterns on object names (basename, any case) that count as videos, in a listing of "
        "input and in a manifest's rows alike (the rest are skipped, not made error rows); '*' keeps every object. "
        "A .tar object is always a WebDataset shard, whose members matching these are the videos.",
    )
    s3_endpoint: str | None = Field(
        default=None, description="Endpoint URL of an S3-compatible store (MinIO, R2, ...); None: AWS."
    )
    s3_region: str | None = Field(default=None, description="S3 region; None: the standard AWS chain decides.")
    s3_max_attempts: int = Field(
        default=8, ge=1, le=50, description="Tries per S3 request (throttling, 5xx, resets, timeouts), with backoff."
    )
    s3_timeout_s: float = Field(default=60.0, gt=0, description="Connect and read timeout per S3 request.")
    model: str = Field(
        description="Target VLM checkpoint (safetensors): a local directory, an s3://bucket/prefix/ (downloaded "
        "once per node) or a Hugging Face Hub id org/name[@revision]."
    )
    drafter: str | None = Field(
        default=None,
        description="FLASH drafter: a local directory, an s3:// prefix or a Hub id, like model; 'suffix': suffix "
        "decoding, drafting from the captions the actor already wrote (no model, no training); None: plain decoding.",
    )
    suffix: bool = Field(
        default=False,
        description="Beside a FLASH drafter, suffix decoding's proposals too (from the captions the actor already "
        "wrote): per row and cycle the proposal expected to be accepted further is verified.",
    )
    trust_remote_code: bool = Field(default=False, description="Allow model code from the checkpoint to run.")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = Field(
        default="auto", description="Model dtype; auto: bfloat16 on GPU, float32 on CPU."
    )
    prompt: str | None = Field(
        default=None,
        description="The instruction, wrapped by the checkpoint's chat template (one video, then this text); "
        "a checkpoint without a chat template takes it as the whole prompt, with its video placeholder. "
        f"None: {DEFAULT_INSTRUCTION!r} with a chat template, else the demo target's prompt.",
    )
    num_frames: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Frames sampled evenly per video. None (and fps None): the checkpoint's video processor "
        f"config says (num_frames, else fps), else {DEFAULT_NUM_FRAMES}.",
    )
    fps: float | None = Field(
        default=None, gt=0, description="Sample at this rate instead of num_frames (capped at max_frames)."
    )
    max_frames: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Upper bound on frames per video when fps is set. "
        f"None: the checkpoint's, else {DEFAULT_MAX_FRAMES}.",
    )
    window_s: float | None = Field(
        default=None,
        gt=0,
        description="Caption each video in windows of this many seconds: [start, start + window_s) for start = 0, "
        "window_stride_s, 2 x window_stride_s, ... (frame sampling applies within each window; one row per window). "
        "None: one caption per video.",
    )
    window_stride_s: float | None = Field(
        default=None, gt=0, description="Seconds between window starts (needs window_s). None: window_s."
    )
    min_window_s: float = Field(
        default=1.0, gt=0, description="A trailing window shorter than this is skipped (with window_s)."
    )
    max_side: int = Field(default=448, ge=28, le=4096, description="Frames are downscaled so the longer side fits.")
    max_video_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="Larger objects get an error row instead of being read."
    )
    max_new_tokens: int = Field(
        default=512,
        ge=1,
        le=4096,
        description="Caption length limit in tokens (detailed captions of 7B models run 100-300; a caption "
        "cut here has num_tokens == max_new_tokens and no EOS).",
    )
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=10.0,
        description="None: decode as the checkpoint's generation_config.json says (like model.generate()); "
        "0: greedy (the checkpoint's repetition penalty still applies); > 0: sampling at this temperature.",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        le=256,
        description="Videos per caption-actor call (the throughput-best of 4 / 16 / 32 in the pipeline benchmark).",
    )
    max_rows: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Videos decoding at once in a caption actor's engine (its slots): the rows of every batch in "
        "flight join as rows finish (continuous batching). None: batch_size.",
    )
    batches_per_actor: int = Field(
        default=2,
        ge=1,
        le=8,
        description="Batches in flight per caption actor: the next batch's processor work (CPU) runs while the "
        "model decodes, and its rows join the actor's engine as the current batch's rows finish.",
    )
    adaptive_block: bool = Field(
        default=True,
        description="Pick a FLASH drafter's draft length per cycle from measured acceptance and costs (0 = plain); "
        "suffix decoding sizes each row's proposal itself.",
    )
    compile: bool = Field(
        default=False,
        description="Capture the decoding passes as graphs (torch.compile, fullgraph; CUDA graphs on GPUs): the "
        "same captions, fewer kernel launches. Off by default until the GPU check has passed on a lent device; a "
        "pass that cannot be captured decodes eager and the report says why.",
    )
    compile_backend: str = Field(
        default="inductor",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="torch.compile backend for `compile`: inductor (generated kernels, CUDA graphs on GPUs) or "
        "aot_eager (traced and exact, no kernel generation: what the CPU tests prove the capture with).",
    )
    min_actors: int = Field(default=1, ge=1, description="Caption actor pool lower bound.")
    max_actors: int = Field(default=1, ge=1, description="Caption actor pool upper bound (autoscaling).")
    gpus_per_actor: float = Field(
        default=0.0,
        ge=0.0,
        description="GPUs per caption actor; 0: CPU. Above 1 the target is split over the actor's GPUs, layers "
        "placed by memory, the drafter beside the LM head.",
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        gt=0.0,
        description="Memory each of an actor's GPUs gives the target, its caches and activations (GiB); unset: "
        "the GPU's own total. Set, the driver checks that the target fits before any video is read; either way "
        "the actor refuses a target that does not fit at start, with the sizes.",
    )
    cpus_per_actor: float = Field(default=1.0, gt=0.0, description="CPUs per caption actor.")
    cpus_per_decode: float = Field(default=1.0, gt=0.0, description="CPUs per video-decoding task.")
    flush_rows: int = Field(
        default=20_000,
        ge=1,
        description="Rows buffered before a Parquet part is written (with flush_seconds, whichever comes first).",
    )
    flush_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Longest a buffered row waits before it is written, whether or not more rows arrive.",
    )
    max_worker_crashes: int = Field(
        default=3,
        ge=1,
        description="A video in flight when its worker process died this many times becomes an error row.",
    )
    max_rounds: int = Field(
        default=3,
        ge=1,
        description="Times the driver reruns what is still missing after the cluster lost work it cannot retry.",
    )
    report: bool = Field(default=True, description="Write report.json and throughput.png beside the output.")

    @field_validator("input", "output")
    @classmethod
    def _uri(cls, value: str) -> str:
        if "://" in value and not value.startswith("s3://"):
            raise ValueError(f"{redact(value)!r}: only s3:// URIs and local paths are supported")
        if value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError(f"{redact(value)!r}: an s3:// URI needs a bucket")
        return value

    @field_validator("model", "drafter")
    @classmethod
    def _checkpoint(cls, value: str | None, info) -> str | None:
        """A local checkpoint as an absolute path: Ray Train's workers run in another directory."""
        from pipeline.checkpoints import reference_kind  # here: config stays importable without boto3/pyarrow

        if info.field_name == "drafter" and value == SUFFIX:
            return value
        if value is not None and reference_kind(value, what=info.field_name) == "local":
            return str(Path(value).expanduser().absolute())
        return value

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{redact(value)!r}: the S3 endpoint must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CaptionConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) < min_actors ({self.min_actors})")
        if self.num_frames is not None and self.fps is not None:
            raise ValueError("set num_frames or fps, not both")
        if self.suffix and (self.drafter is None or self.drafter == SUFFIX):
            raise ValueError(
                "suffix adds suffix proposals to a FLASH drafter: give one (or use --drafter suffix alone)"
            )
        if self.window_s is None and self.window_stride_s is not None:
            raise ValueError("window_stride_s needs window_s")
        if self.window_s is not None and self.window_s < self.min_window_s:
            raise ValueError(
                f"window_s ({self.window_s}) is shorter than min_window_s ({self.min_window_s}): every window "
                "would be skipped; lower min_window_s"
            )
        if not self.input and not self.manifest:
            raise ValueError("give the videos to caption: an input (s3:// prefix or directory) or a manifest")
        if self.input and not self.input.startswith("s3://") and not Path(self.input).is_dir():
            raise ValueError(f"input {self.input!r} is not a directory")
        if self.output.rstrip("/") == self.input.rstrip("/"):
            raise ValueError("output must differ from input")
        return self

    def describe(self) -> str:
        return "\n".join(f"  {name}: {redact(getattr(self, name))!r}" for name in type(self).model_fields)


# user:password@ (or a token@) right after a URL's scheme: up to the last "@" before the path.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s\"'<>@]*(?:@[^/?#\s\"'<>@]*)*@")
# Credentials passed as parameters: presigned S3 URLs (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token, AWSAccessKeyId, Signature), SAS tokens (sig), tokens, passwords, keys; in a
# query string or an Authorization header ("Credential=..., Signature=...").
# A name counts by its ending ("X-Amz-Security-Token", "access_token"), so "max_new_tokens=" does not.
_SECRET_PARAM = re.compile(
    r"(?P<name>(?:^|(?<=[?&;,\s]))(?:[\w.-]*(?:signature|credential|token|password|passwd|secret|accesskeyid|"
    r"access_key|apikey|api_key)|sig|pwd|key|auth))=[^&;,\s\"'<>#]*",
    re.IGNORECASE,
)


def redact(value: Any) -> Any:
    """`value` with every secret a URL can carry replaced by "***": user:password@ and credentials in
    query strings (presigned URLs, tokens); strings anywhere in dicts, lists and tuples too. Used on
    every config value, error message, report and error row before it is logged or written."""
    if isinstance(value, str):
        if "@" in value:
            value = _USERINFO.sub(r"\g<scheme>***@", value)
        if "=" in value:
            value = _SECRET_PARAM.sub(r"\g<name>=***", value)
        return value
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def load_config(path: str | None = None, **overrides: Any) -> CaptionConfig:
    """YAML file (optional) + overrides (None values ignored) -> validated CaptionConfig.

    Raises ValueError with every problem listed.
    """
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"config file {path!r} does not exist")
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of field: value")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return CaptionConfig(**data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())
        raise ValueError(redact(f"invalid configuration: {problems}")) from None
