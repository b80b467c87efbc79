"""A user's path with a checkpoint shaped like Qwen2.5-VL-7B-Instruct: tokens_per_second 2, the
release's chat template and generation_config.json (repetition penalty 1.05, sampling with top_k 1),
kept in S3 with an untrained FLASH drafter. jobs/caption_videos.py given `--model s3://...` and
`--drafter s3://...` must caption exactly as Hugging Face's own path does on the same frames:
`apply_chat_template` + processor with `video_metadata` + `model.generate()` with the checkpoint's
generation config, with and without the drafter."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.video_utils import VideoMetadata

import flash
from demo.tiny_models import QWEN2_5_VL_RELEASE_GENERATION, QWEN_CHAT_TEMPLATE, build_qwen2_5_vl
from demo.world import encode_mp4, render, scene_for_seed
from jobs.caption_videos import build_config, build_parser
from pipeline.decode import decode_video
from pipeline.run import run_job
from tests.pipeline.common import new_bucket, read_output, s3_client

MAX_NEW = 12
INSTRUCTION = "describe the video in detail"


def _moving_clip(frames: int, fps: int, width: int, height: int, seed: int) -> bytes:
    """A clip unlike the demo world's: its own size, frame rate and length, a square crossing noise."""
    rng = np.random.RandomState(seed)
    background = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = background.copy()
            x = int(i * (width - 24) / max(frames - 1, 1))
            frame[height // 3 : height // 3 + 24, x : x + 24] = (255, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _upload_dir(s3, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}{path.relative_to(folder)}", Body=path.read_bytes())


@pytest.fixture(scope="module")
def release_like(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint shaped like the release, and an untrained drafter for it."""
    root = tmp_path_factory.mktemp("release")
    model = build_qwen2_5_vl(
        root / "model", chat_template=QWEN_CHAT_TEMPLATE, generation=QWEN2_5_VL_RELEASE_GENERATION, seed=3
    )
    target = flash.load_target(model, dtype=torch.float64)
    flash.FlashDrafter.for_target(target).save_pretrained(root / "drafter")
    return model, root / "drafter"


def _hf_captions(model_dir: Path, clips: dict[str, bytes], num_frames: int) -> dict:
    """Hugging Face's own path on the frames flashcap decodes: chat template, processor with the
    video metadata, model.generate() with the checkpoint's generation config (float64)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float64).eval()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": INSTRUCTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    out = {}
    for name, data in clips.items():
        frames, info = decode_video(data, num_frames=num_frames)
        metadata = VideoMetadata(info.total_frames, info.fps, frames_indices=list(info.indices))
        inputs = processor(
            text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
        )
        with torch.inference_mode():
            new = model.generate(**inputs, max_new_tokens=MAX_NEW)[0, inputs["input_ids"].shape[1] :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
        out[name] = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    return out


def test_s3_checkpoint_captions_like_hugging_face(s3_server, ray_local, release_like):
    model_dir, drafter_dir = release_like
    bucket = new_bucket(s3_server)
    s3 = s3_client(s3_server)
    _upload_dir(s3, bucket, model_dir, "models/qwen2.5-vl/")
    _upload_dir(s3, bucket, drafter_dir, "models/drafter/")
    clips = {f"demo_{s}.mp4": encode_mp4(render(scene_for_seed(s))) for s in (0, 1)}
    clips["real_30fps.mp4"] = _moving_clip(90, 30, 160, 112, seed=0)
    clips["real_24fps.mp4"] = _moving_clip(40, 24, 112, 140, seed=1)
    for name, data in clips.items():
        s3.put_object(Bucket=bucket, Key=f"clips/{name}", Body=data)

    def job(output: str, *extra: str) -> dict[str, str]:
        args = build_parser().parse_args(
            [
                "--input", f"s3://{bucket}/clips/", "--output", f"s3://{bucket}/{output}/",
                "--s3-endpoint", s3_server, "--model", f"s3://{bucket}/models/qwen2.5-vl/",
                "--prompt", INSTRUCTION, "--max-new-tokens", str(MAX_NEW), "--dtype", "float64",
                "--batch-size", "4", "--cpus-per-actor", "0.5", "--cpus-per-decode", "0.25", *extra,
            ]
        )  # fmt: skip
        config, _ = build_config(args)
        report = run_job(config)
        rows, _ = read_output(s3_server, bucket, f"{output}/")
        assert report["errors"] == 0 and len(rows) == len(clips)
        return {r["video_uri"].rsplit("/", 1)[-1]: r["caption"] for r in rows}

    flashed = job("flash", "--drafter", f"s3://{bucket}/models/drafter/")
    plain = job("plain")
    # The checkpoint sets no frame count, so flashcap's default applies (8): the same frames on both sides.
    reference = _hf_captions(model_dir, clips, num_frames=8)
    assert flashed == reference
    assert plain == reference
    assert all(reference.values())
