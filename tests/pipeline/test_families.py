"""The captioning job with the families added last, end to end on local Ray: Qwen3-VL (DeepStack,
timestamps in the prompt) and Qwen3.5 (hybrid linear attention). Each tiny checkpoint captions
demo clips with a FLASH drafter exactly as without one, and as its own plain decoding does."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

import flash
from demo.world import write_videos
from pipeline.config import load_config
from pipeline.run import run_job


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_pipeline_captions_with_the_family(ray_local, tiny_checkpoints, tmp_path, family):
    model = tiny_checkpoints[family]
    drafter = tmp_path / "drafter"
    flash.FlashDrafter.for_target(flash.load_target(model, dtype=torch.float64)).save_pretrained(drafter)
    write_videos(tmp_path / "clips", 3, seed=77)
    captions = {}
    for side, use in (("flash", str(drafter)), ("plain", None)):
        config = load_config(
            input=str(tmp_path / "clips"),
            output=str(tmp_path / side),
            model=model,
            drafter=use,
            max_new_tokens=10,
            num_frames=4,
            dtype="float64",
            batch_size=3,
            cpus_per_actor=0.5,
            cpus_per_decode=0.25,
            report=False,
        )
        report = run_job(config, log=lambda line: None)
        assert report["errors"] == 0 and report["rows_written"] == 3
        table = pq.read_table(tmp_path / side)
        assert all(n > 0 for n in table.column("num_tokens").to_pylist())
        captions[side] = dict(zip(table.column("video_uri").to_pylist(), table.column("num_tokens").to_pylist()))
        captions[side + "_text"] = dict(zip(table.column("video_uri").to_pylist(), table.column("caption").to_pylist()))
    assert captions["flash"] == captions["plain"] and captions["flash_text"] == captions["plain_text"]
