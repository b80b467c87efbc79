"""Helpers shared by the pipeline tests: buckets, clips, output reading, a test config."""

from __future__ import annotations

import io
import uuid

import boto3
import pyarrow.parquet as pq

import flash
from demo.world import PROMPT, encode_mp4, render, scene_for_seed
from pipeline.config import load_config
from pipeline.decode import decode_video, video_metadata

MAX_NEW = 12


def s3_client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint)


def new_bucket(endpoint) -> str:
    name = f"flashcap-{uuid.uuid4().hex[:10]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def upload_clips(endpoint, bucket, seeds, prefix="clips/"):
    s3 = s3_client(endpoint)
    for s in seeds:
        s3.put_object(Bucket=bucket, Key=f"{prefix}clip_{s:06d}.mp4", Body=encode_mp4(render(scene_for_seed(s))))


def read_output(endpoint, bucket, prefix="captions/"):
    s3 = s3_client(endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    tables = [
        pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=k)["Body"].read()))
        for k in keys
        if k.endswith(".parquet")
    ]
    rows = [r for t in tables for r in t.to_pylist()]
    return rows, keys


def config_for(endpoint, bucket, models, output="captions/", use_drafter=True, **extra):
    config = load_config(
        input=f"s3://{bucket}/clips/",
        output=f"s3://{bucket}/{output}",
        s3_endpoint=endpoint,
        model=models["model"],
        drafter=extra.pop("drafter", models["drafter"]),
        prompt=PROMPT,
        max_new_tokens=MAX_NEW,
        dtype="float64",
        batch_size=4,
        cpus_per_actor=0.5,
        cpus_per_decode=0.25,
        flush_rows=8,
        **extra,
    )
    return config if use_drafter else config.model_copy(update={"drafter": None})


def direct_caption(target, data: bytes) -> str:
    frames, info = decode_video(data, num_frames=8)  # the default for a checkpoint that sets no frame count
    inputs = target.processor(
        text=[PROMPT],
        videos=[frames],
        video_metadata=[video_metadata(info)],
        do_sample_frames=False,
        return_tensors="pt",
    )
    out = flash.generate(target, None, inputs, max_new_tokens=MAX_NEW)
    eos = set(target.eos_token_ids.tolist())
    return target.processor.tokenizer.decode(
        [t for t in out.sequences[0] if t not in eos], skip_special_tokens=True
    ).strip()
