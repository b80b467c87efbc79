"""Model references -> local checkpoint directories.

A reference is a local directory, an s3://bucket/prefix/ or a Hugging Face Hub id
(`org/name[@revision]`). An s3:// prefix is downloaded once per node into a cache entry named by
a digest of its listing (relative key, ETag, size; plus the `only` patterns), so a changed object
gives a new entry and an unchanged checkpoint is never fetched twice.

Invariant: a cache entry exists under its final name only when complete. The one process holding
`<digest>.lock` writes `<digest>.partial-<uuid>/`, checks it and renames it in one step; the
others wait on the lock and then find the entry done. A process that dies mid-download leaves only
a `.partial-*` folder, which the next holder of the lock removes.

Hub ids go through huggingface_hub's own cache, which locks per file. Pickled weights (*.bin,
*.pt, ...) are never fetched from either: flashcap loads safetensors only.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Literal

from pipeline.storage import S3Settings, StorageError, _explain, is_s3, s3_client, split_s3

PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

Listing = list[tuple[str, str, int]]  # (key relative to the prefix, ETag, size), sorted


def reference_kind(ref: str, what: str = "checkpoint") -> Literal["local", "s3", "hub"]:
    """What `ref` names. ValueError when it names nothing usable; a path that looks local (starts
    with /, . or ~, or exists) must be a directory."""
    if is_s3(ref):
        if not split_s3(ref)[0]:
            raise ValueError(f"{what} {ref!r}: an s3:// URI needs a bucket")
        return "s3"
    if ref.strip() and "://" not in ref:
        path = Path(ref).expanduser()
        if path.exists() or ref.startswith(("/", ".", "~")):
            if not path.is_dir():
                raise ValueError(f"{what} {ref!r} is not a directory")
            return "local"
        if _HUB_ID.fullmatch(ref) and ".." not in ref:
            return "hub"
    raise ValueError(f"{what} {ref!r} is not a directory, an s3:// URI or a Hub id")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $FLASHCAP_CACHE, else ~/.cache/flashcap/checkpoints."""
    if cache_dir is None:
        cache_dir = os.environ.get("FLASHCAP_CACHE") or Path.home() / ".cache" / "flashcap" / "checkpoints"
    return Path(cache_dir).expanduser()


def resolve_checkpoint(
    ref: str,
    settings: S3Settings,
    *,
    cache_dir: str | Path | None = None,
    only: tuple[str, ...] | None = None,
) -> Path:
    """A local directory holding the checkpoint `ref` names, downloading it (once per node) if needed.

    `only`: glob patterns on file names relative to the checkpoint root (e.g. ("*.json", "tokenizer*"))
    to fetch just those files; ignored for a local directory, which is returned as is.
    """
    kind = reference_kind(ref)
    if kind == "local":
        return Path(ref).expanduser().resolve()
    if kind == "hub":
        return _from_hub(ref, only)
    return _from_s3(ref, settings, cache_root(cache_dir), only)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _bucket_prefix(ref: str) -> tuple[str, str]:
    bucket, prefix = split_s3(ref)
    # "models/qwen" must not also list "models/qwen-old/...": a non-empty prefix ends in "/".
    return bucket, (prefix.rstrip("/") + "/" if prefix.strip("/") else "")


def _relative(key: str, prefix: str, ref: str) -> str:
    rel = key[len(prefix) :]
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"object key {key!r} under {ref} would leave the checkpoint directory")
    return rel


