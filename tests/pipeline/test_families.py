"""The captioning job with the families added last, end to end on local Ray: Qwen3-VL (DeepStack,
timestamps in the prompt) and Qwen3.5 (hybrid linear attention). Each tiny checkpoint captions demo
clips with a FLASH drafter self-distilled on them, and every caption equals the target's own
`model.generate()` (greedy, float64) on the same frames, while the drafter's tokens are accepted."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import flash
from demo.world import write_videos
from flash.train import distill_example, drafter_loss
from pipeline.config import DEFAULT_INSTRUCTION, RAW_PROMPT, load_config
from pipeline.decode import decode_video, video_metadata
from pipeline.run import run_job
from tests.helpers import hf_greedy

MAX_NEW = 10
FRAMES = 4
MAX_SIDE = 448


def _inputs(target: flash.Target, clip: Path):
    """The processor's batch for one clip as the caption actor builds it: the frames the job decodes,
    their metadata, the default instruction in the checkpoint's chat template."""
    frames, info = decode_video(clip.read_bytes(), FRAMES, MAX_SIDE)
    prompt = target.video_prompt(DEFAULT_INSTRUCTION if target.has_chat_template else RAW_PROMPT)
    return target.processor(
        text=[prompt],
        videos=[frames],
        video_metadata=[video_metadata(info)],
        do_sample_frames=False,
        return_tensors="pt",
    )


def _self_distilled(target: flash.Target, inputs: list, answers: list[list[int]], path: Path) -> None:
    """A drafter trained on the target's own answers (DESIGN.md §1.5) until its first slot agrees with
    the target on most positions of every answer; saved to `path`."""
    torch.manual_seed(0)
    drafter = flash.FlashDrafter.for_target(target)
    examples = [distill_example(target, x, a) for x, a in zip(inputs, answers)]
    optimizer = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(40):
        agreement = []
        for example in examples:
            loss, metrics = drafter_loss(drafter, example, noise=0.0, token_weight=1.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            agreement.append(metrics["top1_slot0"])
        if min(agreement) >= 0.75:
            break
    drafter.eval().save_pretrained(path)


# By default Qwen3.5-MoE (hybrid layers and experts, Qwen3-VL's processor) and InternVL; the rest, whose
# adapter code those share, in the slow suite
SLOW_FAMILIES = [pytest.param(f, marks=pytest.mark.slow) for f in ("qwen3_vl", "qwen3_5", "qwen3_vl_moe")]


@pytest.mark.parametrize("family", [*SLOW_FAMILIES, "qwen3_5_moe", "internvl"])
def test_pipeline_captions_with_the_family(ray_local, tiny_checkpoints, tmp_path, family):
    model = tiny_checkpoints[family]
    target = flash.load_target(model, dtype=torch.float64)
    write_videos(tmp_path / "clips", 3, seed=77)
    clips = sorted((tmp_path / "clips").glob("*.mp4"))
    inputs = [_inputs(target, clip) for clip in clips]
    answers = [hf_greedy(target, x, MAX_NEW) for x in inputs]  # the target's own greedy decoding
    _self_distilled(target, inputs, answers, tmp_path / "drafter")
    config = load_config(
        input=str(tmp_path / "clips"),
        output=str(tmp_path / "captions"),
        model=model,
        drafter=str(tmp_path / "drafter"),
        max_new_tokens=MAX_NEW,
        num_frames=FRAMES,
        max_side=MAX_SIDE,
        dtype="float64",
        batch_size=3,
        cpus_per_actor=0.5,
        cpus_per_decode=0.25,
        adaptive_block=False,  # the drafter's block every cycle: whether it drafts does not hang on timings
        report=False,
    )
    report = run_job(config, log=lambda line: None)
    assert report["errors"] == 0 and report["rows_written"] == 3
    rows = {Path(r["video_uri"]).name: r for r in pq.read_table(tmp_path / "captions").to_pylist()}
    eos = set(target.eos_token_ids.tolist())
    decode = target.processor.tokenizer.decode
    for clip, answer in zip(clips, answers):
        row = rows[clip.name]
        text = decode([t for t in answer if t not in eos], skip_special_tokens=True).strip()
        assert (row["caption"], row["num_tokens"]) == (text, len(answer)), clip.name
    # The drafter ran and its tokens were kept: more than one token per cycle on some clip.
    assert max(r["acceptance_length"] for r in rows.values()) > 1.0
