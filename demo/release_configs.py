"""The shapes of released targets (their config.json, the fields that size weights and caches), so
placement plans and cost models run on real shapes without downloading a checkpoint. Sizes only:
nothing here holds weights.
"""

from __future__ import annotations

from demo.tiny_models import QWEN2_5_VL_7B_TEXT

QWEN2_5_VL_7B = {
    "model_type": "qwen2_5_vl",
    "text_config": {"model_type": "qwen2_5_vl_text", **QWEN2_5_VL_7B_TEXT},
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "tie_word_embeddings": False,
}

QWEN2_5_VL_72B = {
    "model_type": "qwen2_5_vl",
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        **QWEN2_5_VL_7B_TEXT,
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
    "vision_config": {**QWEN2_5_VL_7B["vision_config"], "intermediate_size": 3456, "out_hidden_size": 8192},
    "image_token_id": 151655,
    "video_token_id": 151656,
    "tie_word_embeddings": False,
}

QWEN3_VL_30B_A3B = {
    "model_type": "qwen3_vl_moe",
    "text_config": {
        "model_type": "qwen3_vl_moe_text",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "model_type": "qwen3_vl_moe",
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}

RELEASES = {
    "Qwen2.5-VL-7B-Instruct": QWEN2_5_VL_7B,
    "Qwen2.5-VL-72B-Instruct": QWEN2_5_VL_72B,
    "Qwen3-VL-30B-A3B-Instruct": QWEN3_VL_30B_A3B,
}


def release_config(name: str):
    """The Hugging Face config object of a released target, by its hub name."""
    from transformers import AutoConfig

    fields = dict(RELEASES[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
