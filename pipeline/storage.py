"""Object storage: clients and filesystems, reading an object's bytes, and the Parquet output (its
parts and the keys they hold). What the inputs are (listings, manifests) is pipeline/inputs.py;
planning (pipeline/plan.py) composes both.

s3:// goes through boto3 (credentials from the standard AWS chain, never
logged; an explicit endpoint for S3-compatible stores); anything else is a
local path. One client per process, built lazily.

The output is a folder (or prefix) of Parquet parts with one explicit schema.
Rows are keyed by (video_uri, etag): a rerun reads the keys already written and
captions only what is missing or changed. Parts are written whole (S3 PUT,
local write-then-rename), so a crash never leaves half a part behind. Part
names are generated here and never derived from input names, so no input can
write outside the output prefix. Reports and probes start with "_", which
Parquet readers (pyarrow, Spark) skip: the folder reads as one table.
"""

from __future__ import annotations

import io
import os
import random
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        # The clip of the video this row captions, in seconds: a window, or 0 and the video's duration.
        pa.field("clip_start_s", pa.float64(), nullable=True),
        pa.field("clip_end_s", pa.float64(), nullable=True),
        # A WebDataset shard's member: the shard (video_uri is "<shard_uri>#<member>") and the sample's
        # .json member as found; "" for a video that is an object of its own.
        pa.field("shard_uri", pa.string(), nullable=True),
        pa.field("source_meta", pa.string(), nullable=True),
        # The rows the listed object (video or shard) makes in all, on the rows that knew it when they
        # were made (every window of a video; a shard's last row), else 0: a rerun tells a complete
        # object from one a crash left partly written.
        pa.field("object_rows", pa.int64(), nullable=True),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("acceptance_length", pa.float64(), nullable=False),
        # accepted tokens that suffix decoding drafted (`--drafter suffix`, or `--suffix` beside FLASH)
        pa.field("suffix_tokens", pa.int32(), nullable=True),
        pa.field("decode_s", pa.float64(), nullable=False),
        pa.field("generate_s", pa.float64(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("drafter", pa.string(), nullable=True),
        pa.field("error", pa.string(), nullable=True),
        # "" for a caption; "transient" (may pass: storage throttling that outlasted the retries) or
        # "permanent" (the input itself: corrupt, too large, killed its worker repeatedly) for an error.
        pa.field("error_kind", pa.string(), nullable=True),
        pa.field("worker_node", pa.string(), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
# Parts written before a column existed read with these values: one row per video, whole.
LEGACY_VALUES = {"clip_start_s": 0.0, "shard_uri": "", "source_meta": "", "object_rows": 1, "suffix_tokens": 0}
# What the output holds, per row: its key, its object, and whether it is an error that may pass.
PART_KEYS_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),
        ("etag", pa.string()),
        ("clip_start_s", pa.float64()),
        ("shard_uri", pa.string()),
        ("object_rows", pa.int64()),
        ("transient", pa.bool_()),
    ]
)


def row_key(video_uri: str, clip_start_s: float) -> str:
    """A row's key within its (video_uri, etag): the clip it captions, by where it starts."""
    return f"{video_uri}\x00{float(clip_start_s)!r}"


class StorageError(RuntimeError):
    """A storage operation failed for good (missing bucket, access denied, ...), after retries.
    `transient`: the last failure was of a kind that can pass (throttling, 5xx, resets, timeouts)."""

    transient: bool = False


_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeTooSkewed",
}


def _explain(err: Exception, what: str) -> StorageError:
    """The failure as a StorageError whose message says what failed, with no secret in it: botocore
    quotes the endpoint URL (user:password@ included) and presigned URLs in its messages."""
    from pipeline.config import redact

    response = getattr(err, "response", None) or {}
    code = response.get("Error", {}).get("Code", type(err).__name__)
    message = response.get("Error", {}).get("Message", str(err))
    failure = StorageError(redact(f"cannot {what}: {code}: {message}"))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    # Throttling, 5xx and lost connections can pass; 403, 404 and their kind cannot.
    failure.transient = code in _TRANSIENT_CODES or status >= 500 or status == 429 or not response
    return failure


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None
    region: str | None = None
    max_attempts: int = 8  # per request, throttling/5xx/resets/timeouts, with backoff
    timeout_s: float = 60.0  # connect and read timeout per request


@dataclass(frozen=True)
class VideoObject:
    uri: str
    size: int
    etag: str  # S3 ETag, or mtime-size for local files: changes when the object does
    skip: tuple[str, ...] = ()  # row_key of its rows already written (an object a run left partly done)


