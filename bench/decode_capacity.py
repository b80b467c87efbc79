"""Decode capacity: seconds to decode one video on one core, across frame sizes, lengths, keyframe
intervals and sampling rates, with each decoder (decord seeks to the keyframe before each sampled
frame; PyAV decodes one sequential pass up to the last sampled frame). Clips are synthetic H.264
(moving shapes over a gradient, x264 `veryfast`), written once; each case is timed `--repeats`
times in this process (one decode thread, as decode tasks run) and the median kept.

    python -m bench.decode_capacity [--lengths 10,60] [--sides 640x360,1280x720,1920x1080]
                                    [--keyframes-s 1,8] [--repeats 3] [--out bench/results/decode-capacity-cpu.json]

The figures size the CPU decode pool beside the GPUs (docs/benchmarks.md, "Decode capacity").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FPS = 30
SAMPLINGS = {"8 frames": dict(num_frames=8), "2 fps (<= 64)": dict(fps=2.0, max_frames=64)}


def write_clip(path: Path, seconds: int, width: int, height: int, keyframe_s: int) -> None:
    import av

    frames = seconds * FPS
    y, x = np.mgrid[0:height, 0:width]
    base = ((x + y) * 255 // (width + height)).astype(np.uint8)
    side = max(8, height // 6)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "g": str(keyframe_s * FPS), "keyint_min": str(keyframe_s * FPS),
                          "sc_threshold": "0", "crf": "23"}  # fmt: skip
        for t in range(frames):
            image = np.stack([base, np.roll(base, t * 3, axis=1), 255 - base], axis=-1)
            top, left = (t * 5) % (height - side), (t * 7) % (width - side)
            image[top : top + side, left : left + side] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def time_decode(path: Path, decoder: str, sampling: dict, repeats: int) -> float:
    import os

    from pipeline.decode import DECODER_ENV, VideoSource, decode_video
    from pipeline.storage import S3Settings

    os.environ[DECODER_ENV] = decoder
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        decode_video(VideoSource.of(str(path), S3Settings()), max_side=448, **sampling)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="10,60")
    p.add_argument("--sides", default="640x360,1280x720,1920x1080")
    p.add_argument("--keyframes-s", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode-capacity-cpu.json"))
    args = p.parse_args(argv)
    import torch

    from pipeline.decode import _decord_available

    torch.set_num_threads(1)
    decoders = (["decord"] if _decord_available() else []) + ["pyav"]
    work = Path(tempfile.mkdtemp(prefix="flashcap-decode-capacity-"))
    rows = []
    for side in args.sides.split(","):
        width, height = (int(v) for v in side.split("x"))
        for seconds in (int(s) for s in args.lengths.split(",")):
            for keyframe_s in (int(k) for k in args.keyframes_s.split(",")):
                path = work / f"{side}-{seconds}s-k{keyframe_s}.mp4"
                write_clip(path, seconds, width, height, keyframe_s)
                for sampling, kwargs in SAMPLINGS.items():
                    row = {"side": side, "seconds": seconds, "keyframe_s": keyframe_s, "sampling": sampling,
                           "mb": round(path.stat().st_size / 2**20, 2)}  # fmt: skip
                    for decoder in decoders:
                        row[f"{decoder}_s"] = round(time_decode(path, decoder, kwargs, args.repeats), 4)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                path.unlink()
    Path(args.out).write_text(json.dumps({"date": date.today().isoformat(), "fps": FPS, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
