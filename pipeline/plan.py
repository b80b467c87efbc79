"""What a run captions: the objects to caption (a listing or a manifest) less the keys the output
already holds, keyed by (video_uri, etag).

A key is done when the output has a row for it that is final: a caption, or an error that is not
`transient`. With `retry_errors`, keys whose rows are all transient errors are planned again; the
newest row per key is the current one (the retry's row is newer). Outputs written before the
`error_kind` column existed count every row as final.

Small plans (at most 200,000 listed objects and 64 MB of output) are made on the driver. Larger
ones are a Ray Data job: the output's key columns are read by tasks, part by part, and joined
against the input (a hash-partitioned left anti-join), so no set of keys is ever held on the driver.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import (
    OutputStore,
    S3Settings,
    VideoObject,
    arrow_filesystem,
    is_s3,
    list_videos,
    listing_shards,
    read_object,
)

DRIVER_PLAN_LIMIT = 200_000  # listed objects
DRIVER_PLAN_OUTPUT_BYTES = 64 << 20  # Parquet bytes of output (a few hundred thousand rows)
KEY_COLUMNS = ["video_uri", "etag"]
MANIFEST_COLUMNS = ("video_uri", "etag", "size")


@dataclass
class Plan:
    listed: int
    already_done: int
    to_caption: int
    to_retry: int
    todo: object  # list[VideoObject] (a driver plan) or a ray.data.Dataset of video_uri, etag, size

    def summary(self) -> dict:
        return {
            "listed": self.listed,
            "already_done": self.already_done,
            "to_caption": self.to_caption,
            "to_retry": self.to_retry,
        }


def part_keys(table: pa.Table) -> pa.Table:
    """A part's rows as (video_uri, etag, transient): transient = an error row of kind `transient`
    (parts without `error_kind` were written before retries existed: every row is final)."""
    n = table.num_rows
    error = table.column("error").to_pylist() if "error" in table.column_names else [""] * n
    kind = table.column("error_kind").to_pylist() if "error_kind" in table.column_names else [""] * n
    transient = [bool(e) and k == "transient" for e, k in zip(error, kind)]
    return pa.table(
        {
            "video_uri": table.column("video_uri").cast(pa.string()),
            "etag": table.column("etag").cast(pa.string()),
            "transient": pa.array(transient, pa.bool_()),
        }
    )


def _read_part_keys(path: str, settings: S3Settings) -> pa.Table:
    data = read_object(path, settings)
    schema = pq.read_schema(io.BytesIO(data))
    columns = [c for c in ("video_uri", "etag", "error", "error_kind") if c in schema.names]
    return part_keys(pq.read_table(io.BytesIO(data), columns=columns))


def _split_done(keys: pa.Table, retry_errors: bool) -> tuple[set, set]:
    """(done keys, keys whose every row is a transient error) from part keys, on the driver."""
    final, transient = set(), set()
    for uri, etag, is_transient in zip(*(keys.column(c).to_pylist() for c in ("video_uri", "etag", "transient"))):
        (transient if is_transient and retry_errors else final).add((uri, etag))
    return final, transient - final


def plan_on_driver(
    objects: list[VideoObject], store: OutputStore, retry_errors: bool, parts: list[str] | None = None
) -> Plan:
    """`parts`: the output's parts if the caller listed them already."""
    tables = [_read_part_keys(p, store.settings) for p in (store.parts() if parts is None else parts)]
    keys = pa.concat_tables(tables) if tables else part_keys(pa.table({"video_uri": [], "etag": []}))
    done, retry = _split_done(keys, retry_errors)
    todo = [o for o in objects if (o.uri, o.etag) not in done]
    return Plan(
        listed=len(objects),
        already_done=len(objects) - len(todo),
        to_caption=len(todo),
        to_retry=sum((o.uri, o.etag) in retry for o in todo),
        todo=todo,
    )


def read_manifest(uri: str, settings: S3Settings):
    """A Parquet or CSV manifest as a Ray Dataset of video_uri, etag, size. Columns: `video_uri`
    (optional `etag`, `size`), or S3 Inventory's `bucket`, `key`, `size`, `e_tag`."""
    import ray.data

    fs, path = arrow_filesystem(uri, settings)
    lower = uri.lower()
    csv = lower.endswith((".csv", ".csv.gz"))
    ds = ray.data.read_csv(path, filesystem=fs) if csv else ray.data.read_parquet(path, filesystem=fs)
    return ds.map_batches(_normalise_manifest, batch_format="pyarrow")


def _normalise_manifest(table: pa.Table) -> pa.Table:
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
    return pa.table({"video_uri": uri, "etag": etag, "size": size})


def unique_keys(inputs, partitions: int):
    """A manifest's rows, one per (video_uri, etag): a key listed twice is captioned once."""
    from ray.data.aggregate import Max

    grouped = inputs.groupby(list(KEY_COLUMNS), num_partitions=partitions).aggregate(Max("size", alias_name="size"))
    return grouped.select_columns(list(MANIFEST_COLUMNS))


def _keys_where(table: pa.Table, final: bool, retry_errors: bool) -> pa.Table:
    """The (uri, etag) columns of the rows that are final (or, final=False, transient errors)."""
    import pyarrow.compute as pc

    transient = table.column("transient")
    if final:
        mask = pc.invert(transient) if retry_errors else pa.array([True] * table.num_rows, pa.bool_())
    else:
        mask = transient
    return table.filter(mask).select(KEY_COLUMNS)