def _with_output_schema(table: pa.Table) -> pa.Table:
    """A part in today's schema: columns added since it was written hold LEGACY_VALUES, else null
    (parts written before `error_kind` existed read with no kind: every row final)."""
    for field in OUTPUT_SCHEMA:
        if field.name not in table.column_names:
            value = LEGACY_VALUES.get(field.name)
            column = (
                pa.nulls(table.num_rows, field.type)
                if value is None
                else pa.array([value] * table.num_rows, field.type)
            )
            table = table.append_column(field, column)
    return table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


@lru_cache(maxsize=8)
def s3_client(settings: S3Settings):
    """A boto3 S3 client whose requests retry throttling (503 SlowDown), 5xx, resets and timeouts with
    backoff (botocore's adaptive mode); permanent errors (403, 404) are not retried."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": settings.max_attempts, "mode": "adaptive"},
        connect_timeout=settings.timeout_s,
        read_timeout=settings.timeout_s,
    )
    return boto3.client("s3", endpoint_url=settings.endpoint, region_name=settings.region, config=config)


def arrow_filesystem(uri: str, settings: S3Settings):
    """(pyarrow filesystem, path in it) for a local path or an s3:// URI: what Ray Data and Ray Train
    take for storage (`filesystem=`, `storage_filesystem=`). The endpoint, region, retries and
    timeouts are the job's; pyarrow needs the endpoint passed explicitly."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    bucket, key = split_s3(uri)
    kwargs: dict = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        "connect_timeout": settings.timeout_s,
        "request_timeout": settings.timeout_s,
    }
    if settings.endpoint:
        scheme, _, host = settings.endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if settings.region:
        kwargs["region"] = settings.region
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def _transient_body_errors() -> tuple[type[Exception], ...]:
    from botocore import exceptions as e

    return (
        e.ResponseStreamingError,
        e.IncompleteReadError,
        e.ReadTimeoutError,
        e.ConnectTimeoutError,
        e.ConnectionClosedError,
        e.EndpointConnectionError,
    )


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff: up to 0.2 s, 0.4 s, ... capped at 10 s."""
    return random.uniform(0, min(10.0, 0.2 * 2**attempt))


def part_keys(table: pa.Table) -> pa.Table:
    """An output part's rows as PART_KEYS_SCHEMA: transient = an error row of kind `transient` (parts
    written before `error_kind` existed have no kind: every row is final); columns a part predates
    hold LEGACY_VALUES."""
    n = table.num_rows
    error = table.column("error").to_pylist() if "error" in table.column_names else [""] * n
    kind = table.column("error_kind").to_pylist() if "error_kind" in table.column_names else [""] * n
    transient = [bool(e) and k == "transient" for e, k in zip(error, kind)]
    columns = {
        "video_uri": table.column("video_uri").cast(pa.string()),
        "etag": table.column("etag").cast(pa.string()),
        "transient": pa.array(transient, pa.bool_()),
    }
    for name in ("clip_start_s", "shard_uri", "object_rows"):
        field = PART_KEYS_SCHEMA.field(name)
        if name in table.column_names:
            columns[name] = table.column(name).cast(field.type).fill_null(LEGACY_VALUES[name])
        else:
            columns[name] = pa.array([LEGACY_VALUES[name]] * n, field.type)
    return pa.table({name: columns[name] for name in PART_KEYS_SCHEMA.names}, schema=PART_KEYS_SCHEMA)


def read_object(uri: str, settings: S3Settings) -> bytes:
    """The object's bytes. botocore retries the request; a body cut off mid-stream (reset, timeout,
    short read), which botocore does not retry, is fetched again here, with backoff."""
    if not is_s3(uri):
        return Path(uri).read_bytes()
    return _get(uri, settings)


def _get(uri: str, settings: S3Settings, first: int | None = None, last: int | None = None) -> bytes:
    """An s3:// object's bytes, or bytes first..last (inclusive) of it, with the retries above."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    extra = {"Range": f"bytes={first}-{last}"} if first is not None else {}
    transient = _transient_body_errors()
    for attempt in range(settings.max_attempts):
        try:
            return s3_client(settings).get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
        except transient as err:
            if attempt + 1 == settings.max_attempts:
                failure = _explain(err, f"read {uri} ({settings.max_attempts} attempts)")
                failure.transient = True
                raise failure from None
            time.sleep(_backoff(attempt))
        except (ClientError, BotoCoreError) as err:
            raise _explain(err, f"read {uri}") from None
    raise AssertionError("unreachable")


STREAM_BLOCK = 8 << 20  # bytes a ranged read fetches: the memory a streamed object costs, per stream


