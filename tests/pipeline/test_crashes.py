"""Worker processes that die: restarted, their in-flight rows retried and never
duplicated; a video that kills its worker every time ends as an error row after
max_worker_crashes deaths instead of stalling the job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import pipeline.run
from actors.caption import CaptionActor
from pipeline.config import load_config
from pipeline.faults import ENV
from pipeline.run import JobIncomplete, run_job
from tests.actors.test_caption import _rows
from tests.pipeline.common import config_for, direct_caption, new_bucket, read_output, s3_client, upload_clips
from tests.pipeline.test_real_checkpoint import _moving_clip


@pytest.fixture
def faults(ray_local):
    """Write fault rules into the file the Ray workers watch; removed afterwards."""
    path = Path(os.environ[ENV])

    def arm(rules: list[dict]) -> None:
        path.write_text(json.dumps(rules))

    yield arm
    path.unlink(missing_ok=True)


@pytest.mark.slow
def test_crashed_workers_lose_nothing_and_poison_pills_become_error_rows(s3_server, ray_local, pipeline_models, faults):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(700, 710))
    s3 = s3_client(s3_server)
    good = s3.get_object(Bucket=bucket, Key="clips/clip_000700.mp4")["Body"].read()
    s3.put_object(Bucket=bucket, Key="clips/poison_caption.mp4", Body=good)
    s3.put_object(Bucket=bucket, Key="clips/poison_decode.mp4", Body=good)
    faults(
        [
            {"stage": "caption", "match": "clip_000701", "times": 1},  # dies once, then fine
            {"stage": "caption", "match": "clip_000706", "times": 2},  # dies twice, then fine
            {"stage": "decode", "match": "clip_000703", "times": 1},
            {"stage": "caption", "match": "poison_caption", "times": -1},  # kills its actor every time
            {"stage": "decode", "match": "poison_decode", "times": -1},  # kills its decode task every time
        ]
    )
    report = run_job(config_for(s3_server, bucket, pipeline_models))

    rows, _ = read_output(s3_server, bucket)
    by_name = {r["video_uri"].rsplit("/", 1)[1]: r for r in rows}
    assert len(rows) == len(by_name) == 12 and report["rows_written"] == 12 and report["missing"] == 0
    for s in range(700, 710):
        r = by_name[f"clip_{s:06d}.mp4"]
        assert r["error"] == "" and r["caption"], r
    # Rows retried after a crash carry the caption the target gives those frames (float64).
    for name in ("clip_000701.mp4", "clip_000703.mp4", "clip_000706.mp4"):
        data = s3.get_object(Bucket=bucket, Key=f"clips/{name}")["Body"].read()
        assert by_name[name]["caption"] == direct_caption(pipeline_models["target"], data)
    assert by_name["poison_caption.mp4"]["caption"] == ""
    assert by_name["poison_caption.mp4"]["error"].startswith("caption failed: the worker process died 3 times")
    assert by_name["poison_decode.mp4"]["error"].startswith("decode failed: the worker process died 3 times")
    assert report["worker_crashes"]["caption"] >= 3 + 1 + 2 and report["worker_crashes"]["decode"] >= 3 + 1
    assert report["duplicates_dropped"] == 0


def _lossy_first_round(monkeypatch, fail_rounds: int):
    """The first `fail_rounds` datasets stop after one batch with an error, as Ray Data does when a
    node's results are gone for good (actor outputs are not reconstructable); later ones are real."""
    real = pipeline.run._build_dataset
    rounds: list[int] = []

    def build(config, todo, settings, ledger=None):
        dataset = real(config, todo, settings, ledger)
        rounds.append(len(todo))
        if len(rounds) > fail_rounds:
            return dataset

        class Lossy:
            def iter_batches(self, **kwargs):
                for batch in dataset.iter_batches(**kwargs):
                    yield batch
                    raise RuntimeError("ObjectLostError: the node holding this block died (simulated)")

        return Lossy()

    monkeypatch.setattr(pipeline.run, "_build_dataset", build)
    return rounds


def test_driver_reruns_what_the_cluster_lost(s3_server, ray_local, pipeline_models, monkeypatch):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(720, 736))
    rounds = _lossy_first_round(monkeypatch, fail_rounds=1)
    report = run_job(config_for(s3_server, bucket, pipeline_models))
    rows, _ = read_output(s3_server, bucket)
    assert len(rounds) == 2 and rounds[0] == 16 and 0 < rounds[1] < 16
    assert report["rounds"] == 2 and "ObjectLostError" in report["round_errors"][0]
    assert len(rows) == len({r["video_uri"] for r in rows}) == 16 and report["missing"] == 0


