"""Planning: what a run captions, from a listing or a manifest, against what the output holds, keyed
by (uri, etag), on the driver for small plans and as a Ray Data join for large ones (the same plan);
transient errors are planned again only with --retry-errors; old outputs count as done. A large
listing (sub-prefixes, a flat prefix, a local folder) is listed by Ray tasks, never whole on the
driver; `include` filters a manifest's rows as it filters a listing."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from pipeline.config import VIDEO_PATTERNS, load_config
from pipeline.inputs import list_videos, read_manifest
from pipeline.plan import make_plan, plan_on_driver, plan_with_ray
from pipeline.storage import OUTPUT_SCHEMA, OutputStore, S3Settings, VideoObject, row_key


def _row(uri: str, etag: str, error: str = "", kind: str | None = None, **clip) -> dict:
    return {
        "video_uri": uri,
        "etag": etag,
        "size": 1,
        **clip,
        "caption": "" if error else "a caption",
        "num_tokens": 3,
        "acceptance_length": 1.0,
        "decode_s": 0.0,
        "generate_s": 0.0,
        "model": "m",
        "drafter": "",
        "error": error,
        "error_kind": kind if kind is not None else ("permanent" if error else ""),
        "worker_node": "n",
        "finished_at": datetime.now(UTC),
    }


@pytest.fixture
def world(tmp_path):
    """20 objects; the output holds: 0-5 captioned, 6 a permanent error, 7-8 transient errors, 9 a
    transient error then a caption, 10 captioned at an older etag, and a part written before
    error_kind and the clip columns existed (11, an error: final), plus a key no longer listed."""
    objects = [VideoObject(f"s3://b/v{i:02d}.mp4", 1, f"e{i}") for i in range(20)]
    out = tmp_path / "out"
    store = OutputStore(str(out), S3Settings())
    rows = [_row(o.uri, o.etag) for o in objects[:6]]
    rows += [_row(objects[6].uri, "e6", "decode failed: corrupt")]
    rows += [_row(objects[i].uri, f"e{i}", "decode failed: SlowDown", "transient") for i in (7, 8, 9)]
    rows += [_row(objects[9].uri, "e9"), _row(objects[10].uri, "old-etag"), _row("s3://b/gone.mp4", "x")]
    store.write_part(rows, "part-a.parquet")
    legacy = pa.Table.from_pylist([_row(objects[11].uri, "e11", "decode failed: x")], schema=OUTPUT_SCHEMA)
    newer = ["error_kind", "clip_start_s", "clip_end_s", "shard_uri", "source_meta", "object_rows"]
    pq.write_table(legacy.drop(newer), out / "part-legacy.parquet")
    return objects, store


def test_driver_plan(world):
    objects, store = world
    legacy = [r for r in store.read_table().to_pylist() if r["video_uri"] == objects[11].uri]
    assert [(r["clip_start_s"], r["shard_uri"], r["source_meta"], r["object_rows"]) for r in legacy] == [
        (0.0, "", "", 1)
    ]
    plan = plan_on_driver(objects, store, retry_errors=False)
    assert plan.summary() == {"listed": 20, "already_done": 11, "to_caption": 9, "to_retry": 0}
    assert sorted(o.uri[-7:-4] for o in plan.todo) == [f"v{i}" for i in (10, 12, 13, 14, 15, 16, 17, 18, 19)]
    retry = plan_on_driver(objects, store, retry_errors=True)
    assert retry.summary() == {"listed": 20, "already_done": 9, "to_caption": 11, "to_retry": 2}  # 7 and 8


@pytest.fixture
def shard_world(tmp_path):
    """Objects that make several rows. Shards: s0 whole (its last row says 3), s1 partly written (a
    crash after 2 members), s2 a member and then a transient failure of the shard (whole, unless
    retrying errors), s3 not started; a video in windows with 2 of its 3 windows written."""
    shards = [f"s3://b/s{i}.tar" for i in range(4)]
    objects = [VideoObject(uri, 1, f"e{i}") for i, uri in enumerate(shards)] + [VideoObject("s3://b/long.mp4", 1, "el")]
    s0, s1, s2, _ = shards
    rows = [_row(f"{s0}#m{j}.mp4", "e0", shard_uri=s0, object_rows=3 if j == 2 else 0) for j in range(3)]
    rows += [_row(f"{s1}#m{j}.mp4", "e1", shard_uri=s1, object_rows=0) for j in range(2)]
    rows += [_row(f"{s2}#m0.mp4", "e2", shard_uri=s2, object_rows=0)]
    rows += [_row(s2, "e2", "decode failed: SlowDown", "transient", shard_uri=s2, object_rows=2)]
    rows += [_row("s3://b/long.mp4", "el", clip_start_s=t, clip_end_s=t + 2, object_rows=3) for t in (0.0, 2.0)]
    store = OutputStore(str(tmp_path / "shard-out"), S3Settings())
    store.write_part(rows, "part-a.parquet")
    return objects, store


def test_driver_plan_of_objects_that_make_several_rows(shard_world):
    objects, store = shard_world
    plan = plan_on_driver(objects, store, retry_errors=False)
    assert plan.summary() == {"listed": 5, "already_done": 2, "to_caption": 3, "to_retry": 0}
    skips = {o.uri: o.skip for o in plan.todo}
    assert skips == {
        "s3://b/s1.tar": (row_key("s3://b/s1.tar#m0.mp4", 0), row_key("s3://b/s1.tar#m1.mp4", 0)),
        "s3://b/s3.tar": (),
        "s3://b/long.mp4": (row_key("s3://b/long.mp4", 0.0), row_key("s3://b/long.mp4", 2.0)),
    }
    retry = plan_on_driver(objects, store, retry_errors=True)
    assert retry.summary() == {"listed": 5, "already_done": 1, "to_caption": 4, "to_retry": 1}
    assert {o.uri: o.skip for o in retry.todo}["s3://b/s2.tar"] == (row_key("s3://b/s2.tar#m0.mp4", 0),)


# shards and windows: the Ray plan's object grouping runs only past 200,000 objects (and takes 45 s here)
# 37 s and 45 s: the Ray Data plan runs by default in test_include_applies_to_manifest_rows
@pytest.mark.parametrize("fixture", [pytest.param(f, marks=pytest.mark.slow) for f in ("world", "shard_world")])
def test_ray_plan_equals_the_driver_plan(ray_local, fixture, request):
    import ray.data

    objects, store = request.getfixturevalue(fixture)
    items = ray.data.from_items([{"video_uri": o.uri, "etag": o.etag, "size": o.size} for o in objects])
    for retry_errors in (False, True):
        driver = plan_on_driver(objects, store, retry_errors)
        ray_plan = plan_with_ray(items, store, retry_errors, partitions=3)
        assert ray_plan.summary() == driver.summary()
        got = sorted((r["video_uri"], r["etag"], tuple(r.get("skip") or ())) for r in ray_plan.todo.take_all())
        assert got == sorted((o.uri, o.etag, o.skip) for o in driver.todo)


@pytest.mark.slow  # 34 s; a manifest's plan runs in test_include_applies_to_manifest_rows
def test_manifests_in_every_layout(ray_local, world, tmp_path):
    objects, store = world
    table = pa.table(
        {"video_uri": [o.uri for o in objects], "etag": [o.etag for o in objects], "size": [o.size for o in objects]}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    pcsv.write_csv(table, tmp_path / "m.csv")
    listed = objects + objects[12:15] + objects[:2]  # a key listed twice is planned once
    others = ["notes.txt", "clips/", "clips/v99.MP4.json"]  # an S3 Inventory lists every object: not planned
    inventory = pa.table(
        {
            "bucket": ["b"] * (len(listed) + len(others)),
            "key": [o.uri.removeprefix("s3://b/") for o in listed] + others,
            "size": [1] * (len(listed) + len(others)),
            "e_tag": [f'"{o.etag}"' for o in listed] + ['"x"'] * len(others),
        }
    )
    pq.write_table(inventory, tmp_path / "inventory.parquet")
    want = plan_on_driver(objects, store, retry_errors=False).summary()
    for manifest in ("m.parquet", "m.csv", "inventory.parquet"):
        rows = read_manifest(str(tmp_path / manifest), VIDEO_PATTERNS, S3Settings()).take_all()
        assert sorted({(r["video_uri"], r["etag"]) for r in rows}) == sorted((o.uri, o.etag) for o in objects)
    config = load_config(
        manifest=str(tmp_path / "inventory.parquet"), output=store.uri, model="models/demo-target", dry_run=True
    )
    plan = make_plan(config, S3Settings())
    assert plan.summary() == want
    todo = sorted((r["video_uri"], r["etag"]) for r in plan.todo.take_all())
    assert todo == sorted((o.uri, o.etag) for o in plan_on_driver(objects, store, retry_errors=False).todo)


@pytest.mark.slow  # 34 s; the plan it prints is tested above
def test_dry_run_prints_the_plan_and_loads_no_model(ray_local, world, tmp_path, capsys):
    from jobs.caption_videos import main

    objects, store = world
    pq.write_table(
        pa.table({"video_uri": [o.uri for o in objects], "etag": [o.etag for o in objects]}), tmp_path / "m.parquet"
    )
    # A model path that does not hold a model: a dry run never loads one.
    assert (
        main(
            [
                "--manifest",
                str(tmp_path / "m.parquet"),
                "--output",
                store.uri,
                "--model",
                "models/demo-target",
                "--dry-run",
                "--retry-errors",
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"listed": 20, "already_done": 9, "to_caption": 11, "to_retry": 2}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-a.parquet", "part-legacy.parquet"]


def test_the_writers_key_set_is_a_set(monkeypatch):
    from pipeline.run import KeySet

    monkeypatch.setattr(KeySet, "MERGE_AT", 7)
    keys, added = KeySet(), set()
    for i in range(100):
        key = (f"s3://b/{i % 61}.mp4", f"e{i % 3 == 0}")
        assert keys.add(key) == (key not in added)
        added.add(key)
    assert len(keys) == len(added)
    assert all(k in keys for k in added) and ("s3://b/0.mp4", "other") not in keys
    # A digest that ends in zero bytes (1 key in 256) is found once merged into the sorted array.
    zero = next(k for k in ((f"s3://b/z{i}.mp4", "e") for i in range(100_000)) if KeySet.digest(k)[-1] == 0)
    assert keys.add(zero) and not keys.add(zero)
    for i in range(10):
        keys.add((f"s3://b/after{i}.mp4", "e"))
    # Merged: its digest left the recent set, so the lookup below goes through the sorted array.
    assert KeySet.digest(zero) not in keys._recent and zero in keys and not keys.add(zero)


def test_listing_fans_out_over_prefixes_and_finds_what_a_sequential_listing_finds(
    ray_local, s3_server, tmp_path, monkeypatch
):
    import pipeline.plan
    from pipeline.inputs import list_input, listing_shards
    from tests.pipeline.common import new_bucket, s3_client

    bucket, s3 = new_bucket(s3_server), s3_client(s3_server)
    keys = ["v/top.mp4", "v/a/1.mp4", "v/a/x/2.MP4", "v/a/x/y/z/3.mp4", "v/b/4.mp4", "v/b/notes.txt", "vx/5.mp4"]
    keys += [f"v/c/{i:02d}.mp4" for i in range(12)]
    for k in keys:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    settings, patterns = S3Settings(endpoint=s3_server), ("*.mp4",)
    found, shards = listing_shards(f"s3://{bucket}/v/", patterns, settings, limit=1000, width=2)
    assert [o.uri.rsplit("/", 1)[1] for o in found] == ["top.mp4"]
    assert shards == [f"s3://{bucket}/v/{p}/" for p in ("a", "b", "c")]
    for uri in (f"s3://{bucket}/v/", f"s3://{bucket}/v", f"s3://{bucket}"):
        want = [(o.uri, o.etag, o.size) for o in list_videos(uri, patterns, settings)]
        listed = list_input(uri, patterns, settings, limit=4)  # beyond the limit the listing stays a Dataset
        got = sorted((r["video_uri"], r["etag"], r["size"]) for r in listed.take_all())
        assert got == want and len(want) > 4, uri
    config = load_config(
        input=f"s3://{bucket}", output=str(tmp_path / "out"), model="models/demo-target", s3_endpoint=s3_server
    )
    monkeypatch.setattr(pipeline.plan, "DRIVER_PLAN_LIMIT", 4)
    plan = make_plan(config.model_copy(update={"dry_run": True}), settings)
    assert plan.summary() == {"listed": 18, "already_done": 0, "to_caption": 18, "to_retry": 0}
    listed = list_input(f"s3://{bucket}/v/", patterns, settings, limit=1000)
    assert listed == list_videos(f"s3://{bucket}/v/", patterns, settings)  # small: a list, as before


def _dry_plan(monkeypatch, limit: int, **config):
    """make_plan of a dry run, with DRIVER_PLAN_LIMIT set to `limit`."""
    import pipeline.plan

    monkeypatch.setattr(pipeline.plan, "DRIVER_PLAN_LIMIT", limit)
    config = load_config(model="models/demo-target", dry_run=True, **config)
    return make_plan(config, S3Settings(endpoint=config.s3_endpoint))


def _keys(dataset) -> list[tuple[str, str]]:
    return sorted((r["video_uri"], r["etag"]) for r in dataset.take_all())


def test_a_flat_prefix_beyond_the_limit_is_listed_past_the_driver(ray_local, s3_server, tmp_path, monkeypatch):
    """Beyond DRIVER_PLAN_LIMIT a flat prefix (no sub-prefix to fan out over) is listed by a Ray task,
    a page at a time: the driver itself receives at most the limit and one page of keys."""
    import pipeline.inputs
    import pipeline.storage
    from tests.pipeline.common import new_bucket, s3_client

    bucket, s3 = new_bucket(s3_server), s3_client(s3_server)
    for key in [f"flat/{i:02d}.mp4" for i in range(30)] + ["flat/notes.txt"]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    settings = S3Settings(endpoint=s3_server)
    monkeypatch.setattr(pipeline.inputs, "LIST_PAGE", 2)  # this process only, not Ray's workers
    received: list[int] = []  # keys in each listing response to this process (the driver)

    def count(parsed, **_):
        received.append(len(parsed.get("Contents", [])))

    client = pipeline.storage.s3_client(settings)  # cached: the client listings use in this process
    client.meta.events.register("after-call.s3.ListObjectsV2", count)
    try:
        plan = _dry_plan(
            monkeypatch, 4, input=f"s3://{bucket}/flat/", output=str(tmp_path / "out"), s3_endpoint=s3_server
        )
    finally:
        client.meta.events.unregister("after-call.s3.ListObjectsV2", count)
    assert plan.summary() == {"listed": 30, "already_done": 0, "to_caption": 30, "to_retry": 0}
    assert _keys(plan.todo) == [(o.uri, o.etag) for o in list_videos(f"s3://{bucket}/flat/", VIDEO_PATTERNS, settings)]
    assert received and max(received) <= 2 and sum(received) <= 4 + 2, received


class _CountingScandir:
    """os.scandir that records the names of the entries read under `root`."""

    def __init__(self, entries, seen: list[str], root: str) -> None:
        self.entries, self.seen, self.root = entries, seen, root

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.entries.close()

    def __iter__(self):
        return self

    def __next__(self):
        entry = next(self.entries)
        if entry.path.startswith(self.root):
            self.seen.append(entry.name)
        return entry

    def close(self) -> None:
        self.entries.close()


def test_a_large_local_folder_is_listed_past_the_driver(ray_local, tmp_path, monkeypatch):
    """Beyond DRIVER_PLAN_LIMIT a local folder is listed by a Ray task on the driver's node, a page at
    a time: the driver itself reads at most the limit and one page of videos' entries."""
    import pipeline.inputs

    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    for i in range(30):
        (folder / ("sub" if i % 3 else "") / f"{i:02d}.mp4").write_bytes(b"x")
    (folder / "notes.txt").write_bytes(b"x")
    want = [(o.uri, o.etag) for o in list_videos(str(folder), VIDEO_PATTERNS, S3Settings())]
    monkeypatch.setattr(pipeline.inputs, "LIST_PAGE", 2)  # this process only, not Ray's workers
    seen: list[str] = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": _CountingScandir(scandir(path), seen, str(folder)))
    plan = _dry_plan(monkeypatch, 4, input=str(folder), output=str(tmp_path / "out"))
    monkeypatch.setattr(os, "scandir", scandir)
    assert plan.summary() == {"listed": 30, "already_done": 0, "to_caption": 30, "to_retry": 0}
    assert _keys(plan.todo) == want and len(want) == 30
    videos = [name for name in seen if name.endswith(".mp4")]
    assert 0 < len(videos) <= 4 + 2, seen


