"""Object storage, what is there: the inputs (listings and manifests), their bytes, and the Parquet
output (its parts and the keys they hold). Planning (pipeline/plan.py) composes these answers.

s3:// goes through boto3 (credentials from the standard AWS chain, never
logged; an explicit endpoint for S3-compatible stores); anything else is a
local path. One client per process, built lazily.

Listings go a page at a time. `list_input` lists at most a limit of objects in
the calling process (the driver); beyond it, prefixes (a flat one included) and
local folders are listed by Ray tasks, page by page, into a Dataset, so the
driver never holds a large listing.

The output is a folder (or prefix) of Parquet parts with one explicit schema.
Rows are keyed by (video_uri, etag): a rerun reads the keys already written and
captions only what is missing or changed. Parts are written whole (S3 PUT,
local write-then-rename), so a crash never leaves half a part behind. Part
names are generated here and never derived from input names, so no input can
write outside the output prefix. Reports and probes start with "_", which
Parquet readers (pyarrow, Spark) skip: the folder reads as one table.
"""

from __future__ import annotations

import fnmatch
import io
import os
import random
import re
import time
import uuid
from collections.abc import Iterator
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
        pa.field("caption", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("acceptance_length", pa.float64(), nullable=False),
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
# What a listing or a manifest gives: the objects to caption.
LISTING_SCHEMA = pa.schema([("video_uri", pa.string()), ("etag", pa.string()), ("size", pa.int64())])
# What the output holds, per row: its key, and whether it is an error that may pass.
PART_KEYS_SCHEMA = pa.schema([("video_uri", pa.string()), ("etag", pa.string()), ("transient", pa.bool_())])
LIST_PAGE = 1000  # objects a listing page holds: S3's most keys a request; local files alike


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


def _with_output_schema(table: pa.Table) -> pa.Table:
    """A part in today's schema: columns added since it was written are null (parts written before
    `error_kind` existed read with no kind: every row final)."""
    for field in OUTPUT_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
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


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether the name's last part (after the last "/") matches one of the globs, in any case: the
    rule for listings and manifests alike."""
    return bool(patterns) and _globs(tuple(patterns)).match(name.rsplit("/", 1)[-1].lower()) is not None


@lru_cache(maxsize=64)
def _globs(patterns: tuple[str, ...]) -> re.Pattern:
    """fnmatch's globs, lowercased, as one regex: one match a name (a manifest has millions)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p.lower())})" for p in patterns))


def listing_table(objects: list[VideoObject]) -> pa.Table:
    """Objects as a table of LISTING_SCHEMA (what listings and manifests both give)."""
    return pa.table(
        {
            "video_uri": [o.uri for o in objects],
            "etag": [o.etag for o in objects],
            "size": pa.array([o.size for o in objects], pa.int64()),
        },
        schema=LISTING_SCHEMA,
    )


def _page_videos(bucket: str, page: dict, patterns: tuple[str, ...]) -> list[VideoObject]:
    """The matching objects of one list_objects_v2 page."""
    return [
        VideoObject(f"s3://{bucket}/{o['Key']}", int(o["Size"]), o["ETag"].strip('"'))
        for o in page.get("Contents", [])
        if _matches(o["Key"], patterns)
    ]


def _local_files(root: Path) -> Iterator[Path]:
    """Every file under `root`, one directory entry at a time (a flat folder of millions is never
    held whole); like Path.rglob, symlinked folders are not walked into."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    folders = [root]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                elif entry.is_file():
                    yield Path(entry.path)


def _local_pages(root: Path, patterns: tuple[str, ...]) -> Iterator[list[VideoObject]]:
    page: list[VideoObject] = []
    for path in _local_files(root):
        if _matches(path.name, patterns):
            st = path.stat()
            page.append(VideoObject(str(path.resolve()), st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}"))
            if len(page) == LIST_PAGE:
                yield page
                page = []
    if page:
        yield page


def _s3_pages(uri: str, patterns: tuple[str, ...], settings: S3Settings) -> Iterator[list[VideoObject]]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    paginator = s3_client(settings).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE}):
            yield _page_videos(bucket, page, patterns)
    except (ClientError, BotoCoreError) as err:
        raise _explain(err, f"list {uri}") from None


def listing_pages(uri: str, patterns: tuple[str, ...], settings: S3Settings) -> Iterator[list[VideoObject]]:
    """The matching objects under `uri` (recursively), a page at a time: one list_objects_v2 request
    of LIST_PAGE keys on S3, LIST_PAGE matching files in a local folder; unsorted."""
    if is_s3(uri):
        return _s3_pages(uri, patterns, settings)
    return _local_pages(Path(uri), patterns)


def list_videos(uri: str, patterns: tuple[str, ...], settings: S3Settings) -> list[VideoObject]:
    """Every object under `uri` whose name matches, sorted by URI (held whole: see `list_input`)."""
    return sorted((o for page in listing_pages(uri, patterns, settings) for o in page), key=lambda o: o.uri)


def list_level(
    uri: str, patterns: tuple[str, ...], settings: S3Settings, limit: int | None = None
) -> tuple[list[VideoObject], list[str]] | None:
    """One level of an s3:// prefix ("/" as the delimiter): the matching objects directly under it
    and the sub-prefixes (as s3:// URIs), both sorted; None as soon as more than `limit` objects
    match (nothing is kept: the prefix is to be listed whole, elsewhere)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(uri)
    objects, prefixes = [], []
    paginator = s3_client(settings).get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/", PaginationConfig={"PageSize": LIST_PAGE})
    try:
        for page in pages:
            prefixes += [f"s3://{bucket}/{p['Prefix']}" for p in page.get("CommonPrefixes", [])]
            objects += _page_videos(bucket, page, patterns)
            if limit is not None and len(objects) > limit:
                return None
    except (ClientError, BotoCoreError) as err:
        raise _explain(err, f"list {uri}") from None
    return sorted(objects, key=lambda o: o.uri), sorted(prefixes)


def listing_shards(
    uri: str, patterns: tuple[str, ...], settings: S3Settings, limit: int, width: int = 64, depth: int = 3
) -> tuple[list[VideoObject], list[str]]:
    """How to list an input in parallel, holding at most `limit` objects (and a page) here: walk an
    s3:// input's "folders" breadth first, level by level, until a level has `width` sub-prefixes or
    `depth` levels are walked. Returns the matching objects met on the way and the prefixes left,
    each to be listed whole by its own task: the sub-prefixes not walked, and any prefix with more
    than the objects still allowed directly under it (a flat prefix). A local folder: all of its
    objects, or none and the folder itself if it holds more than `limit`."""
    if not is_s3(uri):
        found: list[VideoObject] = []
        for page in listing_pages(uri, patterns, settings):
            found += page
            if len(found) > limit:
                return [], [str(Path(uri).resolve())]  # tasks run in another directory
        return sorted(found, key=lambda o: o.uri), []
    found, whole = [], []
    level = [uri]  # as given: "s3://b/clips" is a key prefix, as in list_videos
    for _ in range(depth):
        below: list[str] = []
        for prefix in level:
            listed = list_level(prefix, patterns, settings, limit - len(found))
            if listed is None:
                whole.append(prefix)
            else:
                found += listed[0]
                below += listed[1]
        level = below
        if len(level) + len(whole) >= width or not level:
            break
    return found, whole + level


def _list_shards(batch: pa.Table, patterns: tuple[str, ...], settings: S3Settings) -> Iterator[pa.Table]:
    """A listing task: each prefix's objects, a table per page (the task holds one page at a time)."""
    for prefix in batch.column("prefix").to_pylist():
        for page in listing_pages(prefix, patterns, settings):
            yield listing_table(page)


def _on_this_node() -> dict:
    """Ray Data options that keep a task on the driver's node: where a local input folder is."""
    import ray

    return {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def list_input(uri: str, patterns: tuple[str, ...], settings: S3Settings, limit: int):
    """The objects under `uri`: a sorted list if there are at most `limit`, else a Ray Dataset of
    LISTING_SCHEMA that never passes through this process. Here at most `limit` objects are listed
    (see `listing_shards`); the prefixes left (sub-prefixes, a flat prefix, a large local folder)
    are listed by Ray tasks page by page, each writing its own blocks."""
    found, shards = listing_shards(uri, patterns, settings, limit)
    if not shards:
        return found
    import ray.data

    listed = ray.data.from_items([{"prefix": p} for p in shards], override_num_blocks=len(shards))
    placement = {} if is_s3(uri) else _on_this_node()
    listed = listed.map_batches(
        _list_shards,
        fn_kwargs={"patterns": patterns, "settings": settings},
        batch_size=1,
        batch_format="pyarrow",
        **placement,
    )
    if found:
        listed = listed.union(ray.data.from_arrow(listing_table(found)))
    listed = listed.materialize()
    if listed.count() > limit:
        return listed
    rows = listed.take_all()
    return sorted((VideoObject(r["video_uri"], int(r["size"]), r["etag"]) for r in rows), key=lambda o: o.uri)


def read_manifest(uri: str, patterns: tuple[str, ...], settings: S3Settings):
    """A Parquet or CSV manifest as a Ray Dataset of LISTING_SCHEMA, keeping the rows whose name
    matches `patterns`, as a listing does (an S3 Inventory lists every object, videos or not).
    Columns: `video_uri` (optional `etag`, `size`), or S3 Inventory's `bucket`, `key`, `size`, `e_tag`."""
    import ray.data

    fs, path = arrow_filesystem(uri, settings)
    csv = uri.lower().endswith((".csv", ".csv.gz"))
    ds = ray.data.read_csv(path, filesystem=fs) if csv else ray.data.read_parquet(path, filesystem=fs)
    return ds.map_batches(_normalise_manifest, fn_kwargs={"patterns": tuple(patterns)}, batch_format="pyarrow")


def _normalise_manifest(table: pa.Table, patterns: tuple[str, ...]) -> pa.Table:
    names = set(table.column_names)
    n = table.num_rows
    if "video_uri" in names:
        uri = table.column("video_uri").cast(pa.string())
    elif {"bucket", "key"} <= names:
        from urllib.parse import unquote

        buckets, keys = table.column("bucket").to_pylist(), table.column("key").to_pylist()
        uri = pa.array([f"s3://{b}/{unquote(k)}" for b, k in zip(buckets, keys)], pa.string())
    else:
        raise ValueError(f"a manifest needs a video_uri column, or S3 Inventory's bucket and key; got {sorted(names)}")
    etag_column = "etag" if "etag" in names else "e_tag" if "e_tag" in names else None
    etag = table.column(etag_column).cast(pa.string()) if etag_column else pa.array([""] * n, pa.string())
    etag = pa.array([(e or "").strip('"') for e in etag.to_pylist()], pa.string())
    size = table.column("size").cast(pa.int64()) if "size" in names else pa.array([0] * n, pa.int64())
    keep = pa.array([_matches(u or "", patterns) for u in uri.to_pylist()], pa.bool_())
    return pa.table({"video_uri": uri, "etag": etag, "size": size}, schema=LISTING_SCHEMA).filter(keep)


def manifest_bytes(uri: str, settings: S3Settings) -> int:
    """A manifest's size: its file, or every file under it if it is a folder of parts."""
    import pyarrow.fs as pafs

    fs, path = arrow_filesystem(uri, settings)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return sum(f.size or 0 for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    return info.size or 0


def part_keys(table: pa.Table) -> pa.Table:
    """An output part's rows as PART_KEYS_SCHEMA: transient = an error row of kind `transient` (parts
    written before `error_kind` existed have no kind: every row is final)."""
    n = table.num_rows
    error = table.column("error").to_pylist() if "error" in table.column_names else [""] * n
    kind = table.column("error_kind").to_pylist() if "error_kind" in table.column_names else [""] * n
    transient = [bool(e) and k == "transient" for e, k in zip(error, kind)]
    return pa.table(
        {
            "video_uri": table.column("video_uri").cast(pa.string()),
            "etag": table.column("etag").cast(pa.string()),
            "transient": pa.array(transient, pa.bool_()),
        },
        schema=PART_KEYS_SCHEMA,
    )


def read_object(uri: str, settings: S3Settings) -> bytes:
    """The object's bytes. botocore retries the request; a body cut off mid-stream (reset, timeout,
    short read), which botocore does not retry, is fetched again here, with backoff."""
    if not is_s3(uri):
        return Path(uri).read_bytes()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    transient = _transient_body_errors()
    for attempt in range(settings.max_attempts):
        try:
            return s3_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()
        except transient as err:
            if attempt + 1 == settings.max_attempts:
                failure = _explain(err, f"read {uri} ({settings.max_attempts} attempts)")
                failure.transient = True
                raise failure from None
            time.sleep(_backoff(attempt))
        except (ClientError, BotoCoreError) as err:
            raise _explain(err, f"read {uri}") from None
    raise AssertionError("unreachable")


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
        columns = [c for c in ("video_uri", "etag", "error", "error_kind") if c in names]
        return part_keys(pq.read_table(io.BytesIO(data), columns=columns))

    def read_table(self) -> pa.Table:
        tables = [pq.read_table(io.BytesIO(read_object(p, self.settings))) for p in self.parts()]
        if not tables:
            return OUTPUT_SCHEMA.empty_table()
        return pa.concat_tables([_with_output_schema(t) for t in tables])

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
