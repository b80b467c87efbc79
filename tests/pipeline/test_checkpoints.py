"""Checkpoints from s3:// (and Hub ids) become local directories, downloaded once per node: a real
S3 server, a real tiny checkpoint, real processes racing for the same cache entry."""

from __future__ import annotations

import multiprocessing
import os
import uuid
from pathlib import Path

import pytest

import pipeline.checkpoints as checkpoints
from pipeline.checkpoints import resolve_checkpoint
from pipeline.config import load_config
from pipeline.storage import S3Settings

SMALL = ("*.json", "*.jinja", "*.txt", "tokenizer*")


# Not tests.pipeline.common's: the spawned processes below import this module, and that one imports torch.
def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def new_bucket(endpoint: str) -> str:
    name = f"flashcap-{uuid.uuid4().hex[:10]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def uploaded(s3_server, tiny_checkpoints):
    """The tiny Qwen2.5-VL checkpoint under s3://<bucket>/models/qwen/, with a file in a subfolder and a
    pickle that must never be fetched. Returns (uri, bucket, the files expected locally)."""
    bucket = new_bucket(s3_server)
    s3 = s3_client(s3_server)
    expected = _files(Path(tiny_checkpoints["qwen2_5_vl"]))
    expected["extra/notes.txt"] = b"a file in a subfolder\n"
    for rel, data in expected.items():
        s3.put_object(Bucket=bucket, Key=f"models/qwen/{rel}", Body=data)
    s3.put_object(Bucket=bucket, Key="models/qwen/training_args.bin", Body=b"pickle")
    s3.put_object(Bucket=bucket, Key="models/qwen-old/config.json", Body=b"{}")  # a sibling prefix, not ours
    return f"s3://{bucket}/models/qwen", bucket, expected


def _counting(monkeypatch) -> list[str]:
    """Record every object downloaded in this process."""
    calls: list[str] = []
    real = checkpoints._download_object

    def counted(client, bucket, key, dest):
        calls.append(key)
        real(client, bucket, key, dest)

    monkeypatch.setattr(checkpoints, "_download_object", counted)
    return calls


def test_s3_checkpoint_downloads_once_and_loads(s3_server, uploaded, tmp_path, monkeypatch):
    import torch

    import flash

    uri, _, expected = uploaded
    settings = S3Settings(endpoint=s3_server)
    calls = _counting(monkeypatch)
    local = resolve_checkpoint(uri + "/", settings, cache_dir=tmp_path)
    assert local.parent == tmp_path and _files(local) == expected  # byte-identical, no pickle, no sibling
    assert len(calls) == len(expected)
    target = flash.load_target(local, dtype=torch.float64)
    assert target.model_type == "qwen2_5_vl"

    inode = local.stat().st_ino
    assert resolve_checkpoint(uri, settings, cache_dir=tmp_path) == local  # with or without the trailing "/"
    assert len(calls) == len(expected) and local.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([local.name, local.name + ".lock"])


def _race(uri: str, endpoint: str, cache: str, log: str, barrier) -> str:
    """In a spawned process: resolve `uri`, logging every object this process downloads."""
    import time

    real = checkpoints._download_object

    def logged(client, bucket, key, dest):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {key}\n")
        time.sleep(0.05)  # keep the download open long enough for the other process to arrive
        real(client, bucket, key, dest)

    checkpoints._download_object = logged
    barrier.wait()
    return str(resolve_checkpoint(uri, S3Settings(endpoint=endpoint), cache_dir=cache))


def test_processes_racing_download_once(s3_server, uploaded, tmp_path):
    uri, _, expected = uploaded
    log = tmp_path / "downloads.log"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        args = (uri, s3_server, str(tmp_path / "cache"), str(log), manager.Barrier(2))
        paths = pool.starmap(_race, [args, args])
    assert paths[0] == paths[1] and _files(Path(paths[0])) == expected
    lines = log.read_text().splitlines()
    assert len(lines) == len(expected) and len({line.split()[0] for line in lines}) == 1


