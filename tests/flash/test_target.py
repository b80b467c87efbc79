"""Loading: the real from_pretrained path, clear errors for bad checkpoints, safe defaults."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

import flash
from flash.target import SUPPORTED_MODELS


def test_load_target_reads_every_family(tiny_checkpoints):
    for name, path in tiny_checkpoints.items():
        target = flash.load_target(path, dtype=torch.float32)
        assert target.model_type == name
        assert target.dtype == torch.float32 and target.processor.tokenizer.padding_side == "left"
        # InternVL's frames are images: one context token for both
        assert target.eos_token_ids.numel() >= 1 and len(target.visual_token_ids) == (1 if name == "internvl" else 2)


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_moe_experts_take_the_eager_path_in_float64_only(tiny_checkpoints, targets64, family):
    """HF's grouped-matmul experts kernel has no float64 path: a float64 target runs the eager experts
    by itself, other dtypes keep the kernel, and in float32 both give the same tokens."""
    from tests.helpers import cases, hf_greedy

    assert set(targets64[family].model.get_experts_implementation().values()) == {"eager"}
    fast = flash.load_target(tiny_checkpoints[family], dtype=torch.float32)
    assert set(fast.model.get_experts_implementation().values()) == {"grouped_mm"}
    eager = flash.load_target(tiny_checkpoints[family], dtype=torch.float32)
    eager.model.set_experts_implementation("eager")
    assert set(eager.model.get_experts_implementation().values()) == {"eager"}
    for case in cases(family)[::5]:
        inputs = case.inputs(fast.processor)
        ref = hf_greedy(fast, inputs, 16)
        assert hf_greedy(eager, inputs, 16) == ref, case.name
        drafter = flash.FlashDrafter.for_target(eager)
        assert flash.generate(eager, drafter, inputs, max_new_tokens=16).sequences == [ref], case.name


def test_prefill_reports_features_and_visual_positions(targets64):
    import numpy as np

    target = targets64["qwen2_5_vl"]
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    inputs = target.processor(
        text=["<|im_start|>user <|vision_start|><|video_pad|><|vision_end|> what"], videos=[frames], return_tensors="pt"
    )
    session, prefill = target.prefill(inputs)
    ids = inputs["input_ids"]
    assert prefill.features.shape == (1, ids.shape[1], target.hidden_size)
    assert prefill.visual_mask.sum().item() == (ids == target.config.video_token_id).sum().item() > 0
    # Qwen's rope delta after a video is negative: the video spans fewer positions than tokens.
    assert session.rope_deltas.item() < 0


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        flash.load_target(tmp_path / "nope")


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        flash.load_target(tmp_path / "model.safetensors")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        flash.load_target(tmp_path)


def test_text_only_model_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'qwen2' model; flashcap supports vision-language models"):
        flash.load_target(tmp_path)


def test_pickled_weights_are_refused(tiny_checkpoints, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["qwen2_5_vl"], copy)
    for f in copy.glob("*.safetensors"):
        f.unlink()
    torch.save({}, copy / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no .safetensors weights.*pytorch_model.bin.*refused"):
        flash.load_target(copy)


def test_remote_code_is_never_run_by_default(tiny_checkpoints, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["qwen2_5_vl"], copy)
    marker = tmp_path / "ran"
    (copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((copy / "config.json").read_text())
    config.update(model_type="evil_vlm", auto_map={"AutoConfig": "evil.EvilConfig"})
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        flash.load_target(copy)
    assert not marker.exists()
    assert inspect.signature(flash.load_target).parameters["trust_remote_code"].default is False


def test_supported_families_are_listed():
    assert {"qwen2_5_vl", "qwen2_vl", "llava_onevision"} <= set(SUPPORTED_MODELS)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_collate_equals_the_processor_on_the_whole_batch(targets64, family):
    """Videos processed one by one (ahead of the model) and collated make the processor's own
    batch, key for key: left padding, pixels in order, grids and time steps per video."""
    from tests.helpers import cases

    target = targets64[family]
    videos = [c for c in cases(family) if c.videos is not None]
    if family == "llava_onevision":  # its processor batches videos of one frame count only
        videos = [c for c in videos if c.videos[0].shape[0] == 4]
    assert len(videos) >= 3 and len({c.prompt for c in videos}) > 1  # prompts of different lengths
    whole = target.processor(
        text=[c.prompt for c in videos], videos=[c.videos[0] for c in videos], return_tensors="pt", padding=True
    )
    parts = [c.inputs(target.processor) for c in videos]
    batch = target.collate(parts)
    assert sorted(batch.keys()) == sorted(whole.keys())
    for key in whole:
        assert torch.equal(batch[key], whole[key]), key
    assert all(torch.equal(target.collate([p])[k], p[k]) for p in parts[:2] for k in p)


def test_collate_refuses_parts_it_cannot_stack(targets64):
    target = targets64["llava_onevision"]
    from tests.helpers import cases

    two = [c for c in cases("llava_onevision") if c.videos is not None][:2]  # 2 and 4 frames
    with pytest.raises(ValueError, match="cannot batch"):
        target.collate([c.inputs(target.processor) for c in two])


def test_qwen3_vl_features_are_taken_after_deepstack(targets64, monkeypatch):
    """Qwen3-VL adds vision-tower features into its first decoder layers at the visual positions
    (DeepStack). The features a drafter learns from must be the LM head's input after that: the
    head of the prefill features gives the model's own logits at every prompt position; features
    taken without the injection do not."""
    from tests.helpers import cases

    target = targets64["qwen3_vl"]
    case = next(c for c in cases("qwen3_vl") if c.videos is not None)
    inputs = case.inputs(target.processor)
    with torch.inference_mode():
        logits = target.model(**inputs).logits
        _, prefill = target.prefill(inputs)
        assert torch.allclose(target.lm_head(prefill.features), logits, atol=1e-9)
        language_model = type(target.model.model.language_model)
        monkeypatch.setattr(language_model, "_deepstack_process", lambda self, hidden, *rest: hidden)
        _, before = target.prefill(inputs)
        assert not torch.allclose(target.lm_head(before.features), logits, atol=1e-6)
