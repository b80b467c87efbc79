"""train_target.py: a from-scratch run writes a loadable checkpoint, resumes from its
state, and with --ema evaluates and saves the averaged weights, not the live ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flash
from demo import train_target


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def test_trains_saves_the_average_and_resumes(tmp_path):
    out = tmp_path / "target"
    common = ["--out", str(out), "--batch", "2", "--eval-every", "2", "--eval-clips", "1", "--ema", "0.5"]
    train_target.main([*common, "--steps", "2", "--lr", "1e-3"])

    log = json.loads((out / "training_log.json").read_text())
    assert [entry["step"] for entry in log["log"]] == [2] and log["ema"] == 0.5
    state = torch.load(out / "train_state" / "state.pt", weights_only=False)
    saved = _params(flash.load_target(out).model)  # from_pretrained on the written directory
    shadow, live = state["ema"]["shadow"], state["model"]
    assert saved.keys() == shadow.keys()
    for name, weight in saved.items():
        torch.testing.assert_close(weight, shadow[name], rtol=0, atol=0)
    # The average lags the live weights: two steps at lr 1e-3 moved them away from it.
    assert any(not torch.equal(shadow[name], live[name]) for name in shadow)

    train_target.main([*common, "--steps", "4", "--lr", "1e-3", "--resume"])
    log = json.loads((out / "training_log.json").read_text())
    assert [entry["step"] for entry in log["log"]] == [2, 4]
    resumed = torch.load(out / "train_state" / "state.pt", weights_only=False)
    assert resumed["step"] == 4
    assert any(not torch.equal(resumed["ema"]["shadow"][n], shadow[n]) for n in shadow)


def test_worker_batches_follow_the_per_step_seeds_in_order(tmp_path):
    """--data-workers: batches come back in step order, each drawn from its own (seed, step), so a
    resumed run continues the same stream whatever the number of workers."""
    import numpy as np

    target = flash.load_target(Path(__file__).resolve().parents[2] / "models" / "demo-target")
    got = list(train_target.batches(target.processor, target.path, None, 7, 3, 5, 2, workers=2))
    assert len(got) == 3
    for step, (inputs, labels) in zip(range(3, 6), got):
        want_inputs, want_labels = train_target.training_batch(target.processor, np.random.default_rng([7, step]), 2)
        assert torch.equal(labels, want_labels)
        assert torch.equal(inputs["pixel_values_videos"], want_inputs["pixel_values_videos"])


def test_rendered_evaluation_on_a_device_flag(tmp_path):
    out = tmp_path / "target"
    train_target.main(
        ["--out", str(out), "--batch", "2", "--steps", "1", "--eval-clips", "1", "--device", "cpu", "--eval-rendered"]
    )
    log = json.loads((out / "training_log.json").read_text())
    assert log["eval_frames"] == "rendered" and log["device"] == "cpu" and len(log["log"]) == 1


def test_object_weights_set_the_mix_of_scenes():
    import numpy as np
    import pytest

    rng = np.random.default_rng(0)
    assert {len(s.objects) for s in train_target.training_scenes(rng, 20, (0, 0, 1))} == {3}
    assert {len(s.objects) for s in train_target.training_scenes(rng, 20, (1, 0, 0))} == {1}
    counts = np.bincount([len(s.objects) for s in train_target.training_scenes(rng, 600, (1, 1, 2))], minlength=4)
    assert 250 < counts[3] < 350 and 100 < counts[1] < 200 and 100 < counts[2] < 200
    # Without weights: the world's own mix, drawn as before (the stream of a resumed run is unchanged).
    plain = train_target.training_scenes(np.random.default_rng(5), 4)
    seeds = np.random.default_rng(5).integers(train_target.TRAIN_SEED_START, 2**31 - 1, size=4)
    assert [s.seed for s in plain] == seeds.tolist()
    for bad in [(1, 1), (0, 0, 0), (1, -1, 1)]:
        with pytest.raises(ValueError, match="object weights"):
            train_target.training_scenes(rng, 1, bad)


@pytest.mark.slow  # 12 s
def test_world_v2_trains_and_scores_clauses(tmp_path):
    from demo import world_v2 as demo_world_v2

    out = tmp_path / "v2"
    train_target.main(
        ["--world", "v2", "--out", str(out), "--batch", "2", "--steps", "1", "--eval-clips", "1", "--eval-rendered"]
    )
    log = json.loads((out / "training_log.json").read_text())
    assert log["world"] == "v2" and log["sizes"]["num_frames"] == demo_world_v2.SAMPLED_FRAMES
    assert 0.0 <= log["log"][0]["clause_accuracy"] <= 1.0 and "best_clause_accuracy" in log
    assert set(log["log"][0]["clauses"]) >= {"clauses", "events_in_place", "events_anywhere", "colour", "place"}
    # Evaluation only, on other held-out seeds: the checkpoint is scored, not trained.
    weights = (out / "model.safetensors").read_bytes()
    train_target.main(["--world", "v2", "--out", str(out), "--evaluate", "3-4", "--eval-rendered"])
    report = json.loads((out / "heldout_eval.json").read_text())
    assert report["seeds"] == [3, 4] and [r["seed"] for r in report["rows"]] == [3, 4]
    assert 0.0 <= report["clauses"]["clauses"] <= 1.0 and (out / "model.safetensors").read_bytes() == weights
    target = flash.load_target(out)
    assert set(demo_world_v2.vocabulary()) <= set(target.processor.tokenizer.get_vocab())
