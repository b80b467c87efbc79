"""Decoding: the sampled frames, where they sit in the source (frame count, fps, indices), and the
two decoders (decord, PyAV) agreeing pixel for pixel, natively sized, downscaled and rotated."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers.video_utils import VideoMetadata

from demo.world import FPS, FRAMES, SIDE, write_videos
from pipeline import decode
from pipeline.decode import (
    Sampling,
    VideoInfo,
    decode_row,
    decode_video,
    frames_of,
    sample_frames,
    sample_indices,
    video_metadata_of,
)
from pipeline.storage import S3Settings

ROOT = Path(__file__).resolve().parents[2]
HAS_DECORD = importlib.util.find_spec("decord") is not None  # not imported: see tests/pipeline/hostile.py
DECODERS = [pytest.param("decord", marks=pytest.mark.skipif(not HAS_DECORD, reason="no decord here")), "pyav"]
needs_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord has wheels for x86-64 only")


def rotated_clip(degrees: int, width: int = 128, height: int = 64, frames: int = 6) -> bytes:
    """H.264 mp4 whose container says: display rotated `degrees` counter-clockwise. The coded
    picture is dark with a white top-left corner, so orientation can be read off the frames."""
    import av

    pixels = np.full((frames, height, width, 3), 30, dtype=np.uint8)
    pixels[:, :8, :8] = 255
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.set_display_rotation(degrees)
        for frame in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("demo")
    return [(folder / r["file"]).read_bytes() for r in write_videos(folder, 3, seed=0)]


@pytest.fixture(scope="module")
def rotated() -> bytes:
    return rotated_clip(90)


def decoded(decoder: str, data: bytes, **kwargs) -> tuple[np.ndarray, VideoInfo]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(decode.DECODER_ENV, decoder)
        return decode_video(data, **kwargs)


def test_sample_indices_table():
    assert sample_indices(16, 4) == [0, 5, 10, 15]
    assert sample_indices(16, 8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert sample_indices(16, 1) == [0]
    assert sample_indices(3, 8) == [0, 1, 2]  # never more frames than the video has
    assert sample_indices(0, 4) == []


@pytest.mark.parametrize("decoder", DECODERS)
def test_decode_video_says_where_frames_sit(clips, decoder):
    for data in clips:
        frames, info = decoded(decoder, data, num_frames=4)
        assert frames.shape == (4, SIDE, SIDE, 3) and frames.dtype == np.uint8
        assert info == VideoInfo(total_frames=FRAMES, fps=float(FPS), indices=(0, 5, 10, 15))


@pytest.mark.parametrize("decoder", DECODERS)
def test_sample_frames_is_decode_video_without_info(clips, decoder, monkeypatch):
    monkeypatch.setenv(decode.DECODER_ENV, decoder)
    assert np.array_equal(sample_frames(clips[0], num_frames=4), decode_video(clips[0], num_frames=4)[0])


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(
    ("fps", "max_frames", "indices"),
    [
        (2.0, 64, (0, 5, 10, 15)),  # 16 frames at 8 fps: 2 s x 2 fps = 4 frames
        (1.0, 64, (0, 15)),
        (0.1, 64, (0,)),  # at least one frame
        (30.0, 6, (0, 3, 6, 9, 12, 15)),  # capped by max_frames
        (30.0, 64, tuple(range(16))),  # and by the frames there are
    ],
)
def test_fps_sets_the_frame_count(clips, decoder, fps, max_frames, indices):
    frames, info = decoded(decoder, clips[1], num_frames=99, fps=fps, max_frames=max_frames)
    assert info.indices == indices and len(frames) == len(indices)


@needs_decord
@pytest.mark.parametrize("max_side", [448, 112, 64, 50], ids=lambda s: f"max_side={s}")
def test_decoders_give_identical_frames(clips, max_side):
    for data in clips:
        a, info_a = decoded("decord", data, num_frames=8, max_side=max_side)
        b, info_b = decoded("pyav", data, num_frames=8, max_side=max_side)
        side = min(SIDE, max_side)
        assert a.shape == b.shape == (8, side, side, 3) and info_a == info_b
        assert np.array_equal(a, b)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(("max_side", "shape"), [(448, (128, 64)), (64, (64, 32))], ids=["native", "downscaled"])
def test_rotated_video_is_upright_and_keeps_its_aspect(rotated, decoder, max_side, shape):
    frames, info = decoded(decoder, rotated, num_frames=3, max_side=max_side)
    assert frames.shape == (3, *shape, 3) and info.total_frames == 6
    # 90 degrees counter-clockwise: the coded top-left corner is shown bottom-left.
    height, width = shape
    corner = frames[0, height - height // 16 :, : width // 8, 0]
    assert corner.mean() > 200 and frames[0, : height // 16, : width // 8, 0].mean() < 100


@needs_decord
@pytest.mark.parametrize("degrees", [90, -90, 180])
@pytest.mark.parametrize("max_side", [448, 64], ids=["native", "downscaled"])
def test_decoders_agree_on_rotated_video(degrees, max_side):
    data = rotated_clip(degrees)
    a, info_a = decoded("decord", data, num_frames=3, max_side=max_side)
    b, info_b = decoded("pyav", data, num_frames=3, max_side=max_side)
    assert info_a == info_b and np.array_equal(a, b)


@needs_decord
def test_pyav_alone_gives_decords_frames(clips, tmp_path):
    """Where decord cannot be imported, PyAV is chosen and gives the same frames (a fresh process:
    decord's bundled FFmpeg libraries never loaded)."""
    clip, out = tmp_path / "clip.mp4", tmp_path / "frames.npy"
    clip.write_bytes(clips[2])
    script = (
        "import sys, numpy as np\n"
        "sys.modules['decord'] = None  # as on a machine without its wheel\n"
        "from pipeline import decode\n"
        "assert decode.decoder() == 'pyav', decode.decoder()\n"
        "frames, info = decode.decode_video(open(sys.argv[1], 'rb').read(), num_frames=5, max_side=64)\n"
        "np.save(sys.argv[2], frames)\n"
        "print(info.total_frames, info.fps, *info.indices)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != decode.DECODER_ENV}
    done = subprocess.run(
        [sys.executable, "-c", script, str(clip), str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected, info = decoded("decord", clips[2], num_frames=5, max_side=64)
    assert done.stdout.split() == [str(info.total_frames), str(info.fps), *map(str, info.indices)]
    assert np.array_equal(np.load(out), expected)


def test_decoder_choice(monkeypatch):
    monkeypatch.setenv(decode.DECODER_ENV, " PyAV ")
    assert decode.decoder() == "pyav"
    monkeypatch.setenv(decode.DECODER_ENV, "opencv")
    with pytest.raises(ValueError, match="FLASHCAP_DECODER='opencv': use one of decord, pyav"):
        decode.decoder()
    monkeypatch.setattr(decode, "_decord_available", lambda: False)
    monkeypatch.setenv(decode.DECODER_ENV, "decord")
    with pytest.raises(ValueError, match="decord cannot be imported"):
        decode.decoder()
    monkeypatch.delenv(decode.DECODER_ENV)
    assert decode.decoder() == "pyav"


def row_for(path: Path, size: int | None = None) -> dict:
    return {"video_uri": str(path), "size": path.stat().st_size if size is None else size, "etag": "e"}


def decode_one(row: dict, fps: float | None = None) -> dict:
    return decode_row(row, S3Settings(), Sampling(num_frames=4, fps=fps, max_bytes=10**8))


@pytest.mark.parametrize("decoder", DECODERS)
def test_decode_row_carries_video_metadata(clips, tmp_path, decoder, monkeypatch):
    monkeypatch.setenv(decode.DECODER_ENV, decoder)
    path = tmp_path / "clip.mp4"
    path.write_bytes(clips[0])
    row = decode_one(row_for(path))
    assert row["error"] == ""
    assert row["video_total_frames"] == FRAMES and row["video_fps"] == float(FPS)
    assert row["frame_indices"] == [0, 5, 10, 15] and frames_of(row).shape == (4, SIDE, SIDE, 3)
    metadata = VideoMetadata(**video_metadata_of(row))
    assert metadata.timestamps == [0.0, 5 / FPS, 10 / FPS, 15 / FPS]
    assert metadata.sampled_fps == 4 / FRAMES * FPS


def test_error_rows_carry_empty_metadata(tmp_path, clips):
    text, clip = tmp_path / "notes.mp4", tmp_path / "clip.mp4"
    text.write_text("not a video\n" * 10)
    clip.write_bytes(clips[0])
    for row, says in [(row_for(text), "not a readable video"), (row_for(clip, size=10**9), "over max_video_bytes")]:
        out = decode_one(row)
        assert out["error"].startswith("decode failed: ValueError: ") and says in out["error"], out["error"]
        assert (out["video_total_frames"], out["video_fps"], out["frame_indices"]) == (0, 0.0, [])
        assert video_metadata_of(out) == {"total_num_frames": 0, "fps": None, "frames_indices": []}
        VideoMetadata(**video_metadata_of(out))  # an unknown fps is None, which processors read as 24


@pytest.mark.parametrize("gop", [12, 50])
def test_pyav_seeks_to_keyframes_when_that_decodes_less_and_gives_the_same_frames(gop, monkeypatch):
    """A long clip with frequent keyframes, 6 frames sampled: PyAV seeks to the keyframe before each
    (decoding a few GOPs, not the whole clip), and the frames equal one sequential pass and decord."""
    from tests.pipeline.hostile import encode, moving_square

    data = encode(moving_square(600, 96, 128), rate=30, options={"g": str(gop), "bf": "2"})
    seeks = []
    real = decode._sampled_by_seeking
    monkeypatch.setattr(decode, "_sampled_by_seeking", lambda *a: seeks.append(1) or real(*a))
    seeking = decoded("pyav", data, num_frames=6, max_side=64)
    assert seeks  # the seek strategy was chosen
    monkeypatch.setattr(decode, "SEEK_GAIN", 1e9)  # one sequential pass
    one_pass = decoded("pyav", data, num_frames=6, max_side=64)
    assert np.array_equal(seeking[0], one_pass[0]) and seeking[1] == one_pass[1]
    if HAS_DECORD:
        by_decord = decoded("decord", data, num_frames=6, max_side=64)
        assert np.array_equal(seeking[0], by_decord[0]) and seeking[1] == by_decord[1]
