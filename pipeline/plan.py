"""What a run captions: the objects to caption (a listing or a manifest) less those the output
already holds whole. Storage (pipeline/storage.py) says what is there; this module composes it:
the objects done, the anti-join, the counts.

A listed object (video_uri, etag) makes one row, or several: a WebDataset shard a row per video
member (video_uri "<shard>#<member>", shard_uri the shard), a video in windows a row per window
(keyed by clip_start_s). Each row carries `object_rows`, the rows its object makes, where that was
known (a shard's last row). An object is done when its final rows number object_rows: a row is
final when it is a caption, or an error that is not `transient`. With `retry_errors`, rows that are
only transient errors are not final. An object partly in the output (a run that crashed mid-shard,
rows to retry) is planned again with the keys of its final rows to skip. Outputs written before
these columns existed read as one whole-video row per object; before `error_kind`, every row is
final.

Small plans (at most 200,000 listed objects and 64 MB of output) are made on the driver. Larger
ones are a Ray Data job: the listing is a Dataset written by listing tasks, the output's key columns
are read by tasks, part by part, and joined against the input (a hash-partitioned left anti-join),
so no set of keys is ever held on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pyarrow as pa

from pipeline.inputs import LISTING_SCHEMA, list_input, listing_table, manifest_bytes, read_manifest
from pipeline.storage import PART_KEYS_SCHEMA, OutputStore, S3Settings, VideoObject, row_key

DRIVER_PLAN_LIMIT = 200_000  # listed objects
DRIVER_PLAN_OUTPUT_BYTES = 64 << 20  # Parquet bytes of output (a few hundred thousand rows)
KEY_COLUMNS = ["video_uri", "etag"]


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


def object_progress(keys: pa.Table, retry_errors: bool) -> dict[tuple[str, str], tuple[set[str], set[str], int]]:
    """Per listed object (its uri: the row's shard, else its video; its etag), from part keys on the
    driver: (the row keys that are final, the row keys that are only transient errors, the rows the
    object makes). With `retry_errors` off every row is final."""
    out: dict[tuple[str, str], tuple[set[str], set[str], int]] = {}
    columns = (
        keys.column(c).to_pylist()
        for c in ("video_uri", "etag", "clip_start_s", "shard_uri", "object_rows", "transient")
    )
    for uri, etag, start, shard, total, transient in zip(*columns):
        final, retry, most = out.get((shard or uri, etag), (set(), set(), 0))
        (retry if transient and retry_errors else final).add(row_key(uri, start))
        out[(shard or uri, etag)] = (final, retry, max(most, total))
    return out


def is_whole(final: set[str], total: int) -> bool:
    """An object whose rows are all in the output (and final)."""
    return total > 0 and len(final) >= total


def plan_on_driver(
    objects: list[VideoObject], store: OutputStore, retry_errors: bool, parts: list[str] | None = None
) -> Plan:
    """`parts`: the output's parts if the caller listed them already. An object partly in the output
    (a crash mid-shard, errors to retry) is planned with the keys of its final rows to skip."""
    tables = [store.read_keys(p) for p in (store.parts() if parts is None else parts)]
    keys = pa.concat_tables(tables) if tables else PART_KEYS_SCHEMA.empty_table()
    progress = object_progress(keys, retry_errors)
    todo, to_retry = [], 0
    for o in objects:
        final, retry, total = progress.get((o.uri, o.etag), (set(), set(), 0))
        if is_whole(final, total):
            continue
        to_retry += bool(retry - final)
        todo.append(replace(o, skip=tuple(sorted(final))) if final else o)
    return Plan(
        listed=len(objects),
        already_done=len(objects) - len(todo),
        to_caption=len(todo),
        to_retry=to_retry,
        todo=todo,
    )


def unique_keys(inputs, partitions: int):
    """A manifest's rows, one per (video_uri, etag): a key listed twice is captioned once."""
    from ray.data.aggregate import Max

    grouped = inputs.groupby(list(KEY_COLUMNS), num_partitions=partitions).aggregate(Max("size", alias_name="size"))
    return grouped.select_columns(LISTING_SCHEMA.names)


def _keys_where(table: pa.Table, final: bool, retry_errors: bool) -> pa.Table:
    """The (uri, etag) columns of the rows that are final (or, final=False, transient errors)."""
    import pyarrow.compute as pc

    transient = table.column("transient")
    if final:
        mask = pc.invert(transient) if retry_errors else pa.array([True] * table.num_rows, pa.bool_())
    else:
        mask = transient
    return table.filter(mask).select(KEY_COLUMNS)


def _one_row_objects(table: pa.Table) -> pa.Table:
    """Part keys of objects that make one row (a video, whole): planned by key, as they always were."""
    import pyarrow.compute as pc

    one = pc.and_(pc.equal(table.column("shard_uri"), ""), pc.equal(table.column("object_rows"), 1))
    return table.filter(one)


def _several_row_objects(table: pa.Table) -> pa.Table:
    """Part keys of the rows of objects that make several (shards, windows), by object: video_uri
    is the object's uri."""
    import pyarrow.compute as pc

    shard = table.column("shard_uri")
    several = table.filter(pc.invert(pc.and_(pc.equal(shard, ""), pc.equal(table.column("object_rows"), 1))))
    shard = several.column("shard_uri")
    objects = pc.if_else(pc.not_equal(shard, ""), shard, several.column("video_uri"))
    keys = [
        row_key(u, t)
        for u, t in zip(several.column("video_uri").to_pylist(), several.column("clip_start_s").to_pylist())
    ]
    return pa.table(
        {
            "video_uri": objects,
            "etag": several.column("etag"),
            "key": pa.array(keys, pa.string()),
            "object_rows": several.column("object_rows"),
            "transient": several.column("transient"),
        }
    )


STATE_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),
        ("etag", pa.string()),
        ("whole", pa.bool_()),
        ("skip", pa.list_(pa.string())),
        ("retry", pa.bool_()),
    ]
)