def _crash_after_first(uri: str, endpoint: str, cache: str) -> None:
    real = checkpoints._download_object
    calls = []

    def crashing(client, bucket, key, dest):
        if calls:
            os._exit(3)  # the process dies mid-download: no cleanup, no exception handler runs
        calls.append(key)
        real(client, bucket, key, dest)

    checkpoints._download_object = crashing
    resolve_checkpoint(uri, S3Settings(endpoint=endpoint), cache_dir=cache)


def test_interrupted_download_is_never_used(s3_server, uploaded, tmp_path, monkeypatch):
    uri, _, expected = uploaded
    settings = S3Settings(endpoint=s3_server)
    real = checkpoints._download_object
    calls = []

    def failing(client, bucket, key, dest):
        if calls:
            raise OSError("disk full (simulated)")
        calls.append(key)
        real(client, bucket, key, dest)

    monkeypatch.setattr(checkpoints, "_download_object", failing)
    with pytest.raises(OSError, match="simulated"):
        resolve_checkpoint(uri, settings, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # no final, no partial

    crashed = multiprocessing.get_context("spawn").Process(target=_crash_after_first, args=(uri, s3_server, tmp_path))
    crashed.start()
    crashed.join(60)
    assert crashed.exitcode == 3
    left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert len(left) == 1 and ".partial-" in left[0]  # only a partial folder, never the final name

    monkeypatch.setattr(checkpoints, "_download_object", real)
    local = resolve_checkpoint(uri, settings, cache_dir=tmp_path)
    assert _files(local) == expected
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [local.name]  # partial removed


def test_changed_object_gives_a_new_entry(s3_server, uploaded, tmp_path):
    uri, bucket, expected = uploaded
    settings = S3Settings(endpoint=s3_server)
    before = resolve_checkpoint(uri, settings, cache_dir=tmp_path)
    s3_client(s3_server).put_object(Bucket=bucket, Key="models/qwen/extra/notes.txt", Body=b"changed\n")
    after = resolve_checkpoint(uri, settings, cache_dir=tmp_path)
    assert after != before
    assert (after / "extra/notes.txt").read_bytes() == b"changed\n"
    assert _files(before) == expected  # the old entry is untouched


def test_only_fetches_matching_files(s3_server, uploaded, tmp_path):
    uri, _, expected = uploaded
    settings = S3Settings(endpoint=s3_server)
    small = resolve_checkpoint(uri, settings, cache_dir=tmp_path, only=SMALL)
    want = {rel for rel in expected if rel.endswith((".json", ".jinja", ".txt")) or rel.startswith("tokenizer")}
    assert "config.json" in want and not any(rel.endswith(".safetensors") for rel in want)
    assert set(_files(small)) == want
    full = resolve_checkpoint(uri, settings, cache_dir=tmp_path)
    assert full != small and set(_files(full)) == set(expected)
    with pytest.raises(ValueError, match=r"no objects under s3://.* match \['\*\.gguf'\]"):
        resolve_checkpoint(uri, settings, cache_dir=tmp_path, only=("*.gguf",))


def test_cache_root_comes_from_the_environment(s3_server, uploaded, tmp_path, monkeypatch):
    uri, _, _ = uploaded
    monkeypatch.setenv("FLASHCAP_CACHE", str(tmp_path / "env-cache"))
    local = resolve_checkpoint(uri, S3Settings(endpoint=s3_server), only=("config.json",))
    assert local.parent == tmp_path / "env-cache" and _files(local).keys() == {"config.json"}


def test_bad_references_are_clear_errors(s3_server, tmp_path, tiny_checkpoints):
    settings = S3Settings(endpoint=s3_server)
    bucket = new_bucket(s3_server)
    local = tiny_checkpoints["qwen2_5_vl"]
    assert resolve_checkpoint(local, settings, only=SMALL) == Path(local).resolve()  # as is, never copied
    with pytest.raises(ValueError, match=f"no objects under s3://{bucket}/nothing"):
        resolve_checkpoint(f"s3://{bucket}/nothing/", settings, cache_dir=tmp_path)
    s3_client(s3_server).put_object(Bucket=bucket, Key="m/sub/../../escape.json", Body=b"{}")
    with pytest.raises(ValueError, match="would leave the checkpoint directory"):
        resolve_checkpoint(f"s3://{bucket}/m", settings, cache_dir=tmp_path)
    assert not (tmp_path / "escape.json").exists()
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by tests/conftest.py: no network in tests
    with pytest.raises(ValueError, match="hub is offline .* pass a local directory or an s3:// URI"):
        resolve_checkpoint("flashcap-test/no-such-model@main", settings, cache_dir=tmp_path)
    for ref in ("gs://bucket/model", "just-a-name", "a/b/c"):
        with pytest.raises(ValueError, match="is not a directory, an s3:// URI or a Hub id"):
            resolve_checkpoint(ref, settings, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="is not a directory$"):
        resolve_checkpoint(str(tmp_path / "missing"), settings)


def test_config_accepts_remote_models_and_rejects_missing_paths(tmp_path):
    (tmp_path / "in").mkdir()
    base = {"input": str(tmp_path / "in"), "output": "s3://b/captions/"}
    config = load_config(**base, model="s3://b/m", drafter="org/drafter@v1")
    assert (config.model, config.drafter) == ("s3://b/m", "org/drafter@v1")
    with pytest.raises(ValueError, match="model '/no/model' is not a directory"):
        load_config(**base, model="/no/model")
    with pytest.raises(ValueError, match="drafter './missing' is not a directory"):
        load_config(**base, model="s3://b/m", drafter="./missing")
    with pytest.raises(ValueError, match="model 'gs://b/m' is not a directory, an s3:// URI or a Hub id"):
        load_config(**base, model="gs://b/m")


def _with_video_processor(src: str, dst: Path, **settings) -> Path:
    """A copy of a checkpoint's small files whose video processor config also holds `settings`."""
    import json
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    path = dst / "processor_config.json"
    config = json.loads(path.read_text())
    config["video_processor"].update(settings)
    path.write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("checkpoint", "job", "expected"),
    [
        ({}, {}, {"num_frames": 8, "fps": None, "max_frames": 768}),  # Qwen's class default max_frames
        ({"num_frames": 4}, {}, {"num_frames": 4, "fps": None}),
        ({"num_frames": 4}, {"num_frames": 16}, {"num_frames": 16, "fps": None}),
        ({"fps": 2.0, "max_frames": 32}, {}, {"num_frames": None, "fps": 2.0, "max_frames": 32}),
        ({"fps": 2.0}, {"num_frames": 6}, {"num_frames": 6, "fps": None}),
        ({"num_frames": 4}, {"fps": 1.0, "max_frames": 10}, {"num_frames": None, "fps": 1.0, "max_frames": 10}),
    ],
)
def test_frame_sampling_follows_the_checkpoint(tiny_checkpoints, tmp_path, checkpoint, job, expected):
    from pipeline.run import with_checkpoint_defaults

    model = _with_video_processor(tiny_checkpoints["qwen2_5_vl"], tmp_path / "model", **checkpoint)
    config = load_config(input=str(tmp_path), output=str(tmp_path / "out"), model=str(model), **job)
    settled = with_checkpoint_defaults(config, S3Settings())
    assert {k: getattr(settled, k) for k in expected} == expected


def test_demo_target_samples_the_frames_it_was_trained_on(tmp_path):
    from pipeline.run import with_checkpoint_defaults

    config = load_config(input=str(tmp_path), output=str(tmp_path / "out"), model="models/demo-target")
    assert with_checkpoint_defaults(config, S3Settings()).num_frames == 4


def test_frame_sampling_of_an_s3_checkpoint_reads_only_its_small_files(s3_server, uploaded, tmp_path, monkeypatch):
    from pipeline.run import with_checkpoint_defaults

    monkeypatch.setenv("FLASHCAP_CACHE", str(tmp_path / "cache"))
    config = load_config(input=str(tmp_path), output=str(tmp_path / "out"), model=uploaded[0], s3_endpoint=s3_server)
    assert with_checkpoint_defaults(config, S3Settings(endpoint=s3_server)).num_frames == 8
    fetched = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert "config.json" in fetched and not any(name.endswith(".safetensors") for name in fetched)
