"""train_drafter.py: self-distillation on 2 Ray Train workers, checkpoints, resume, --steps 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash
from flash.train import DistillExample, draft_vocabulary
from jobs.demo_world import PROMPT, write_videos

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "jobs" / "train_drafter.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_steps_zero_writes_an_untrained_drafter(tiny_checkpoints, tmp_path):
    _run("--model", tiny_checkpoints["qwen2_5_vl"], "--out", str(tmp_path / "d"), "--steps", "0", "--text-only")
    target = flash.load_target(tiny_checkpoints["qwen2_5_vl"])
    drafter = flash.FlashDrafter.from_pretrained(tmp_path / "d", target)
    assert drafter.config.use_visual_latents is False


def test_trains_on_two_workers_and_resumes(tiny_checkpoints, tmp_path):
    videos = tmp_path / "videos"
    write_videos(videos, 6, seed=1_000_000)
    out = tmp_path / "drafter"
    common = [
        "--model",
        tiny_checkpoints["qwen2_5_vl"],
        "--videos",
        str(videos),
        "--out",
        str(out),
        "--workers",
        "2",
        "--batch",
        "2",
        "--checkpoint-every",
        "2",
        "--max-new-tokens",
        "12",
        "--draft-vocab",
        "24",
    ]
    _run(*common, "--steps", "4")
    first = json.loads((out / "training_summary.json").read_text())
    assert first["metrics"]["step"] == 4
    checkpoints = sorted((out / "ray_train").glob("*/checkpoint_*"))
    assert len(checkpoints) >= 2
    target = flash.load_target(tiny_checkpoints["qwen2_5_vl"])
    before = flash.FlashDrafter.from_pretrained(out, target)
    # The draft vocabulary: picked from the target's own answers in the distillation set, saved with the drafter.
    examples = [DistillExample.from_dict(d) for d in torch.load(out / "distill.pt", weights_only=True)["examples"]]
    expected = draft_vocabulary(examples, 24, target.eos_token_ids, target.vocab_size)
    assert before.config.draft_vocab_size == 24 and torch.equal(before.draft_ids, expected)

    resumed = _run(*common, "--steps", "6", "--resume")
    assert "no checkpoint to resume from" not in resumed.stdout
    second = json.loads((out / "training_summary.json").read_text())
    assert second["metrics"]["step"] == 6
    after = flash.FlashDrafter.from_pretrained(out, flash.load_target(tiny_checkpoints["qwen2_5_vl"]))
    changed = any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert changed and torch.equal(after.draft_ids, expected)


def test_draft_vocab_needs_the_distillation_set(tiny_checkpoints, tmp_path):
    from jobs.train_drafter import main

    with pytest.raises(SystemExit):
        main(["--model", tiny_checkpoints["qwen2_5_vl"], "--out", str(tmp_path), "--steps", "0", "--draft-vocab", "8"])
    assert not (tmp_path / "drafter.safetensors").exists()


def test_distill_set_is_rebuilt_when_the_target_or_clips_change(tiny_checkpoints, tmp_path):
    """A self-distillation set records what made it: reused only for the same target, clips and settings.

    (A stale set silently trains the drafter on another target's answers and features.)"""
    import shutil

    from flash.build import build_qwen2_5_vl
    from jobs.train_drafter import load_or_build_distill

    videos = tmp_path / "videos"
    write_videos(videos, 2, seed=1_000_000)
    first = tiny_checkpoints["qwen2_5_vl"]
    path = tmp_path / "distill.pt"
    settings = dict(prompt=PROMPT, frames=4, max_new_tokens=6)

    examples, built = load_or_build_distill(path, first, videos, **settings)
    assert built and len(examples) == 2
    again, built = load_or_build_distill(path, first, videos, **settings)
    assert not built and [e["input_ids"].tolist() for e in again] == [e["input_ids"].tolist() for e in examples]

    # Another target (same config, other weights), then one whose weights are the first's (content, not
    # the directory name, decides), then that directory retrained in place.
    other = build_qwen2_5_vl(tmp_path / "other", seed=12345)
    rebuilt, built = load_or_build_distill(path, str(other), videos, **settings)
    assert built
    assert any(not torch.equal(a["features"], b["features"]) for a, b in zip(rebuilt, examples))
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    _, built = load_or_build_distill(path, str(copy), videos, **settings)
    assert built
    _, built = load_or_build_distill(path, first, videos, **settings)
    assert not built
    shutil.copy(other / "model.safetensors", copy / "model.safetensors")
    _, built = load_or_build_distill(path, str(copy), videos, **settings)
    assert built

    # A clip added, and other generation settings.
    write_videos(videos, 3, seed=1_000_000)
    examples, built = load_or_build_distill(path, str(copy), videos, **settings)
    assert built and len(examples) == 3
    _, built = load_or_build_distill(path, str(copy), videos, **{**settings, "max_new_tokens": 7})
    assert built

    # A set in the old format (a bare list) is rebuilt, not trusted.
    torch.save(examples, path)
    _, built = load_or_build_distill(path, str(copy), videos, **{**settings, "max_new_tokens": 7})
    assert built
