"""Peak memory of decoding one large video: read whole into memory (the way every object was read
before streaming) against read where it lies (a local file from disk, an S3 object by ranged reads),
each in a fresh process whose peak resident memory (VmHWM) is the figure. The frames of every
way are checked identical.

    python -m bench.decode_memory [--mb 2048] [--side 1920x1080] [--out bench/results/decode-memory-cpu.json]

The video is Motion-JPEG of noise (large frames, quick to encode), served by a local S3-protocol
server (moto) for the S3 rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_video(path: Path, megabytes: int, width: int, height: int) -> int:
    """Motion-JPEG noise in Matroska until the file holds `megabytes`; returns the frame count."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    frames, written, target = 0, 0, megabytes << 20
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        stream.options = {"q:v": "2"}
        noise = rng.integers(0, 256, (8, height, width, 3), dtype=np.uint8)
        while written < target:
            frame = av.VideoFrame.from_ndarray(noise[frames % 8], format="rgb24")
            for packet in stream.encode(frame):
                written += packet.size
                container.mux(packet)
            frames += 1
        for packet in stream.encode():
            container.mux(packet)
    return frames


def _peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM: ru_maxrss would also count the
    parent's resident memory at the fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(way: str, decoder: str, uri: str, size: str, endpoint: str) -> None:
    """One decode in this process; prints its result and peak memory as JSON."""
    os.environ["FLASHCAP_DECODER"] = decoder
    from pipeline.decode import VideoSource, decode_video
    from pipeline.storage import S3Settings, read_object

    settings, size = S3Settings(endpoint=endpoint or None), int(size)
    started = time.perf_counter()
    if way == "whole":  # every object was read so before streaming
        source = read_object(uri, settings)
    else:
        source = (
            VideoSource.of(uri, settings, size)
            if way == "local"
            else VideoSource(uri=uri, size=size, settings=settings)
        )
    frames, info = decode_video(source, num_frames=8, max_side=448)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - started,
                "peak_rss_mb": _peak_rss_mb(),
                "frames": hashlib.sha256(frames.tobytes()).hexdigest()[:16],
                "indices": list(info.indices),
            }
        )
    )


def _measure(way: str, decoder: str, uri: str, size: int, endpoint: str) -> dict:
    cmd = [sys.executable, "-m", "bench.decode_memory", "--child", way, decoder, uri, str(size), endpoint]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{way} / {decoder} failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return {"way": way, "decoder": decoder, **json.loads(out.strip().splitlines()[-1])}


def _serve(video: Path):
    """A moto S3 server holding `video` as s3://bench/<name>; returns (server, endpoint, uri)."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    client.upload_file(str(video), "bench", video.name)
    return server, endpoint, f"s3://bench/{video.name}"


def _video(path: Path, megabytes: int, width: int, height: int) -> dict:
    started = time.perf_counter()
    frames = write_video(path, megabytes, width, height)
    info = {"bytes": path.stat().st_size, "frames": frames, "width": width, "height": height, "codec": "mjpeg"}
    print(f"{path.name}: {info['bytes'] / 2**20:.0f} MB, {frames} frames, {time.perf_counter() - started:.0f} s")
    return info


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(*sys.argv[2:6], sys.argv[6] if len(sys.argv) > 6 else "")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=2048, help="the local file's size")
    p.add_argument("--s3-mb", type=int, default=256, help="the S3 object's size (moto serves ranges slowly)")
    p.add_argument("--side", default="1920x1080")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode-memory-cpu.json"))
    args = p.parse_args(argv)
    from pipeline.decode import STREAM_ABOVE, _decord_available

    width, height = (int(v) for v in args.side.split("x"))
    work = Path(tempfile.mkdtemp(prefix="flashcap-decode-memory-"))
    local, remote = work / "large.mkv", work / "object.mkv"
    videos = {"local": _video(local, args.mb, width, height), "s3": _video(remote, args.s3_mb, width, height)}
    server, endpoint, s3_uri = _serve(remote)
    decoders = (["decord"] if _decord_available() else []) + ["pyav"]
    rows = []
    plan = [
        ("whole", s3_uri, "s3"),
        ("s3_ranged", s3_uri, "s3"),
        ("whole", str(local), "local"),
        ("local", str(local), "local"),
    ]
    for decoder in decoders:
        for way, uri, where in plan:
            rows.append({"video": where, **_measure(way, decoder, uri, videos[where]["bytes"], endpoint)})
            print(json.dumps(rows[-1]), flush=True)
    server.stop()
    same = {
        where: len({(r["frames"], tuple(r["indices"])) for r in rows if r["video"] == where}) == 1 for where in videos
    }
    result = {
        "date": date.today().isoformat(),
        "videos": videos,
        "stream_above_bytes": STREAM_ABOVE,
        "identical_frames": same,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    local.unlink()
    remote.unlink()


if __name__ == "__main__":
    main()