def test_include_applies_to_manifest_rows(ray_local, world, tmp_path):
    """An S3 Inventory lists every object: as in a listing, only names that `include` matches (their
    basename, in any case) are kept. (`test_manifests_in_every_layout` plans such an inventory
    through make_plan: its non-video keys are not planned.)"""
    objects, _ = world
    keys = [o.uri.removeprefix("s3://b/") for o in objects] + ["notes.txt", "clips/", "clips/v99.MP4.json"]
    etags = [o.etag for o in objects] + ["x"] * 3
    inventory = pa.table({"bucket": ["b"] * len(keys), "key": keys, "size": [1] * len(keys), "e_tag": etags})
    pq.write_table(inventory, tmp_path / "inventory.parquet")

    def kept(include: tuple[str, ...]) -> list[tuple[str, str]]:
        rows = read_manifest(str(tmp_path / "inventory.parquet"), include, S3Settings()).take_all()
        return sorted((r["video_uri"], r["etag"]) for r in rows)

    assert kept(VIDEO_PATTERNS) == sorted((o.uri, o.etag) for o in objects)
    assert kept(("*.JSON", "*.txt")) == [("s3://b/clips/v99.MP4.json", "x"), ("s3://b/notes.txt", "x")]
    assert len(kept(("*",))) == len(keys)