@pytest.mark.slow  # 32 s; the rerun of lost work is tested above
def test_job_incomplete_after_max_rounds_and_a_rerun_finishes(s3_server, ray_local, pipeline_models, monkeypatch):
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(740, 756))
    _lossy_first_round(monkeypatch, fail_rounds=1)
    config = config_for(s3_server, bucket, pipeline_models, max_rounds=1)
    with pytest.raises(JobIncomplete, match=r"of 16 objects lack rows after 1 rounds .*rerun the same command"):
        run_job(config)
    partial, _ = read_output(s3_server, bucket)
    assert 0 < len(partial) < 16
    monkeypatch.undo()  # the cluster is healthy again
    again = run_job(config)
    rows, _ = read_output(s3_server, bucket)
    assert again["already_done"] == len(partial) and again["missing"] == 0
    assert len(rows) == len({r["video_uri"] for r in rows}) == 16


@pytest.mark.slow
def test_a_device_failure_restarts_the_actor_and_charges_no_video(s3_server, ray_local, pipeline_models, faults):
    """A CUDA error in generation poisons the process's device context: the actor exits, Ray replaces
    it, and the batch is captioned again; no video gets an error row or a crash charge for it."""
    bucket = new_bucket(s3_server)
    upload_clips(s3_server, bucket, range(720, 724))
    message = "CUDA error: an illegal memory access was encountered"
    faults([{"stage": "generate", "match": "clip_000721", "raise": message, "times": 2}])
    report = run_job(config_for(s3_server, bucket, pipeline_models))
    rows, _ = read_output(s3_server, bucket)
    assert len(rows) == 4 and report["missing"] == 0
    assert all(r["error"] == "" and r["caption"] for r in rows), [r["error"] for r in rows]
    assert report["videos_in_flight_at_a_crash"] == 0  # the exits charged no video


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """A tiny Qwen2.5-VL with its chat template, and an untrained FLASH drafter for it."""
    import flash
    from demo.tiny_models import QWEN_CHAT_TEMPLATE, build_qwen2_5_vl

    root = tmp_path_factory.mktemp("chat")
    model = build_qwen2_5_vl(root / "model", chat_template=QWEN_CHAT_TEMPLATE, seed=1)
    flash.FlashDrafter.for_target(flash.load_target(model)).save_pretrained(root / "drafter")
    return str(model), str(root / "drafter")


def test_rows_with_a_death_on_record_are_captioned_alone_or_given_up(tmp_path, chat_checkpoint, ray_local):
    """The crash ledger (a real Ray actor): a row whose earlier attempt died with its worker is held
    out of the shared engine and captioned alone; one charged max_worker_crashes deaths becomes an
    error row without being tried; the others decode in the engine; every row leaves the ledger."""
    import pyarrow as pa

    from pipeline.ledger import start_ledger

    clips = {f"c{i}.mp4": _moving_clip(20 + 5 * i, 30, 112, 112, seed=i) for i in range(3)}
    rows = _rows(tmp_path, clips, num_frames=4)
    ledger = start_ledger()
    keys = [("caption", r["video_uri"], r["etag"]) for r in rows]
    for key, attempts in ((keys[0], 1), (keys[1], 3)):  # attempts that never finished (their worker died)
        for _ in range(attempts):
            ray_local.get(ledger.begin.remote([key], "/gone-host:1"))
    model, drafter = chat_checkpoint
    config = load_config(
        input=str(tmp_path), output=str(tmp_path / "out"), model=model, drafter=drafter, dtype="float64",
        max_new_tokens=8, max_worker_crashes=3,
    )  # fmt: skip
    actor = CaptionActor(config.model_dump(), ledger)
    alone = [actor._generate([r])[0][0] for r in rows]  # each caption on an engine of its own
    alone_calls = []
    generate = actor._generate
    actor._generate = lambda group: alone_calls.append([r["video_uri"] for r in group]) or generate(group)
    out = actor(pa.Table.from_pylist(rows)).to_pylist()
    assert [out[0]["caption"], out[2]["caption"]] == [alone[0], alone[2]] and not out[0]["error"]
    assert out[1]["error"].startswith("caption failed: the worker process died 3 times") and not out[1]["caption"]
    assert alone_calls == [[rows[0]["video_uri"]]]  # only the row with a death on record ran alone
    assert ray_local.get(ledger.begin.remote(keys, "w")) == [1, 3, 0]  # nothing left in flight, no new charge
