"""`load_target_head`: only the token embedding and the LM head of a checkpoint, equal to the full
model's, in every tensor layout, and at Qwen2.5-VL-7B's vocabulary shape nothing else in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import flash
from flash.target import _head_tensor_names


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "qwen3_vl_moe", "internvl"])
def test_head_equals_the_full_targets(tiny_checkpoints, family):
    target = flash.load_target(tiny_checkpoints[family])
    head = flash.load_target_head(tiny_checkpoints[family])
    assert torch.equal(head.embed_tokens.weight, target.embed_tokens.weight)
    assert torch.equal(head.lm_head.weight, target.lm_head.weight)
    assert (head.hidden_size, head.vocab_size, head.model_type) == (
        target.hidden_size,
        target.vocab_size,
        target.model_type,
    )
    assert torch.equal(head.eos_token_ids, target.eos_token_ids)
    # A drafter built on the head loads on the full target and drafts with the same weights.
    drafter = flash.FlashDrafter.for_target(head)
    assert drafter.config.num_heads == target.config.get_text_config().num_attention_heads


def test_tensor_names_of_every_layout():
    assert _head_tensor_names(["lm_head.weight", "model.embed_tokens.weight", "visual.x"], False) == (
        "model.embed_tokens.weight",
        "lm_head.weight",
    )
    assert _head_tensor_names(["language_model.lm_head.weight", "language_model.model.embed_tokens.weight"], False)[
        1
    ] == ("language_model.lm_head.weight")
    tied = _head_tensor_names(["model.language_model.embed_tokens.weight"], True)
    assert tied == ("model.language_model.embed_tokens.weight",) * 2
    with pytest.raises(ValueError, match="no lm_head"):
        _head_tensor_names(["model.language_model.embed_tokens.weight"], False)


def test_sharded_and_tied_checkpoints(tiny_checkpoints, tmp_path):
    """The release layout: weights in shards with an index, the head tied to the embedding (3B)."""
    import shutil

    src = tiny_checkpoints["qwen2_5_vl"]
    shutil.copytree(src, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file({n: state[n] for n in part}, str(tmp_path / "m" / f"model-0000{i + 1}-of-00002.safetensors"))
    head = flash.load_target_head(tmp_path / "m")
    assert torch.equal(head.lm_head.weight, state["lm_head.weight"])

    state.pop("lm_head.weight")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    tied = flash.load_target_head(tmp_path / "m")
    assert tied.lm_head.weight is tied.embed_tokens.weight


_MEASURE = """
import json, resource, sys, torch
import flash
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
head = flash.load_target_head(sys.argv[1], dtype=torch.bfloat16)
head.embed_tokens.weight.sum(), head.lm_head.weight.sum()  # every page read (weights may be memory-mapped)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = (head.embed_tokens.weight, head.lm_head.weight)
held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in weights}
print(json.dumps({"grew_mb": (after - before) / 1024, "held_mb": sum(held.values()) / 2**20,
                  "embed": list(head.embed_tokens.weight.shape),
                  "head": list(head.lm_head.weight.shape), "dtype": str(head.dtype),
                  "eos": head.eos_token_ids.tolist()}))
"""


@pytest.mark.slow  # 20 s at 152k x 3584
def test_real_vocabulary_shape_holds_only_embedding_and_head(tmp_path):
    """A checkpoint with Qwen2.5-VL-7B's vocabulary (152,064) and width (3,584): the embedding and the
    head (1.09 GB each in bfloat16) and a 1.09 GB decoder weight beside them. A fresh process
    reading the head holds the two tensors and, touching every byte of them, grows by less than the
    three would take. (File-backed pages may be evicted, so the growth is only an upper bound.)"""
    from demo.tiny_models import QWEN2_5_VL_7B_TEXT

    vocab, hidden = QWEN2_5_VL_7B_TEXT["vocab_size"], QWEN2_5_VL_7B_TEXT["hidden_size"]
    assert (vocab, hidden) == (152064, 3584)
    config = {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": {"model_type": "qwen2_5_vl_text", **QWEN2_5_VL_7B_TEXT},
        "vision_config": {"model_type": "qwen2_5_vl_vision", "out_hidden_size": hidden},
        "eos_token_id": 151645,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensor = torch.empty(vocab, hidden, dtype=torch.bfloat16)
    save_file({"model.language_model.embed_tokens.weight": tensor}, str(tmp_path / "model-00001-of-00003.safetensors"))
    save_file({"lm_head.weight": tensor}, str(tmp_path / "model-00002-of-00003.safetensors"))
    save_file(
        {"model.language_model.layers.0.mlp.up_proj.weight": tensor.view(-1, hidden)},
        str(tmp_path / "model-00003-of-00003.safetensors"),
    )
    del tensor
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=300, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["embed"] == got["head"] == [vocab, hidden] and got["dtype"] == "torch.bfloat16"
    two = 2 * vocab * hidden * 2 / 2**20  # MiB
    assert got["held_mb"] == two  # it holds the two tensors...
    assert got["grew_mb"] < two + 600, got  # ...and never read the third (another 1,040 MiB)
