"""speedup.py end to end on a few held-out clips: the report's schema, every
method present, outputs identical to plain decoding, and no speed asserted."""

from __future__ import annotations

import json

import pytest

from bench import speedup


def _report(tmp_path, *flags: str) -> tuple[dict, dict]:
    out = tmp_path / "report.json"
    common = ["--out", str(out), "--repeats", "1", "--warmup", "0", "--batch-sizes", "1,2", "--clips", "2"]
    speedup.main([*common, *flags])
    report = json.loads(out.read_text())
    return report, {(r["method"], r["batch_size"]): r for r in report["rows"]}


def test_report_has_every_method_and_identical_outputs(tmp_path):
    report, rows = _report(tmp_path)
    assert {"machine", "date", "rows", "best", "best_plain", "best_vs_best", "sweep"} <= report.keys()
    continuous = {"target_continuous", "flash_continuous"}
    assert set(rows) == {(m, 1) for m in speedup.METHODS} | {
        (m, 2) for m in {"target", "hf_generate", "flash", "flash_adaptive", *continuous}
    }
    for (method, batch), row in rows.items():
        if method == "prompt_lookup" and not row["clips"]:
            assert row["error"]  # Hugging Face's own prompt lookup may fail on video prompts: recorded
            continue
        # every row decodes every clip, each checked against itself decoded alone
        assert row["clips"] == 2 and row["identical"] == 1.0, (method, batch)
        assert row["tokens_per_s"] > 0 and row["speedup"] > 0 and row["clips_per_s"] > 0
        assert row["spread"][0] <= row["tokens_per_s"] <= row["spread"][1], (method, batch)
        if "verify_ms_per_pass" in row:
            assert abs(sum(row["split"].values()) - 1) < 1e-9
        if method in ("flash", "flash_adaptive", "flash_text_only", "prompt_lookup_loop"):
            assert row["acceptance_length"] >= 1.0 and "draft_ms_per_pass" in row and "verify_ms_per_pass" in row
    assert rows[("flash", 1)]["acceptance_length"] > rows[("prompt_lookup_loop", 1)]["acceptance_length"]
    # the sweep would go on at batch 4 where a method still rose at 2, but there are only 2 clips
    assert report["sweep"]["batch_sizes"] == [1, 2]


@pytest.mark.slow
def test_compiled_rows_sit_beside_eager_ones_with_identical_outputs(tmp_path):
    _, rows = _report(tmp_path, "--compile", "--compile-backend", "aot_eager")
    compiled = {"target_compiled", "flash_compiled"}
    assert {(m, 1) for m in compiled} | {(m, 2) for m in {*compiled, "target_continuous_compiled"}} <= set(rows)
    for (method, _), row in rows.items():
        if method.endswith("_compiled"):
            assert row["clips"] == 2 and row["identical"] == 1.0, method


def test_the_sweep_goes_on_while_a_method_still_rises():
    def row(method, batch, tokens_per_s):
        return {"method": method, "batch_size": batch, "clips": 8, "tokens_per_s": tokens_per_s}

    assert speedup._rising([row("target", 1, 10), row("target", 4, 40), row("flash", 4, 50)], 4) == ["flash", "target"]
    assert speedup._rising([row("target", 1, 10), row("target", 4, 9), row("flash", 1, 50)], 4) == []


def test_a_batch_larger_than_the_clips_is_refused(tmp_path):
    """Batch 64 over 32 clips would decode the batch-32 batch again, under another name."""
    with pytest.raises(SystemExit):
        speedup.main(["--out", str(tmp_path / "r.json"), "--clips", "32", "--batch-sizes", "1,16,32,64"])


def test_best_vs_best_takes_each_method_at_its_best_batch_size():
    def row(method, batch, tokens_per_s, identical=1.0):
        keys = ("method", "batch_size", "clips", "identical", "tokens_per_s", "clips_per_s")
        return dict(zip(keys, (method, batch, 4, identical, tokens_per_s, tokens_per_s / 50)))

    rows = [
        row("target", 1, 100),
        row("target", 16, 400),
        row("hf_generate", 16, 380),
        row("flash", 1, 250),
        row("flash", 16, 520),
        row("flash", 32, 900, identical=0.75),
    ]
    summary = speedup.best_vs_best(rows)
    assert summary["best_plain"] == "target"
    rows.append(row("hf_generate", 32, 450, identical=0.97))  # a plain method counts whatever its identity
    assert speedup.best_vs_best(rows)["best_plain"] == "hf_generate"
    assert summary["best"]["flash"]["batch_size"] == 16  # the batch-32 row changed outputs: never a best
    assert summary["best_vs_best"]["flash"] == 520 / 400


def test_world_v2_takes_its_own_models_prompt_frames_and_budget(tmp_path, monkeypatch):
    from demo import world_v2 as demo_world_v2

    seen = {}

    def run(args):
        seen.update(vars(args))
        return {"rows": []}

    monkeypatch.setattr(speedup, "run", run)
    monkeypatch.setattr(speedup, "markdown", lambda report: "")
    speedup.main(["--world", "v2", "--out", str(tmp_path / "r.json")])
    assert seen["model"].endswith("models/demo-v2-target") and seen["drafter"].endswith("models/demo-v2-drafter")
    assert seen["text_drafter"].endswith("models/demo-v2-drafter-text-only")
    assert (seen["prompt"], seen["frames"], seen["max_new_tokens"]) == (demo_world_v2.PROMPT, 16, 200)
    speedup.main(["--world", "v2", "--max-new-tokens", "40", "--out", str(tmp_path / "r.json")])
    assert seen["max_new_tokens"] == 40  # a flag given wins