def plan_with_ray(
    inputs, store: OutputStore, retry_errors: bool, partitions: int = 0, parts: list[str] | None = None
) -> Plan:
    """The plan as a Ray Data job. `inputs`: a Dataset of video_uri, etag, size; `parts`: the output's
    parts if the caller listed them already."""
    import ray.data

    parts = store.parts() if parts is None else parts
    partitions = partitions or max(2, min(256, len(parts) // 4 + 2))
    inputs = inputs.materialize()  # computed once: joined, then counted
    settings = store.settings
    if parts:
        keys = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=min(len(parts), 1024))
        keys = keys.map_batches(
            lambda batch: pa.concat_tables([_read_part_keys(p, settings) for p in batch.column("path").to_pylist()]),
            batch_format="pyarrow",
            batch_size=1,
        )
        if retry_errors:  # read once, joined twice (final keys, then transient ones)
            keys = keys.materialize()
        # map_batches, not filter: an empty result keeps its columns (the join needs them in every block)
        final = keys.map_batches(
            lambda t: _keys_where(t, final=True, retry_errors=retry_errors), batch_format="pyarrow"
        )
        todo = inputs.join(final, join_type="left_anti", num_partitions=partitions, on=tuple(KEY_COLUMNS))
        todo = todo.materialize()
        to_retry = 0
        if retry_errors:
            transient = keys.map_batches(
                lambda t: _keys_where(t, final=False, retry_errors=True), batch_format="pyarrow"
            )
            to_retry = todo.join(
                transient, join_type="left_semi", num_partitions=partitions, on=tuple(KEY_COLUMNS)
            ).count()
    else:
        todo, to_retry = inputs, 0
    listed, to_caption = inputs.count(), todo.count()
    return Plan(listed, listed - to_caption, to_caption, to_retry, todo)


def _partitions_for(uri: str, settings: S3Settings) -> int:
    """Shuffle partitions for a manifest: one per ~32 MB of it (a million keys is ~40 MB of Parquet)."""
    import pyarrow.fs as pafs

    fs, path = arrow_filesystem(uri, settings)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        size = sum(f.size or 0 for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    else:
        size = info.size or 0
    return max(2, min(256, size // (32 << 20) + 2))


def make_plan(config, settings: S3Settings, objects: list[VideoObject] | None = None) -> Plan:
    """The plan for a config: from its manifest (always a Ray Data plan) or a listing."""
    import ray.data

    store = OutputStore(config.output, settings)
    listing = store.part_sizes()  # the output first: a run that cannot read or write it stops here
    parts, output_bytes = [path for path, _ in listing], sum(size for _, size in listing)
    if not config.dry_run:
        store.check_writable()
    if config.manifest:
        inputs = unique_keys(read_manifest(config.manifest, settings), _partitions_for(config.manifest, settings))
        return plan_with_ray(inputs, store, config.retry_errors, parts=parts)
    if objects is None:
        objects = list_input(config.input, config.include, settings)
    if not isinstance(objects, list):
        return plan_with_ray(objects, store, config.retry_errors, parts=parts)
    if len(objects) <= DRIVER_PLAN_LIMIT and output_bytes <= DRIVER_PLAN_OUTPUT_BYTES:
        return plan_on_driver(objects, store, config.retry_errors, parts=parts)
    return plan_with_ray(ray.data.from_items(_rows(objects)), store, config.retry_errors, parts=parts)


def _rows(objects: list[VideoObject]) -> list[dict]:
    return [{"video_uri": o.uri, "etag": o.etag, "size": o.size} for o in objects]


def _list_prefixes(batch: pa.Table, patterns: tuple[str, ...], settings: S3Settings) -> pa.Table:
    objects = [o for p in batch.column("prefix").to_pylist() for o in list_videos(p, patterns, settings)]
    return pa.Table.from_pylist(_rows(objects), schema=LISTING_SCHEMA)


LISTING_SCHEMA = pa.schema([("video_uri", pa.string()), ("etag", pa.string()), ("size", pa.int64())])


def list_input(uri: str, patterns: tuple[str, ...], settings: S3Settings):
    """The objects under `uri`: a sorted list, or, for an s3:// input with sub-prefixes and more than
    DRIVER_PLAN_LIMIT objects, a Ray Dataset of video_uri, etag, size. The sub-prefixes (see
    `listing_shards`) are listed by parallel Ray tasks, each writing its own block."""
    if not is_s3(uri):
        return list_videos(uri, patterns, settings)
    found, prefixes = listing_shards(uri, patterns, settings)
    if not prefixes:
        return found
    import ray.data

    listed = ray.data.from_items([{"prefix": p} for p in prefixes], override_num_blocks=len(prefixes))
    listed = listed.map_batches(
        _list_prefixes, fn_kwargs={"patterns": patterns, "settings": settings}, batch_size=1, batch_format="pyarrow"
    )
    if found:
        listed = listed.union(ray.data.from_arrow(pa.Table.from_pylist(_rows(found), schema=LISTING_SCHEMA)))
    listed = listed.materialize()
    if listed.count() > DRIVER_PLAN_LIMIT:
        return listed
    rows = listed.take_all()
    return sorted((VideoObject(r["video_uri"], int(r["size"]), r["etag"]) for r in rows), key=lambda o: o.uri)
