"""Long videos in windows: a video made of clips in sequence, cut in windows of the clips' length,
decodes (once) into windows that are each its clip as a video of its own (frames, metadata), and
the demo target captions each window as it captions the clip alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from actors.caption import CaptionActor
from demo.world import FPS, FRAMES, render, scene_for_seed
from pipeline.config import load_config
from pipeline.decode import DECODER_ENV, Sampling, Windows, decode_clips, decode_rows
from pipeline.storage import S3Settings
from tests.pipeline.hostile import encode

SEEDS = (3, 7, 11)
CLIP_S = FRAMES / FPS  # 2 s


def lossless(frames: np.ndarray) -> bytes:
    """FFV1 (lossless): a frame decodes to the same pixels alone or in a longer video."""
    return encode(frames, container="matroska", codec="ffv1", pix_fmt="yuv420p", rate=FPS)


@pytest.fixture(scope="module")
def videos() -> tuple[bytes, list[bytes]]:
    clips = [render(scene_for_seed(s)) for s in SEEDS]
    return lossless(np.concatenate(clips)), [lossless(c) for c in clips]


@pytest.fixture(params=["decord", "pyav"])
def decoder(request, monkeypatch):
    monkeypatch.setenv(DECODER_ENV, request.param)
    return request.param


def test_window_spans():
    w = Windows(2.0, 2.0, 1.0)
    assert w.spans(48, 8.0) == [(0, 16, 0.0, 2.0), (16, 32, 2.0, 4.0), (32, 48, 4.0, 6.0)]
    assert w.spans(44, 8.0)[-1] == (32, 44, 4.0, 5.5)  # a trailing 1.5 s window is kept
    assert w.spans(39, 8.0)[-1] == (16, 32, 2.0, 4.0)  # a trailing 0.875 s one is not
    assert w.spans(7, 8.0) == []
    overlapping = Windows(2.0, 0.5, 1.0).spans(24, 8.0)
    assert [s[2] for s in overlapping] == [0.0, 0.5, 1.0, 1.5, 2.0] and overlapping[1] == (4, 20, 0.5, 2.5)
    assert Windows(1.0, 0.1, 0.5).spans(30, 10.0)[3] == (3, 13, 0.30000000000000004, 1.3)  # 3 x 0.1 != 0.3


@pytest.mark.parametrize("sampling", [{"num_frames": 4}, {"fps": 3.0}])
def test_each_window_decodes_as_its_clip_alone(videos, decoder, sampling):
    whole, alone = videos
    windows = decode_clips(whole, windows=Windows(CLIP_S, CLIP_S, 1.0), **sampling)
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    for window, data in zip(windows, alone):
        (clip,) = decode_clips(data, **sampling)
        assert window.info == clip.info and np.array_equal(window.frames, clip.frames)
    assert len(windows[0].info.indices) == (4 if "num_frames" in sampling else 6)
    # Windows that overlap sample within their own frames; the video is still decoded once.
    shifted = decode_clips(whole, windows=Windows(CLIP_S, 1.0, 1.0), **sampling)
    assert [w.start_s for w in shifted] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and shifted[-1].end_s == 6.0
    assert np.array_equal(shifted[2].frames, windows[1].frames)
    assert shifted[-1].info.total_frames == FPS  # the last window is the video's last second


def test_each_window_gets_the_caption_its_clip_gets_alone(tmp_path, videos):
    whole, alone = videos
    config = load_config(input=str(tmp_path), output=str(tmp_path / "out"), model="models/demo-target", dtype="float64")
    actor = CaptionActor(config.model_dump())

    def caption(name: str, data: bytes, windows: Windows | None = None) -> list[dict]:
        path = tmp_path / name
        path.write_bytes(data)
        row = {"video_uri": str(path), "etag": "e", "size": len(data)}
        rows = list(decode_rows([row], S3Settings(), Sampling(num_frames=4, windows=windows)))
        return actor(pa.Table.from_pylist(rows)).to_pylist()

    windowed = caption("long.mkv", whole, Windows(CLIP_S, CLIP_S, 1.0))
    clips = [caption(f"clip{i}.mkv", data)[0] for i, data in enumerate(alone)]
    assert not any(r["error"] for r in windowed + clips)
    assert [r["caption"] for r in windowed] == [r["caption"] for r in clips]
    assert len({r["caption"] for r in clips}) == len(SEEDS)  # three scenes, three captions
    assert [(r["clip_start_s"], r["clip_end_s"], r["object_rows"]) for r in windowed] == [
        (0.0, 2.0, 3),
        (2.0, 4.0, 3),
        (4.0, 6.0, 3),
    ]
    assert [(r["clip_start_s"], r["clip_end_s"]) for r in clips] == [(0.0, 2.0)] * 3


def test_a_video_shorter_than_a_window_is_an_error_row(tmp_path, videos):
    path = tmp_path / "short.mkv"
    path.write_bytes(lossless(render(scene_for_seed(1))[:6]))  # 0.75 s
    row = {"video_uri": str(path), "etag": "e", "size": path.stat().st_size}
    (out,) = decode_rows([row], S3Settings(), Sampling(num_frames=4, windows=Windows(2.0, 2.0, 1.0)))
    assert "no window of at least min_window_s=1.0 s" in out["error"] and out["error_kind"] == "permanent"
    assert out["object_rows"] == 1


def test_window_settings_are_checked():
    base = {"input": ".", "output": "/tmp/x", "model": "models/demo-target"}
    with pytest.raises(ValueError, match="window_stride_s needs window_s"):
        load_config(**base, window_stride_s=1.0)
    with pytest.raises(ValueError, match="shorter than min_window_s"):
        load_config(**base, window_s=0.5)
    assert load_config(**base, window_s=0.5, min_window_s=0.25).window_s == 0.5
