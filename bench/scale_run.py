"""A real run over many small objects on an S3-protocol server (moto, in its own process on
127.0.0.1): the demo target and drafter caption N objects (copies of a few demo clips under distinct
keys, spread over sub-prefixes so the listing fans out), then a rerun plans nothing. Prints the job
report's figures and the driver's peak RSS (the driver process alone: the S3 server holds the
objects in its own memory).

    python -m bench.scale_run [--objects 10000] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import CaptionConfig

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _start_s3_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free local port, with the bucket `scale` made; the process and its URL."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        try:
            s3.create_bucket(Bucket="scale")
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.2)
    return server, endpoint


def _upload(endpoint: str, objects: int) -> float:
    """`objects` copies of 16 demo clips under distinct keys in 100 sub-prefixes; the seconds it took."""
    import boto3

    from demo.world import encode_mp4, render, scene_for_seed

    s3 = boto3.client("s3", endpoint_url=endpoint)
    clips = [encode_mp4(render(scene_for_seed(seed))) for seed in range(9000, 9016)]
    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: s3.put_object(
                    Bucket="scale", Key=f"clips/{i % 100:02d}/{i:06d}.mp4", Body=clips[i % len(clips)]
                ),
                range(objects),
            )
        )
    return time.time() - started


def _run_sampling_rss(config: CaptionConfig) -> tuple[dict, float, list[tuple[float, float]]]:
    """The job run once with the driver's RSS sampled every second: its report, its seconds, and the
    samples as (seconds into the run, driver RSS MB)."""
    from pipeline.run import run_job

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    started = time.time()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((time.time() - started, _rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    report = run_job(config, log=lambda line: print(line, flush=True))
    run_s = time.time() - started
    stop.set()
    sampler.join()
    return report, run_s, samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=10_000)
    p.add_argument("--out")
    args = p.parse_args(argv)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import ray

    from pipeline.config import load_config
    from pipeline.run import run_job

    server, endpoint = _start_s3_server()
    uploaded_s = _upload(endpoint, args.objects)
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    config = load_config(
        input="s3://scale/clips/",
        output="s3://scale/captions/",
        s3_endpoint=endpoint,
        model=str(ROOT / "models" / "demo-target"),
        drafter=str(ROOT / "models" / "demo-drafter"),
        cpus_per_actor=1.0,
        cpus_per_decode=0.5,
        report=False,
    )
    rss_before_run = _rss_mb()
    report, run_s, samples = _run_sampling_rss(config)
    quarter = max(1, len(samples) // 4)
    again = run_job(config, log=lambda line: None)
    result = {
        "date": date.today().isoformat(),
        "objects": args.objects,
        "upload_s": uploaded_s,
        "run_s": run_s,
        **{k: report[k] for k in ("rows_written", "errors", "missing", "clips_per_s", "steady_clips_per_s")},
        "parts": len(report["parts"]),
        "rerun_expected_rows": again["to_caption"],
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver_rss_mb_before_run": rss_before_run,
        "driver_rss_mb_peak_first_quarter": max(r for _, r in samples[:quarter]),
        "driver_rss_mb_peak_last_quarter": max(r for _, r in samples[-quarter:]),
        "driver_rss_mb_end": samples[-1][1],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ray.shutdown()
    server.terminate()


if __name__ == "__main__":
    main()