def _select(ref: str, settings: S3Settings, only: tuple[str, ...] | None) -> Listing:
    """The objects under the prefix that make up the checkpoint: no folder markers, no pickles."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _bucket_prefix(ref)
    listing: Listing = []
    try:
        for page in s3_client(settings).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # a "folder" made by a console: no content
                    continue
                rel = _relative(obj["Key"], prefix, ref)
                if not _matches(rel.lower(), PICKLES) and (only is None or _matches(rel, only)):
                    listing.append((rel, obj["ETag"].strip('"'), int(obj["Size"])))
    except (ClientError, BotoCoreError) as err:
        raise _explain(err, f"list {ref}") from None
    return sorted(listing)


def _from_s3(ref: str, settings: S3Settings, root: Path, only: tuple[str, ...] | None) -> Path:
    listing = _select(ref, settings, only)
    if not listing:
        raise ValueError(f"no objects under {ref}" + (f" match {list(only)}" if only is not None else ""))
    key = json.dumps([listing, sorted(only) if only is not None else None])
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    final = root / digest
    if final.is_dir():  # complete by the invariant: no lock needed
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{digest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, and by the kernel if this process dies
        if final.is_dir():  # another process finished it while we waited
            return final
        for stale in root.glob(f"{digest}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a process that died holding the lock
        partial = root / f"{digest}.partial-{uuid.uuid4().hex}"
        try:
            _download_all(ref, settings, listing, partial)
            if _select(ref, settings, only) != listing:
                raise StorageError(f"cannot download {ref}: objects changed while downloading; run again")
            os.rename(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # nothing left after a failure (gone after the rename)
    return final


def _download_all(ref: str, settings: S3Settings, listing: Listing, partial: Path) -> None:
    bucket, prefix = _bucket_prefix(ref)
    client = s3_client(settings)
    for rel, _, size in listing:
        dest = partial.joinpath(*rel.split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download_object(client, bucket, prefix + rel, dest)
        got = dest.stat().st_size
        if got != size:
            raise StorageError(f"cannot download s3://{bucket}/{prefix}{rel}: got {got} bytes, listed {size}")


def _download_object(client, bucket: str, key: str, dest: Path) -> None:
    """One object into `dest`. boto3's managed transfer fetches large objects in parallel ranges
    and retries bodies cut off mid-stream."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.download_file(bucket, key, str(dest))
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise _explain(err, f"download s3://{bucket}/{key}") from None


def _from_hub(ref: str, only: tuple[str, ...] | None) -> Path:
    """The Hub snapshot's local folder. Offline, only what huggingface_hub has cached already."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)
    repo_id, _, revision = ref.partition("@")
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=list(only) if only is not None else None,
            ignore_patterns=list(PICKLES),
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        if not offline:
            raise
        raise ValueError(
            f"{ref!r} is a Hugging Face Hub id, but the hub is offline ({' or '.join(_OFFLINE_VARS)} is set) "
            "and it is not in the local Hub cache: pass a local directory or an s3:// URI"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ValueError(f"Hub model {ref!r} not found (a gated or private one needs HF_TOKEN): {err}") from None
    return Path(folder)


# The small files of a checkpoint: configs, tokenizer, chat template (what the driver reads).
CONFIG_FILES = ("*.json", "*.jinja", "*.txt", "*.model", "tokenizer*")


def video_sampling(model_dir: Path) -> dict[str, int | float | None]:
    """num_frames, fps and max_frames as the checkpoint's video processor config sets them (None: unset)."""
    from transformers import AutoVideoProcessor

    try:
        processor = AutoVideoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError):  # no video processor in the checkpoint: nothing to follow
        return {"num_frames": None, "fps": None, "max_frames": None}
    return {name: getattr(processor, name, None) for name in ("num_frames", "fps", "max_frames")}


# Files of a checkpoint that decide what the target answers (logs and READMEs do not).
MODEL_FILES = ("*.safetensors", "*.json", "*.jinja", "tokenizer*", "vocab*", "merges.txt", "*.model")


def checkpoint_digest(ref: str, settings: S3Settings) -> str:
    """A digest that changes when the checkpoint `ref` names changes: its S3 listing (keys, ETags,
    sizes), its Hub commit, or a local directory's file contents. Reads no weights from S3 or the Hub."""
    kind = reference_kind(ref)
    h = hashlib.sha256(kind.encode() + b"\0")
    if kind == "s3":
        listing = [item for item in _select(ref, settings, None) if _matches(item[0].rsplit("/", 1)[-1], MODEL_FILES)]
        if not listing:
            raise ValueError(f"no checkpoint files under {ref}")
        h.update(json.dumps(listing).encode())
    elif kind == "hub":
        h.update(_from_hub(ref, CONFIG_FILES).name.encode())  # the snapshot folder is named by its commit
    else:
        root = Path(ref).expanduser().resolve()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and _matches(p.name, MODEL_FILES)):
            h.update(str(path.relative_to(root)).encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
    return h.hexdigest()