def _object_state(group: pa.Table, retry_errors: bool) -> pa.Table:
    """One object's rows (a group of `_several_row_objects`) -> whether it is whole, its final row
    keys to skip, whether some of its rows are only transient errors."""
    final, retry = set(), set()
    for key, transient in zip(group.column("key").to_pylist(), group.column("transient").to_pylist()):
        (retry if transient and retry_errors else final).add(key)
    whole = is_whole(final, max(group.column("object_rows").to_pylist()))
    return pa.table(
        {
            "video_uri": group.column("video_uri").slice(0, 1),
            "etag": group.column("etag").slice(0, 1),
            "whole": [whole],
            "skip": [[] if whole else sorted(final)],
            "retry": [bool(retry - final)],
        },
        schema=STATE_SCHEMA,
    )


def _output_keys(store: OutputStore, parts: list[str]):
    """The output's keys (PART_KEYS_SCHEMA) as a Dataset: each part read by a task."""
    import ray.data

    keys = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=min(len(parts), 1024))
    return keys.map_batches(
        lambda batch: pa.concat_tables([store.read_keys(p) for p in batch.column("path").to_pylist()]),
        batch_format="pyarrow",
        batch_size=1,
    )


def _with_columns(ds, schema: pa.Schema):
    """The dataset with `schema`'s columns in every block: an empty block of a join or a group may
    have none, and a join needs its keys in every block."""
    return ds.map_batches(lambda t: t if t.num_columns else schema.empty_table(), batch_format="pyarrow")


def _not_whole(table: pa.Table) -> pa.Table:
    """Planned objects joined with their states, less the whole ones; `skip` kept, `whole` dropped."""
    import pyarrow.compute as pc

    whole = pc.fill_null(table.column("whole"), False)
    table = table.filter(pc.invert(whole))
    return table.drop_columns(["whole"])


