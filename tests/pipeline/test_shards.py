"""WebDataset shards: a .tar object is read as a stream, member by member; each video member is a
row (`<shard>#<member>`, the shard's ETag, the sample's .json as `source_meta`), sidecars get none,
a bad member gets an error row, a shard that breaks gets one error row after the members before
it. Through the Ray Data job on S3: one row per video member, captions equal decoding the member
alone, and a rerun writes nothing."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from demo.world import encode_mp4, render, scene_for_seed
from pipeline.decode import Sampling, decode_rows
from pipeline.plan import plan_on_driver
from pipeline.run import run_job
from pipeline.storage import OutputStore, S3Settings, VideoObject, row_key
from tests.pipeline.common import config_for, direct_caption, new_bucket, read_output, s3_client


def make_shard(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def clip(seed: int) -> bytes:
    return encode_mp4(render(scene_for_seed(seed)))


META = {"000000": {"url": "https://example.com/a", "caption": "alt text"}, "000002": {"key": "000002", "n": 2}}


def sample_members() -> list[tuple[str, bytes]]:
    """Three samples with a video each (json sidecars for two, a txt for one), a corrupt video, a
    text file named like a video, and a lone sidecar."""
    return [
        ("000000.json", json.dumps(META["000000"]).encode()),
        ("000000.mp4", clip(0)),
        ("000001.mp4", clip(1)),
        ("000001.txt", b"a caption from the crawl"),
        ("000002.mp4", clip(2)),
        ("000002.json", json.dumps(META["000002"]).encode()),  # after its video: still its sidecar
        ("000003.mp4", clip(3)[:300]),  # cut short: not decodable
        ("000004.mp4", b"this is a text file, not a video"),
        ("000005.cls", b"7"),
    ]


def truncated(members: list[tuple[str, bytes]], inside: str) -> bytes:
    """The shard's bytes cut in the middle of member `inside`'s data."""
    data = make_shard(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember(inside)
    return data[: member.offset_data + member.size // 2]


def _rows(path, skip=()) -> list[dict]:
    row = {"video_uri": str(path), "etag": "e1", "size": path.stat().st_size, "skip": list(skip)}
    return list(decode_rows([row], S3Settings(), Sampling(num_frames=4)))


def test_a_shard_gives_a_row_per_video_member(tmp_path):
    path = tmp_path / "00007.tar"
    path.write_bytes(make_shard(sample_members()))
    rows = _rows(path)
    names = [r["video_uri"].rsplit("#", 1)[1] for r in rows]
    assert names == ["000000.mp4", "000001.mp4", "000002.mp4", "000003.mp4", "000004.mp4"]
    assert all(
        r["video_uri"] == f"{path}#{n}" and r["shard_uri"] == str(path) and r["etag"] == "e1"
        for r, n in zip(rows, names)
    )
    assert [bool(r["error"]) for r in rows] == [False, False, False, True, True]
    assert "not a readable video" in rows[4]["error"] and all(r["error_kind"] == "permanent" for r in rows[3:])
    assert json.loads(rows[0]["source_meta"]) == META["000000"] and rows[1]["source_meta"] == ""
    assert json.loads(rows[2]["source_meta"]) == META["000002"]
    assert [r["size"] for r in rows[:3]] == [len(clip(s)) for s in range(3)]
    assert [r["object_rows"] for r in rows] == [0, 0, 0, 0, 5]  # the last row says how many the shard made
    # A member decodes as the same video on its own.
    alone = decode_rows([{"video_uri": _file(tmp_path, clip(1)), "etag": "x", "size": 0}], S3Settings(), Sampling(4))
    assert next(alone)["frames"] == rows[1]["frames"]


def _file(tmp_path, data: bytes) -> str:
    path = tmp_path / "alone.mp4"
    path.write_bytes(data)
    return str(path)


def test_a_truncated_shard_keeps_the_members_before_the_break(tmp_path):
    path = tmp_path / "broken.tar"
    path.write_bytes(truncated(sample_members(), inside="000002.mp4"))
    rows = _rows(path)
    assert [r["video_uri"] for r in rows] == [f"{path}#000000.mp4", f"{path}#000001.mp4", str(path)]
    assert not rows[0]["error"] and not rows[1]["error"]
    error = rows[2]["error"]
    assert "not a readable tar archive" in error and "'000002.mp4'" in error and "byte" in error
    assert rows[2]["error_kind"] == "permanent" and rows[2]["shard_uri"] == str(path) and rows[2]["object_rows"] == 3


def test_a_tar_that_is_no_archive_is_one_error_row(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"\x07" * 5000)
    (row,) = _rows(path)
    assert row["video_uri"] == str(path) and "not a readable tar archive" in row["error"] and row["object_rows"] == 1
    path.write_bytes(make_shard([("a.json", b"{}"), ("a.txt", b"x")]))
    (row,) = _rows(path)
    assert "holds no member matching" in row["error"] and row["object_rows"] == 1


def test_a_partly_written_shard_decodes_only_its_missing_members(tmp_path, monkeypatch):
    from pipeline import decode

    path = tmp_path / "00007.tar"
    path.write_bytes(make_shard(sample_members()))
    done = [row_key(f"{path}#000000.mp4", 0.0), row_key(f"{path}#000003.mp4", 0.0)]
    decoded = []
    real = decode.decode_clips
    monkeypatch.setattr(decode, "decode_clips", lambda *a, **k: decoded.append(1) or real(*a, **k))
    rows = _rows(path, skip=done)
    assert len(decoded) == 3  # the written members are not decoded again
    assert [r["video_uri"].rsplit("#", 1)[1] for r in rows] == ["000001.mp4", "000002.mp4", "000004.mp4"]
    assert rows[-1]["object_rows"] == 5


def test_the_plan_tells_a_whole_shard_from_a_partly_written_one(tmp_path):
    """A crash after some of a shard's rows were written: the rerun plans the shard again with those
    rows to skip; once the last row (with object_rows) and all others are there, it is done."""
    path = tmp_path / "00007.tar"
    path.write_bytes(make_shard(sample_members()))
    rows = [
        dict(
            r,
            caption="c",
            num_tokens=1,
            acceptance_length=1.0,
            generate_s=0.0,
            model="m",
            drafter="",
            worker_node="n",
            finished_at=None,
        )
        for r in _rows(path)
    ]
    store = OutputStore(str(tmp_path / "out"), S3Settings())
    shard = VideoObject(str(path), path.stat().st_size, "e1")
    from datetime import UTC, datetime

    for r in rows:
        r["finished_at"] = datetime.now(UTC)
    store.write_part(rows[:2], "part-a.parquet")
    plan = plan_on_driver([shard], store, retry_errors=False)
    assert plan.to_caption == 1 and set(plan.todo[0].skip) == {row_key(r["video_uri"], 0.0) for r in rows[:2]}
    store.write_part(rows[2:], "part-b.parquet")
    assert plan_on_driver([shard], store, retry_errors=False).to_caption == 0
    changed = VideoObject(shard.uri, shard.size, "e2")  # a new ETag: the shard is captioned again
    assert plan_on_driver([changed], store, retry_errors=False).to_caption == 1


def test_shards_on_s3_through_the_ray_job(s3_server, ray_local, pipeline_models):
    bucket = new_bucket(s3_server)
    s3 = s3_client(s3_server)
    s3.put_object(Bucket=bucket, Key="clips/shard-00000.tar", Body=make_shard(sample_members()))
    broken = [("000010.mp4", clip(10)), ("000010.json", b'{"k": 10}'), ("000011.mp4", clip(11))]
    s3.put_object(Bucket=bucket, Key="clips/shard-00001.tar", Body=truncated(broken, inside="000011.mp4"))
    s3.put_object(Bucket=bucket, Key="clips/loose.mp4", Body=clip(20))
    config = config_for(s3_server, bucket, pipeline_models, use_drafter=False)
    report = run_job(config)
    rows, _ = read_output(s3_server, bucket)
    by_uri = {r["video_uri"]: r for r in rows}
    first, second = f"s3://{bucket}/clips/shard-00000.tar", f"s3://{bucket}/clips/shard-00001.tar"
    members = [f"{first}#00000{i}.mp4" for i in range(5)]
    assert sorted(by_uri) == sorted(members + [f"{second}#000010.mp4", second, f"s3://{bucket}/clips/loose.mp4"])
    assert len(rows) == len(by_uri) == report["rows_written"] == 8
    etags = {o["Key"]: o["ETag"].strip('"') for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {by_uri[m]["etag"] for m in members} == {etags["clips/shard-00000.tar"]}
    assert json.loads(by_uri[members[0]]["source_meta"]) == META["000000"] and by_uri[members[1]]["source_meta"] == ""
    assert json.loads(by_uri[f"{second}#000010.mp4"]["source_meta"]) == {"k": 10}
    assert [bool(by_uri[m]["error"]) for m in members] == [False, False, False, True, True]
    assert "not a readable tar archive" in by_uri[second]["error"]
    target = pipeline_models["target"]
    for uri, seed in [(members[0], 0), (members[2], 2), (f"{second}#000010.mp4", 10)]:
        assert by_uri[uri]["caption"] == direct_caption(target, clip(seed)), uri
    again = run_job(config)
    assert again["rows_written"] == 0 and again["listed"] == 3 and again["already_done"] == 3
    assert len(read_output(s3_server, bucket)[0]) == 8

    # In 1 s windows: two rows a 2 s clip, members of shards alike; a rerun writes nothing.
    windowed = config.model_copy(update={"output": f"s3://{bucket}/windows/", "window_s": 1.0})
    assert run_job(windowed)["rows_written"] == 2 * 5 + 2 + 1  # 5 clips, 2 bad members, 1 broken shard
    rows, _ = read_output(s3_server, bucket, "windows/")
    first_member = sorted((r["clip_start_s"], r["clip_end_s"]) for r in rows if r["video_uri"] == members[0])
    assert first_member == [(0.0, 1.0), (1.0, 2.0)]
    assert run_job(windowed)["rows_written"] == 0


@pytest.mark.parametrize("name", ["a.TAR", "b.tar"])
def test_a_listing_keeps_shards_whatever_include_says(tmp_path, name):
    from pipeline.inputs import list_videos

    (tmp_path / name).write_bytes(make_shard([("x.mp4", b"")]))
    (tmp_path / "c.txt").write_text("no")
    assert [o.uri for o in list_videos(str(tmp_path), ("*.mp4",), S3Settings())] == [str(tmp_path / name)]


def test_a_shard_on_s3_is_read_in_ranged_blocks(s3_server, tmp_path, monkeypatch):
    """A shard is streamed: every read is a ranged GET of at most a block, never the whole object,
    and its rows are those of the same shard read from disk."""
    from pipeline import storage

    data = make_shard(sample_members())
    block = 16 << 10
    monkeypatch.setattr(storage, "STREAM_BLOCK", block)
    bucket, settings = new_bucket(s3_server), S3Settings(endpoint=s3_server)
    s3_client(s3_server).put_object(Bucket=bucket, Key="s.tar", Body=data)
    ranges: list[tuple] = []
    real = storage._get

    def counted(uri, s, first=None, last=None):
        ranges.append((first, last))
        return real(uri, s, first, last)

    monkeypatch.setattr(storage, "_get", counted)
    row = {"video_uri": f"s3://{bucket}/s.tar", "etag": "e1", "size": len(data)}
    streamed = list(decode_rows([row], settings, Sampling(num_frames=4)))
    assert len(ranges) > 1 and all(first is not None and last - first < block for first, last in ranges)
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    local = _rows(path)
    drop = ("video_uri", "shard_uri", "decode_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in streamed] == [
        {k: v for k, v in r.items() if k not in drop} for r in local
    ]


def test_the_writer_tells_a_whole_shard_and_forgets_its_keys(tmp_path):
    from pipeline.run import PartWriter

    writer = PartWriter(OutputStore(str(tmp_path / "out"), S3Settings()), "r", flush_rows=100, flush_seconds=60)
    shard = VideoObject("s3://b/s.tar", 10, "e")
    rows = [
        dict(
            video_uri=f"{shard.uri}#{i}.mp4",
            etag="e",
            size=1,
            shard_uri=shard.uri,
            object_rows=3 if i == 1 else 0,
            caption="c",
            num_tokens=1,
            acceptance_length=1.0,
            decode_s=0.0,
            generate_s=0.0,
            model="m",
            drafter="",
            error="",
            error_kind="",
            worker_node="n",
            finished_at=None,
        )  # fmt: skip
        for i in range(3)
    ]
    writer.add([rows[1], rows[0]])  # the count arrives first, out of order
    assert not writer.whole(shard) and len(writer.objects[(shard.uri, "e")].keys) == 2
    assert writer.whole(VideoObject(shard.uri, 10, "e", skip=(row_key(rows[2]["video_uri"], 0.0),)))
    writer.add([rows[2], rows[2]])
    assert writer.whole(shard) and writer.objects == {} and writer.duplicates_dropped == 1
