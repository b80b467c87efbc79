"""What a run captions: the objects to caption (a listing or a manifest) less the keys the output
already holds, keyed by (video_uri, etag). Storage (pipeline/storage.py) says what is there; this
module composes it: done keys, the anti-join, the counts.

A key is done when the output has a row for it that is final: a caption, or an error that is not
`transient`. With `retry_errors`, keys whose rows are all transient errors are planned again; the
newest row per key is the current one (the retry's row is newer). Outputs written before the
`error_kind` column existed count every row as final.

Small plans (at most 200,000 listed objects and 64 MB of output) are made on the driver. Larger
ones are a Ray Data job: the listing is a Dataset written by listing tasks, the output's key columns
are read by tasks, part by part, and joined against the input (a hash-partitioned left anti-join),
so no set of keys is ever held on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipeline.inputs import LISTING_SCHEMA, list_input, listing_table, manifest_bytes, read_manifest
from pipeline.storage import PART_KEYS_SCHEMA, OutputStore, S3Settings, VideoObject

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
    tables = [store.read_keys(p) for p in (store.parts() if parts is None else parts)]
    keys = pa.concat_tables(tables) if tables else PART_KEYS_SCHEMA.empty_table()
    done, retry = _split_done(keys, retry_errors)
    todo = [o for o in objects if (o.uri, o.etag) not in done]
    return Plan(
        listed=len(objects),
        already_done=len(objects) - len(todo),
        to_caption=len(todo),
        to_retry=sum((o.uri, o.etag) in retry for o in todo),
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


def _output_keys(store: OutputStore, parts: list[str]):
    """The output's keys (PART_KEYS_SCHEMA) as a Dataset: each part read by a task."""
    import ray.data

    keys = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=min(len(parts), 1024))
    return keys.map_batches(
        lambda batch: pa.concat_tables([store.read_keys(p) for p in batch.column("path").to_pylist()]),
        batch_format="pyarrow",
        batch_size=1,
    )


def plan_with_ray(
    inputs, store: OutputStore, retry_errors: bool, partitions: int = 0, parts: list[str] | None = None
) -> Plan:
    """The plan as a Ray Data job. `inputs`: a Dataset of video_uri, etag, size; `parts`: the output's
    parts if the caller listed them already."""
    parts = store.parts() if parts is None else parts
    partitions = partitions or max(2, min(256, len(parts) // 4 + 2))
    inputs = inputs.materialize()  # computed once: joined, then counted
    if parts:
        keys = _output_keys(store, parts)
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