def plan_with_ray(
    inputs, store: OutputStore, retry_errors: bool, partitions: int = 0, parts: list[str] | None = None
) -> Plan:
    """The plan as a Ray Data job. `inputs`: a Dataset of video_uri, etag, size; `parts`: the output's
    parts if the caller listed them already. Objects of one row (the many) are left out by a
    hash-partitioned anti-join on their keys; the rows of objects that make several are grouped by
    object, and the plan joined with their states: a whole one left out, one partly there given the
    keys of its final rows to skip (a `skip` column)."""
    parts = store.parts() if parts is None else parts
    partitions = partitions or max(2, min(256, len(parts) // 4 + 2))
    inputs = inputs.materialize()  # computed once: joined, then counted
    if not parts:
        listed = inputs.count()
        return Plan(listed, 0, listed, 0, inputs)
    on = tuple(KEY_COLUMNS)
    keys = _output_keys(store, parts).materialize()  # read once, filtered several ways
    one = keys.map_batches(_one_row_objects, batch_format="pyarrow")
    # map_batches, not filter: an empty result keeps its columns (the join needs them in every block)
    final = one.map_batches(
        lambda t: _keys_where(t, final=True, retry_errors=retry_errors), batch_format="pyarrow"
    ).materialize()  # counted, then joined
    # a join whose one side is empty fails in Ray Data (its reduce sees no columns): joined only with rows
    todo = inputs.join(final, join_type="left_anti", num_partitions=partitions, on=on) if final.count() else inputs
    several = keys.map_batches(_several_row_objects, batch_format="pyarrow").materialize()
    to_retry = 0
    if several.count():
        states = several.groupby(list(KEY_COLUMNS)).map_groups(
            _object_state, fn_kwargs={"retry_errors": retry_errors}, batch_format="pyarrow"
        )
        states = _with_columns(states, STATE_SCHEMA)
        todo = _with_columns(todo, LISTING_SCHEMA)
        todo = todo.join(states, join_type="left_outer", num_partitions=partitions, on=on)
        todo = todo.map_batches(_not_whole, batch_format="pyarrow").materialize()
        if retry_errors:
            to_retry += todo.filter(lambda r: bool(r["retry"])).count()
    todo = todo.materialize()
    if retry_errors:
        transient = one.map_batches(
            lambda t: _keys_where(t, final=False, retry_errors=True), batch_format="pyarrow"
        ).materialize()
        if transient.count():
            to_retry += todo.join(transient, join_type="left_semi", num_partitions=partitions, on=on).count()
    listed, to_caption = inputs.count(), todo.count()
    return Plan(listed, listed - to_caption, to_caption, to_retry, todo)


def make_plan(config, settings: S3Settings, objects: list[VideoObject] | None = None) -> Plan:
    """The plan for a config: from its manifest (always a Ray Data plan) or a listing."""
    import ray.data

    store = OutputStore(config.output, settings)
    listing = store.part_sizes()  # the output first: a run that cannot read or write it stops here
    parts, output_bytes = [path for path, _ in listing], sum(size for _, size in listing)
    if not config.dry_run:
        store.check_writable()
    if config.manifest:
        # Shuffle partitions: one per ~32 MB of manifest (a million keys is ~40 MB of Parquet).
        partitions = max(2, min(256, manifest_bytes(config.manifest, settings) // (32 << 20) + 2))
        inputs = unique_keys(read_manifest(config.manifest, config.include, settings), partitions)
        return plan_with_ray(inputs, store, config.retry_errors, parts=parts)
    if objects is None:
        objects = list_input(config.input, config.include, settings, DRIVER_PLAN_LIMIT)
    if not isinstance(objects, list):
        return plan_with_ray(objects, store, config.retry_errors, parts=parts)
    if len(objects) <= DRIVER_PLAN_LIMIT and output_bytes <= DRIVER_PLAN_OUTPUT_BYTES:
        return plan_on_driver(objects, store, config.retry_errors, parts=parts)
    return plan_with_ray(ray.data.from_arrow(listing_table(objects)), store, config.retry_errors, parts=parts)
