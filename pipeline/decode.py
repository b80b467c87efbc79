"""Reading and decoding one video in a CPU task: bytes from storage, decord
from memory (no temporary files), evenly sampled frames, downscaled so the
longer side fits `max_side`. Any failure becomes an `error` on the row."""

from __future__ import annotations

import io
import os
import re
import socket
import time

import numpy as np

from pipeline import faults
from pipeline.ledger import Guard
from pipeline.storage import S3Settings, read_object


def sample_indices(total: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices over `total` frames (fewer if the video is shorter)."""
    if total <= 0:
        return []
    return np.linspace(0, total - 1, num=min(count, total)).round().astype(int).tolist()


def probe(data: bytes) -> tuple[int, int]:
    """Check with PyAV (headers only) that the bytes hold a container with a video stream, so that
    non-videos get a clear error and never reach decord (which echoes the bytes it fails on).
    Returns the first video stream's (width, height)."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise ValueError(f"no video stream (the file holds: {', '.join(kinds)})")
            stream = container.streams.video[0]
            return stream.codec_context.width, stream.codec_context.height
    except av.error.FFmpegError as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise ValueError(f"not a readable video: {len(data)} bytes, no container ffmpeg can open ({reason})") from None


def _decord_message(err: Exception) -> str:
    """decord's errors start with a source location and may quote the input: keep the reason only."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return text[:300]


def sample_frames(
    data: bytes, num_frames: int = 8, max_side: int = 448, fps: float | None = None, max_frames: int = 64
) -> np.ndarray:
    """Decode video bytes and sample frames: uint8 [T, H, W, 3]."""
    import decord

    if not data:
        raise ValueError("empty object (0 bytes)")
    width, height = probe(data)
    try:
        size = {}
        scale = max_side / max(height, width, 1)
        if scale < 1:  # decode straight to the smaller size: 4K frames are never converted whole
            size = dict(width=max(2, round(width * scale) // 2 * 2), height=max(2, round(height * scale) // 2 * 2))
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1, **size)
        total = len(reader)
        if total == 0:
            raise ValueError("the video has no frames")
        count = num_frames
        if fps is not None:
            duration = total / max(reader.get_avg_fps(), 1e-6)
            count = max(1, min(max_frames, int(duration * fps)))
        # Only the sampled frames are kept; memory is bounded by count x the scaled frame size.
        return reader.get_batch(sample_indices(total, count)).asnumpy()
    except ValueError:
        raise
    except Exception as err:  # decord's own errors: the reason without source paths or quoted bytes
        raise ValueError(f"video could not be decoded: {_decord_message(err)}") from None


def decode_row(
    row: dict,
    settings: S3Settings,
    num_frames: int,
    max_side: int,
    fps: float | None,
    max_frames: int,
    max_bytes: int,
    ledger=None,
    max_crashes: int = 3,
) -> dict:
    """Ray Data map: a listed object -> the same row with frames (bytes + shape) or an error."""
    started = time.perf_counter()
    out = dict(row, frames=b"", frames_shape=[0, 0, 0, 0], error="")
    guard = Guard(ledger, "decode", max_crashes, f"{socket.gethostname()}:{os.getpid()}")
    crashes = guard.begin([row])[0]
    try:
        if guard.gave_up(crashes):
            out["error"] = guard.message(crashes)
        else:
            faults.maybe_crash("decode", [row])
            if row["size"] > max_bytes:
                raise ValueError(f"object is {row['size']} bytes, over max_video_bytes={max_bytes}")
            frames = sample_frames(read_object(row["video_uri"], settings), num_frames, max_side, fps, max_frames)
            out["frames"], out["frames_shape"] = frames.tobytes(), list(frames.shape)
    except Exception as err:  # any failure on one input must become that input's error row
        out["error"] = f"decode failed: {type(err).__name__}: {err}"[:2000]
    finally:
        guard.done([row])
    out["decode_s"] = time.perf_counter() - started
    return out


def frames_of(row: dict) -> np.ndarray:
    # A writable copy: torch refuses to wrap read-only buffers without a warning.
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"]).copy()
