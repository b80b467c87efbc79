"""Hostile and odd inputs for the pipeline, generated here (PyAV): each case is an
object name, its bytes, and what the row must say (a caption, or an error that
contains the given words).

Generate them in a fresh process (`python -m tests.pipeline.hostile DIR`, see
`generate`): once decord is imported, its bundled ffmpeg libraries shadow
PyAV's and the VP9 encoder fails to open (decoding is unaffected)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from demo.world import encode_mp4, render, scene_for_seed


@dataclass(frozen=True)
class Case:
    name: str  # object name under the input prefix
    data: bytes
    error: str | None  # None: a caption is expected; else words the error must contain


def moving_square(frames: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    out = np.full((frames, height, width, channels), 40, dtype=np.uint8)
    side = max(2, min(height, width) // 4)
    for t in range(frames):
        x = int((width - side) * t / max(frames - 1, 1))
        out[t, height // 3 : height // 3 + side, x : x + side] = 220
    return out


def encode(
    frames: np.ndarray,
    container: str = "mp4",
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rate: int = 8,
    pts_ms: list[int] | None = None,
    in_format: str = "rgb24",
    options: dict[str, str] | None = None,
) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", **(options or {})}
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=in_format)
            if pts_ms is not None:
                vf.pts, vf.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def audio_only() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10) * 3000).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def cases() -> list[Case]:
    good = encode_mp4(render(scene_for_seed(11)))
    vfr_ms = np.cumsum([0, 40, 40, 200, 10, 90, 300, 33, 33, 500, 60, 60]).tolist()
    return [
        Case("zero_bytes.mp4", b"", "empty object (0 bytes)"),
        Case("truncated.mp4", good[: len(good) // 3], "not a readable video"),
        Case(
            "random_bytes.mp4",
            np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
            "not a readable video",
        ),
        Case("text_file.mp4", b"This is a text file, not a video.\n" * 20, "not a readable video"),
        Case("no_video_stream.mp4", audio_only(), "no video stream"),
        Case("one_frame.mp4", encode(moving_square(1, 112, 112)), None),
        Case("ten_minutes.mp4", encode(moving_square(600 * 4, 192, 256), rate=4), None),
        Case("4k_frames.mp4", encode(moving_square(3, 2160, 3840)), None),
        Case("portrait.mp4", encode(moving_square(8, 224, 112)), None),
        Case("grayscale.mp4", encode(moving_square(8, 112, 112, 1)[..., 0], pix_fmt="gray", in_format="gray"), None),
        Case("variable_frame_rate.mp4", encode(moving_square(len(vfr_ms), 112, 112), pts_ms=vfr_ms), None),
        Case("vp9.webm", encode(moving_square(8, 112, 112), container="webm", codec="libvpx-vp9"), None),
        Case("mjpeg.avi", encode(moving_square(8, 112, 112), container="avi", codec="mjpeg", pix_fmt="yuvj420p"), None),
        Case("name with spaces ünïcødé 視頻.mp4", good, None),
        Case("sub/../../escape attempt.mp4", good, None),
    ]


def generate(folder: Path) -> list[Case]:
    """The cases, built in a fresh interpreter (no decord loaded) and read back."""
    folder.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "tests.pipeline.hostile", str(folder)], cwd=root, check=True)
    index = json.loads((folder / "index.json").read_text())
    return [Case(c["name"], (folder / f"{i}.bin").read_bytes(), c["error"]) for i, c in enumerate(index)]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    built = cases()
    for i, case in enumerate(built):
        (out / f"{i}.bin").write_bytes(case.data)
    (out / "index.json").write_text(json.dumps([{"name": c.name, "error": c.error} for c in built]))
