"""The inputs, what is there to caption: listings of an s3:// prefix or a local folder, and manifests
(Parquet/CSV, S3 Inventory), both as rows of LISTING_SCHEMA filtered by the `include` globs.

Listings go a page at a time. `list_input` lists at most a limit of objects in
the calling process (the driver); beyond it, prefixes (a flat one included) and
local folders are listed by Ray tasks, page by page, into a Dataset, so the
driver never holds a large listing.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from pipeline.storage import S3Settings, VideoObject, _explain, arrow_filesystem, is_s3, s3_client, split_s3

LISTING_SCHEMA = pa.schema([("video_uri", pa.string()), ("etag", pa.string()), ("size", pa.int64())])
LIST_PAGE = 1000  # objects a listing page holds: S3's most keys a request; local files alike


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether the name's last part (after the last "/") matches one of the globs, in any case: the
    rule for listings, manifests and the members of shards alike."""
    return bool(patterns) and _globs(tuple(patterns)).match(name.rsplit("/", 1)[-1].lower()) is not None


def is_shard(name: str) -> bool:
    """A WebDataset shard: a .tar object, whose members are the videos."""
    return name.lower().endswith(".tar")


def _listed(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a listing or a manifest keeps the object: a video by `include`, or a shard."""
    return is_shard(name) or name_matches(name, patterns)


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
        if _listed(o["Key"], patterns)
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
        if _listed(path.name, patterns):
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
    keep = pa.array([_listed(u or "", patterns) for u in uri.to_pylist()], pa.bool_())
    return pa.table({"video_uri": uri, "etag": etag, "size": size}, schema=LISTING_SCHEMA).filter(keep)


def manifest_bytes(uri: str, settings: S3Settings) -> int:
    """A manifest's size: its file, or every file under it if it is a folder of parts."""
    import pyarrow.fs as pafs

    fs, path = arrow_filesystem(uri, settings)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return sum(f.size or 0 for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    return info.size or 0