class _RangedObject(io.RawIOBase):
    """An s3:// object as a seekable raw stream: each read is a ranged GET of at most STREAM_BLOCK
    bytes at the position (retried as `read_object` is), nothing else is held."""

    def __init__(self, uri: str, size: int, settings: S3Settings) -> None:
        self.uri, self.size, self.settings, self.position = uri, size, settings, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.position = base + offset
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), STREAM_BLOCK, self.size - self.position)
        if count <= 0:
            return 0
        data = _get(self.uri, self.settings, self.position, self.position + count - 1)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def open_object(uri: str, settings: S3Settings, size: int | None = None) -> io.BufferedIOBase:
    """The object as a seekable binary stream read as needed (ranged GETs on S3, the file itself
    locally): a video of any size costs its reader a block of memory, not its bytes. `size`: the
    object's size if known (else S3 is asked)."""
    if not is_s3(uri):
        return open(uri, "rb")
    if size is None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            size = int(s3_client(settings).head_object(Bucket=bucket, Key=key)["ContentLength"])
        except (ClientError, BotoCoreError) as err:
            raise _explain(err, f"read {uri}") from None
    return io.BufferedReader(_RangedObject(uri, size, settings), buffer_size=STREAM_BLOCK)


class OutputStore:
    """The Parquet output folder or prefix."""

    def __init__(self, uri: str, settings: S3Settings) -> None:
        self.uri = uri.rstrip("/")
        self.settings = settings

    def _key(self, name: str) -> str:
        if not name or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
            raise ValueError(f"output name {name!r} would leave the output prefix")
        return f"{self.uri}/{name}"

    def check_writable(self) -> None:
        """Fail fast (before any model loads) if the output cannot be listed or written."""
        probe = f"_flashcap-probe-{uuid.uuid4().hex}"
        self.write_bytes(probe, b"")
        self.delete(probe)

    def parts(self) -> list[str]:
        return [path for path, _ in self.part_sizes()]

    def part_sizes(self) -> list[tuple[str, int]]:
        """(path, bytes) of every Parquet part, sorted by path."""
        from botocore.exceptions import BotoCoreError, ClientError

        if is_s3(self.uri):
            bucket, prefix = split_s3(self.uri + "/")
            paginator = s3_client(self.settings).get_paginator("list_objects_v2")
            try:
                return sorted(
                    (f"s3://{bucket}/{o['Key']}", int(o["Size"]))
                    for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                    for o in page.get("Contents", [])
                    if o["Key"].endswith(".parquet") and "/" not in o["Key"][len(prefix) :]
                )
            except (ClientError, BotoCoreError) as err:
                raise _explain(err, f"list the output {self.uri}") from None
        root = Path(self.uri)
        return sorted((str(p), p.stat().st_size) for p in root.glob("*.parquet")) if root.is_dir() else []

    def read_keys(self, path: str) -> pa.Table:
        """A part's keys (see `part_keys`): only its key and error columns are decoded."""
        data = read_object(path, self.settings)
        names = pq.read_schema(io.BytesIO(data)).names
        wanted = ("video_uri", "etag", "error", "error_kind", "clip_start_s", "shard_uri", "object_rows")
        columns = [c for c in wanted if c in names]
        return part_keys(pq.read_table(io.BytesIO(data), columns=columns))

    def read_table(self) -> pa.Table:
        tables = [pq.read_table(io.BytesIO(read_object(p, self.settings))) for p in self.parts()]
        if not tables:
            return OUTPUT_SCHEMA.empty_table()
        return pa.concat_tables([_with_output_schema(t) for t in tables])

    def recent_captions(self, limit: int) -> list[str]:
        """Up to `limit` captions of the newest parts (part names sort by run start), newest first:
        only their caption and error columns are read."""
        out: list[str] = []
        for path in reversed(self.parts()):
            data = read_object(path, self.settings)
            table = pq.read_table(io.BytesIO(data), columns=["caption", "error"])
            for caption, error in zip(table.column("caption").to_pylist(), table.column("error").to_pylist()):
                if caption and not error:
                    out.append(caption)
            if len(out) >= limit:
                return out[:limit]
        return out

    def write_bytes(self, name: str, data: bytes) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(name)
        if is_s3(key):
            bucket, object_key = split_s3(key)
            try:
                s3_client(self.settings).put_object(Bucket=bucket, Key=object_key, Body=data)
            except (ClientError, BotoCoreError) as err:
                raise _explain(err, f"write {key}") from None
        else:
            path = Path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return key

    def delete(self, name: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(name)
        if is_s3(key):
            bucket, object_key = split_s3(key)
            try:
                s3_client(self.settings).delete_object(Bucket=bucket, Key=object_key)
            except (ClientError, BotoCoreError) as err:
                raise _explain(err, f"delete {key}") from None
        else:
            Path(key).unlink(missing_ok=True)

    def write_part(self, rows: list[dict], name: str) -> str:
        """Write rows as one Parquet part (whole or not at all)."""
        table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(name, buf.getvalue())
