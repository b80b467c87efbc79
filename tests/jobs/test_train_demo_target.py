"""train_demo_target.py: a from-scratch run writes a loadable checkpoint, resumes from its
state, and with --ema evaluates and saves the averaged weights, not the live ones."""

from __future__ import annotations

import json

import torch

import flash
from jobs import train_demo_target


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def test_trains_saves_the_average_and_resumes(tmp_path):
    out = tmp_path / "target"
    common = ["--out", str(out), "--batch", "2", "--eval-every", "2", "--eval-clips", "1", "--ema", "0.5"]
    train_demo_target.main([*common, "--steps", "2", "--lr", "1e-3"])

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

    train_demo_target.main([*common, "--steps", "4", "--lr", "1e-3", "--resume"])
    log = json.loads((out / "training_log.json").read_text())
    assert [entry["step"] for entry in log["log"]] == [2, 4]
    resumed = torch.load(out / "train_state" / "state.pt", weights_only=False)
    assert resumed["step"] == 4
    assert any(not torch.equal(resumed["ema"]["shadow"][n], shadow[n]) for n in shadow)
