"""train_drafter.py: the self-distillation set as a Ray Data job (keyed, resumable, growing), training
on 2 Ray Train workers from object storage only, --resume, --steps 0, and the trained drafter
serving in the pipeline with captions equal to --no-drafter."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import flash
from actors.distill import row_to_example
from demo.world import write_videos
from flash.train import distill_example
from jobs.train_drafter import build_config, build_distill_set, build_parser, latest_checkpoint, main
from pipeline.checkpoints import checkpoint_digest
from pipeline.config import load_config
from pipeline.decode import decode_video, video_metadata
from pipeline.run import run_job
from pipeline.storage import S3Settings
from tests.pipeline.common import config_for, new_bucket, read_output, s3_client
from tests.pipeline.test_real_checkpoint import _upload_dir

ROOT = Path(__file__).resolve().parents[2]


def test_steps_zero_writes_an_untrained_drafter(tiny_checkpoints, tmp_path):
    main(["--model", tiny_checkpoints["qwen2_5_vl"], "--out", str(tmp_path / "d"), "--steps", "0", "--text-only"])
    target = flash.load_target(tiny_checkpoints["qwen2_5_vl"])
    drafter = flash.FlashDrafter.from_pretrained(tmp_path / "d", target)
    assert drafter.config.use_visual_latents is False
    assert not (tmp_path / "d_train").exists()  # no set, no cluster


def test_latent_settings_reach_the_drafter(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "d")
    main(
        [
            "--model",
            tiny_checkpoints["qwen2_5_vl"],
            "--out",
            out,
            "--steps",
            "0",
            "--compression",
            "2",
            "--max-latents",
            "96",
        ]
    )
    drafter = flash.FlashDrafter.from_pretrained(out, flash.load_target(tiny_checkpoints["qwen2_5_vl"]))
    assert (drafter.config.compression, drafter.config.max_latents) == (2, 96)
    assert drafter.latent_queries.shape[0] == 96


def test_resume_takes_only_a_checkpoint_of_the_same_drafter(tmp_path):
    """Several drafters may share one --storage (one distillation set). --resume continues the drafter
    that was asked for: a text-only checkpoint at a higher step loads into a FLASH drafter without an
    error (the same parameters), so choosing it would train the wrong model silently."""
    wanted = asdict(flash.DrafterConfig(block_size=5, compression=2, hidden_size=8, vocab_size=16, num_heads=2))

    def checkpoint(run: str, name: str, step: int, **changes) -> str:
        folder = tmp_path / "storage" / run / f"checkpoint_{name}"
        (folder / "drafter").mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"step": step}))
        (folder / "drafter" / "drafter_config.json").write_text(json.dumps({**wanted, **changes}))
        return str(folder)

    storage, settings = str(tmp_path / "storage"), S3Settings()
    (tmp_path / "storage" / "distill").mkdir(parents=True)
    assert latest_checkpoint(storage, settings, wanted) is None
    checkpoint("run-a", "1", 1500, use_visual_latents=False)  # the text-only ablation
    checkpoint("run-b", "1", 1500, compression=9)  # other pooling, same parameters
    with pytest.raises(ValueError, match="compression"):
        latest_checkpoint(storage, settings, wanted)  # asked to resume, nothing to resume: an error
    checkpoint("run-c", "1", 500)
    mine = checkpoint("run-c", "2", 1000)
    assert latest_checkpoint(storage, settings, wanted) == (mine, 1000)


def test_draft_vocab_needs_the_distillation_set(tiny_checkpoints, tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", tiny_checkpoints["qwen2_5_vl"], "--out", str(tmp_path), "--steps", "0", "--draft-vocab", "8"])
    assert not (tmp_path / "drafter.safetensors").exists()


def _set(args: list[str], storage: Path, model: str):
    config = build_config(build_parser().parse_args(args))
    return build_distill_set(config, str(storage), checkpoint_digest(model, S3Settings()))


def _rows(path: str) -> dict:
    table = pq.read_table(path)
    return {(r["video_uri"], r["etag"]): r for r in table.to_pylist()}


@pytest.mark.slow  # 41 s (a Ray Data distillation job)
def test_distill_set_is_keyed_resumable_and_exact(ray_local, tiny_checkpoints, tmp_path):
    """Rows are the target's own greedy answers and its features over prompt + answer (bfloat16);
    a rerun distils only clips no shard holds; other settings or another target make another set."""
    from demo.tiny_models import build_qwen2_5_vl

    model = tiny_checkpoints["qwen2_5_vl"]
    videos, storage = tmp_path / "videos", tmp_path / "storage"
    write_videos(videos, 2, seed=1_000_000)
    args = ["--model", model, "--videos", str(videos), "--out", str(tmp_path / "d"), "--max-new-tokens", "6"]
    args += ["--config", str(_yaml(tmp_path, num_frames=4, batch_size=2, cpus_per_actor=0.5, cpus_per_decode=0.25))]

    path, keys, distilled = _set(args, storage, model)
    assert distilled == 2 and len(keys) == 2 and json.loads(Path(path, "_key.json").read_text())["max_new_tokens"] == 6
    rows = _rows(path)
    # Each row equals the target's own run on the same decoded frames (features rounded to bfloat16).
    target = flash.load_target(model)
    for (uri, _), row in rows.items():
        frames, info = decode_video(Path(uri).read_bytes(), num_frames=4)
        inputs = target.processor(
            text=[target.video_prompt(flash_prompt(target))],
            videos=[frames],
            video_metadata=[video_metadata(info)],
            do_sample_frames=False,
            return_tensors="pt",
        )
        answer = flash.generate(target, None, inputs, max_new_tokens=6, temperature=0.0).sequences[0]
        want = distill_example(target, inputs, answer)
        got = row_to_example(row)
        assert torch.equal(got.input_ids, want.input_ids) and got.answer_start == want.answer_start
        assert torch.equal(got.visual_mask, want.visual_mask)
        assert torch.equal(got.features, want.features.to(torch.bfloat16).float())

    again = _set(args, storage, model)
    assert again[0] == path and again[2] == 0  # nothing new: nothing distilled
    write_videos(tmp_path / "more", 1, seed=2_000_000)  # a clip added: only it is distilled
    for clip in (tmp_path / "more").glob("*.mp4"):
        clip.rename(videos / f"added-{clip.name}")
    path3, keys3, distilled = _set(args, storage, model)
    assert path3 == path and distilled == 1 and len(_rows(path)) == 3 == len(keys3)

    other = _set(
        args[:-1] + [str(_yaml(tmp_path, num_frames=2, cpus_per_actor=0.5, cpus_per_decode=0.25))], storage, model
    )
    assert other[0] != path and other[2] == 3  # other frame sampling: another set
    retrained = build_qwen2_5_vl(tmp_path / "other", seed=12345)
    moved = _set(["--model", str(retrained), *args[2:]], storage, str(retrained))
    assert moved[0] not in (path, other[0]) and moved[2] == 3  # another target: another set


def flash_prompt(target) -> str:
    from pipeline.config import DEFAULT_INSTRUCTION, RAW_PROMPT

    return DEFAULT_INSTRUCTION if target.has_chat_template else RAW_PROMPT


def _yaml(tmp_path: Path, **fields) -> Path:
    import yaml

    path = tmp_path / f"config-{abs(hash(tuple(sorted(fields.items()))))}.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.mark.slow
def test_trains_from_object_storage_resumes_and_serves(ray_local, s3_server, tiny_checkpoints, tmp_path):
    """Target, clips, storage and output all in S3: 2 workers train, --resume continues from the last
    checkpoint to the new total, and the drafter serves in the pipeline from --drafter s3://...,
    with captions equal to --no-drafter."""
    bucket = new_bucket(s3_server)
    s3 = s3_client(s3_server)
    _upload_dir(s3, bucket, Path(tiny_checkpoints["qwen2_5_vl"]), "models/target/")
    clips = tmp_path / "clips"
    write_videos(clips, 6, seed=1_000_000)
    _upload_dir(s3, bucket, clips, "clips/")
    config = _yaml(tmp_path, num_frames=4, batch_size=3, cpus_per_actor=0.5, cpus_per_decode=0.25, max_new_tokens=12)
    common = ["--model", f"s3://{bucket}/models/target/", "--videos", f"s3://{bucket}/clips/"]
    common += ["--out", f"s3://{bucket}/drafters/d/", "--storage", f"s3://{bucket}/train/", "--config", str(config)]
    common += ["--s3-endpoint", s3_server, "--workers", "2", "--batch", "2", "--checkpoint-every", "2"]
    common += ["--draft-vocab", "24", "--block-size", "3"]

    main([*common, "--steps", "4"])
    summary = json.loads(s3.get_object(Bucket=bucket, Key="drafters/d/training_summary.json")["Body"].read())
    assert summary["steps"] == 4 and summary["resumed_from_step"] is None
    assert summary["metrics"]["step"] == 4 and "top1_slot0" in summary["metrics"]
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="drafters/d/")["Contents"]]
    assert sorted(k.rsplit("/", 1)[1] for k in listed) == [
        "drafter.safetensors",
        "drafter_config.json",
        "training_summary.json",
    ]  # the drafter's folder holds the drafter only: the set and checkpoints are under --storage
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="train/")["Contents"]]
    assert any("/distill/" in k and k.endswith(".parquet") for k in keys)
    assert sum(k.endswith("state.json") for k in keys) >= 2  # checkpoints at steps 2 and 4

    main([*common, "--steps", "6", "--resume"])
    resumed = json.loads(s3.get_object(Bucket=bucket, Key="drafters/d/training_summary.json")["Body"].read())
    assert resumed["steps"] == 6 and resumed["resumed_from_step"] == 4
    assert resumed["distillation_set"]["distilled_now"] == 0  # the set was reused, not rebuilt

    models = {"model": f"s3://{bucket}/models/target/", "drafter": f"s3://{bucket}/drafters/d/"}
    captions = {}
    for side, use in (("flash", True), ("plain", False)):
        job = config_for(s3_server, bucket, models, output=f"out-{side}/", use_drafter=use, num_frames=4)
        report = run_job(job, log=lambda line: None)
        assert report["errors"] == 0
        rows, _ = read_output(s3_server, bucket, prefix=f"out-{side}/")
        captions[side] = {r["video_uri"]: r["caption"] for r in rows}
    assert captions["flash"] == captions["plain"] and len(captions["flash"]) == 6


@pytest.mark.slow
def test_a_few_hundred_steps_on_a_hundred_clips_beat_an_untrained_drafter(ray_local, tmp_path):
    """The demo target, 96 training clips, 300 steps on 2 workers: through the pipeline's default
    settings on 24 clips no step saw, the mean acceptance is well above an untrained drafter's."""
    model = str(ROOT / "models" / "demo-target")
    write_videos(tmp_path / "train", 96, seed=3_000_000)
    write_videos(tmp_path / "held-out", 24, seed=4_000)
    common = ["--model", model, "--config", str(_yaml(tmp_path, cpus_per_actor=0.5, cpus_per_decode=0.25))]
    main([*common, "--videos", str(tmp_path / "train"), "--out", str(tmp_path / "trained"), "--steps", "300"])
    main([*common, "--out", str(tmp_path / "untrained"), "--steps", "0"])
    acceptance = {}
    for name in ("trained", "untrained"):
        config = load_config(
            input=str(tmp_path / "held-out"),
            output=str(tmp_path / f"out-{name}"),
            model=model,
            drafter=str(tmp_path / name),
            report=False,
        )
        report = run_job(config, log=lambda line: None)
        assert report["errors"] == 0
        acceptance[name] = report["mean_acceptance_length"]
    print(acceptance)
    assert acceptance["trained"] > 1.5 and acceptance["trained"] > acceptance["untrained"] + 0.4, acceptance
