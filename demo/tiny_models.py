"""Build small checkpoints from configs, offline: a word-level tokenizer, the
family's own processor and a freshly initialised Hugging Face VLM, all saved in
one directory that `flash.load_target` reads back like any hub checkpoint.

Used by the tests (tiny models) and by the demo-target training job (a small
real model trained from scratch). Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_OV_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# Words every tiny model knows, so prompts in tests read like prompts.
BASE_WORDS = (
    "user assistant system describe the video image in detail what is shown a an of and "
    "one two three red green blue yellow circle square triangle moves left right up down "
    "still grows shrinks bounces on background black white gray small large . , ? !"
).split()


# The chat template Qwen2-VL / Qwen2.5-VL releases ship (chat_template.jinja), for checkpoints shaped like them.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-VL-7B-Instruct's text model (config.json of the release).
QWEN2_5_VL_7B_TEXT = dict(
    vocab_size=152_064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128_000,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151645,
)


# Qwen2.5-VL-7B-Instruct's generation_config.json sampling settings (top_k 1: greedy in effect).
QWEN2_5_VL_RELEASE_GENERATION = {
    "do_sample": True,
    "temperature": 0.1,
    "top_k": 1,
    "top_p": 0.001,
    "repetition_penalty": 1.05,
}


def word_tokenizer(words: Sequence[str], special: Sequence[str], eos: str, pad: str) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer: one id per word, specials first."""
    vocab: dict[str, int] = {}
    for token in [*special, "<unk>", *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # "moves right ." round-trips
    tok.add_special_tokens(list(special))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token=eos, pad_token=pad, padding_side="left"
    )


def bpe_tokenizer(words: Sequence[str], special: Sequence[str], eos: str, pad: str):
    """A byte-level BPE tokenizer of the Qwen3.5 class (what transformers loads for a qwen3_5
    checkpoint, whatever its tokenizer_config says): every byte a token, merges that make each word
    (and " word") one token, specials first. Unknown text falls back to bytes, as in the releases."""
    from transformers import Qwen3_5Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*special, *alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    space = bytes_to_unicode()[ord(" ")]
    for word in words:
        for form in (word, space + word):
            if len(form) < 2 or form in vocab:
                continue
            left = form[0]
            for ch in form[1:]:
                merged = left + ch
                if merged not in vocab:
                    merges.append((left, ch))
                    vocab[merged] = len(vocab)
                left = merged
    tokenizer = Qwen3_5Tokenizer(vocab=vocab, merges=merges, unk_token=pad, eos_token=eos, pad_token=pad)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    tokenizer.padding_side = "left"
    return tokenizer


def _round_up(n: int, multiple: int = 16) -> int:
    return (n + multiple - 1) // multiple * multiple


def _tokenizer_and_ids(make_tokenizer, words: Sequence[str], special: Sequence[str]) -> tuple:
    """The family's tokenizer (<|im_end|> ends a turn, <|endoftext|> pads) and its special tokens' ids."""
    tokenizer = make_tokenizer(words, special, eos="<|im_end|>", pad="<|endoftext|>")
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in special}


def _text_config(tokenizer, ids: dict, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads) -> dict:
    """The decoder settings every family's text config shares: sizes, context and special ids."""
    return dict(
        vocab_size=_round_up(len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _mrope_section(half: int) -> list[int]:
    """mrope splits `half` rotary frequencies over (t, h, w): a quarter each to h and w."""
    return [half - 2 * (half // 4), half // 4, half // 4]


def _seeded_model(model_class, config, ids: dict[str, int], seed: int, dtype: torch.dtype, generation: dict | None):
    """The model, freshly initialised from `seed`, with the turn end and pad ids (and any extra
    `generation` settings) in its generation config."""
    torch.manual_seed(seed)
    model = model_class(config).to(dtype)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    for key, value in (generation or {}).items():
        setattr(model.generation_config, key, value)
    return model


def _save(out: Path, model, processor) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def build_qwen2_5_vl(out_dir: str | Path, words: Sequence[str] = BASE_WORDS, **sizes) -> Path:
    """Write a Qwen2.5-VL checkpoint (random weights), tokenizer and processor to `out_dir`."""
    return _build_qwen(out_dir, words, version="2.5", **sizes)


def build_qwen2_vl(out_dir: str | Path, words: Sequence[str] = BASE_WORDS, **sizes) -> Path:
    """Write a Qwen2-VL checkpoint (random weights), tokenizer and processor to `out_dir`."""
    return _build_qwen(out_dir, words, version="2", **sizes)


def _qwen_checkpoint(
    out: Path,
    model_class,
    config_class,
    text: dict,
    vision: dict,
    ids: dict[str, int],
    processor_class,
    image_processor_class,
    video_processor_class,
    tokenizer,
    *,
    patch: int,
    image_side: int,
    seed: int,
    dtype: torch.dtype,
    chat_template: str | None,
    generation: dict | None,
    num_frames: int | None,
    video: dict,
) -> Path:
    """The part every Qwen builder shares: media token ids in the config, the seeded model and its
    generation config, the processor's patch settings, and the checkpoint written to `out`."""
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = _seeded_model(model_class, config, ids, seed, dtype, generation)
    pixels = image_side * image_side
    size = {"shortest_edge": pixels, "longest_edge": 4 * pixels}
    patches = dict(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    video = dict(video, do_sample_frames=False)
    if num_frames is not None:
        video["num_frames"] = num_frames
    processor = processor_class(
        image_processor=image_processor_class(**patches),
        video_processor=video_processor_class(**patches, **video),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    return _save(out, model, processor)


def _qwen2_classes_and_vision(
    version: str, hidden_size: int, vision_depth: int, vision_hidden: int, image_side: int, tokens_per_second: int
) -> tuple:
    """(config class, model class, processor class, vision config) of Qwen2-VL or Qwen2.5-VL."""
    import transformers

    vision = dict(depth=vision_depth, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2.5":
        vision.update(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            out_hidden_size=hidden_size,
            window_size=image_side,
            fullatt_block_indexes=[vision_depth - 1],
            tokens_per_second=tokens_per_second,
        )
        classes = (
            transformers.Qwen2_5_VLConfig,
            transformers.Qwen2_5_VLForConditionalGeneration,
            transformers.Qwen2_5_VLProcessor,
        )
        return *classes, vision
    vision.update(embed_dim=vision_hidden, hidden_size=hidden_size, mlp_ratio=2)
    classes = (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor)
    return *classes, vision


def _build_qwen(
    out_dir: str | Path,
    words: Sequence[str],
    version: str,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    image_side: int = 56,
    tokens_per_second: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
    generation: dict | None = None,
    num_frames: int | None = None,
) -> Path:
    """chat_template: saved with the processor; generation: extra generation_config.json settings;
    num_frames: the video processor's frames per video (None: unset, as in Qwen's releases)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer, ids = _tokenizer_and_ids(word_tokenizer, words, QWEN_SPECIAL)
    config_class, model_class, processor_class, vision = _qwen2_classes_and_vision(
        version, hidden_size, vision_depth, vision_hidden, image_side, tokens_per_second
    )
    text = _text_config(tokenizer, ids, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads)
    mrope = _mrope_section((hidden_size // num_heads) // 2)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    return _qwen_checkpoint(
        Path(out_dir),
        model_class,
        config_class,
        text,
        vision,
        ids,
        processor_class,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        tokenizer,
        patch=14,
        image_side=image_side,
        seed=seed,
        dtype=dtype,
        chat_template=chat_template,
        generation=generation,
        num_frames=num_frames,
        video={"cap_pixels_per_frame": True},
    )


def build_qwen3_vl(out_dir: str | Path, words: Sequence[str] = BASE_WORDS, **sizes) -> Path:
    """Write a Qwen3-VL checkpoint (random weights; DeepStack from two vision layers), tokenizer and
    processor (timestamps written into the prompt) to `out_dir`."""
    return _build_qwen3(out_dir, words, version="3-vl", **sizes)


def build_qwen3_5(out_dir: str | Path, words: Sequence[str] = BASE_WORDS, **sizes) -> Path:
    """Write a Qwen3.5 checkpoint (random weights; gated-DeltaNet linear-attention layers with one
    full-attention layer in every `full_attention_interval`), tokenizer and processor to `out_dir`."""
    return _build_qwen3(out_dir, words, version="3.5", **sizes)


def _qwen3_vision(hidden_size: int, vision_depth: int, vision_hidden: int, image_side: int, patch: int) -> dict:
    """The Qwen3 vision tower: DeepStack features from every layer but the last (at least one)."""
    return dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        num_position_embeddings=(image_side // patch) ** 2 * 4,
        deepstack_visual_indexes=list(range(vision_depth - 1)) or [0],
    )


def _qwen3_vl_text(text: dict, head_dim: int) -> None:
    """Qwen3-VL's rotary settings: interleaved mrope over the whole head."""
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(head_dim // 2),
        "mrope_interleaved": True,
    }


def _qwen3_5_text(text: dict, head_dim: int, num_layers: int, full_attention_interval: int) -> None:
    """Qwen3.5's rotary settings (a quarter of the head rotates) and its layer mix: gated-DeltaNet
    linear attention, one full-attention layer in every `full_attention_interval`."""
    rotary = head_dim // 4  # partial_rotary_factor 0.25, as the releases
    text.update(
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(rotary // 2),
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
        },
        layer_types=[
            "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
            for i in range(num_layers)
        ],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )


def build_qwen3_vl_moe(out_dir: str | Path, words: Sequence[str] = BASE_WORDS, **sizes) -> Path:
    """Write a Qwen3-VL-MoE checkpoint shaped like Qwen3-VL-30B-A3B (every layer sparse: routed
    experts, top-k with normalized weights, no shared expert), tokenizer and processor to `out_dir`."""
    return _build_qwen3(out_dir, words, version="3-vl-moe", **sizes)


def build_qwen3_5_moe(out_dir: str | Path, words: Sequence[str] = BASE_WORDS, **sizes) -> Path:
    """Write a Qwen3.5-MoE checkpoint shaped like the releases (linear-attention layers, routed
    experts plus a gated shared expert in every layer), tokenizer and processor to `out_dir`."""
    return _build_qwen3(out_dir, words, version="3.5-moe", **sizes)


def _moe_text(text: dict, version: str, num_experts: int, experts_per_token: int, expert_size: int) -> None:
    """Sparse layers: `num_experts` routed experts of `expert_size`, `experts_per_token` active;
    Qwen3.5-MoE adds a shared expert of the same size, as its releases do."""
    text.update(num_experts=num_experts, num_experts_per_tok=experts_per_token, moe_intermediate_size=expert_size)
    if version == "3.5-moe":
        text["shared_expert_intermediate_size"] = expert_size
    else:
        text.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)


def _qwen3_classes(version: str) -> tuple:
    """(config class, model class) of a Qwen3 generation."""
    import transformers

    return {
        "3-vl": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration),
        "3-vl-moe": (transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration),
        "3.5": (transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration),
        "3.5-moe": (transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration),
    }[version]


def _build_qwen3(
    out_dir: str | Path,
    words: Sequence[str],
    version: str,
    *,
    num_experts: int = 8,
    experts_per_token: int = 2,
    expert_size: int = 32,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    image_side: int = 64,
    full_attention_interval: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = None,
    generation: dict | None = None,
    num_frames: int | None = None,
) -> Path:
    """num_experts, experts_per_token, expert_size: the MoE versions' sparse layers."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    qwen3_5 = version.startswith("3.5")
    tokenizer, ids = _tokenizer_and_ids(bpe_tokenizer if qwen3_5 else word_tokenizer, words, QWEN_SPECIAL)
    patch = 16
    text = _text_config(tokenizer, ids, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads)
    text["head_dim"] = head_dim
    config_class, model_class = _qwen3_classes(version)
    if qwen3_5:
        _qwen3_5_text(text, head_dim, num_layers, full_attention_interval)
    else:
        _qwen3_vl_text(text, head_dim)
    if version.endswith("moe"):
        _moe_text(text, version, num_experts, experts_per_token, expert_size)
    return _qwen_checkpoint(
        Path(out_dir),
        model_class,
        config_class,
        text,
        _qwen3_vision(hidden_size, vision_depth, vision_hidden, image_side, patch),
        ids,
        Qwen3VLProcessor,
        Qwen2VLImageProcessor,
        Qwen3VLVideoProcessor,
        tokenizer,
        patch=patch,
        image_side=image_side,
        seed=seed,
        dtype=dtype,
        chat_template=chat_template,
        generation=generation,
        num_frames=num_frames,
        video={},
    )


def _llava_onevision_config(ids: dict[str, int], image_side: int, text: dict, vision: dict):
    """LLaVA-OneVision over a SigLIP tower and a Qwen2 decoder, any-resolution tiling up to 2x1."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=image_side, patch_size=14, **vision),
        text_config=dict(model_type="qwen2", **text),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=_pinpoints(image_side),
        vision_aspect_ratio="anyres_max_9",
    )


def _pinpoints(image_side: int) -> list[list[int]]:
    return [[image_side, image_side], [image_side, 2 * image_side], [2 * image_side, image_side]]


def _llava_onevision_processor(tokenizer, image_side: int):
    """The processor: images tiled to the pinpoints, video frames resized to `image_side` square."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    size = {"height": image_side, "width": image_side}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_pinpoints(image_side)),
        video_processor=LlavaOnevisionVideoProcessor(size=size, do_sample_frames=False),
        tokenizer=tokenizer,
        num_image_tokens=(image_side // 14) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def build_llava_onevision(
    out_dir: str | Path,
    words: Sequence[str] = BASE_WORDS,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    image_side: int = 56,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a LLaVA-OneVision checkpoint (random weights), tokenizer and processor to `out_dir`."""
    from transformers import LlavaOnevisionForConditionalGeneration

    tokenizer, ids = _tokenizer_and_ids(word_tokenizer, words, LLAVA_OV_SPECIAL)
    vision = dict(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_depth,
        num_attention_heads=2,
    )
    text = _text_config(tokenizer, ids, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads)
    config = _llava_onevision_config(ids, image_side, text, vision)
    model = _seeded_model(LlavaOnevisionForConditionalGeneration, config, ids, seed, dtype, None)
    return _save(Path(out_dir), model, _llava_onevision_processor(tokenizer, image_side))


INTERNVL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# The roles InternVL's processor gives the image tokens (tokenizer_config.json's extra_special_tokens in the releases).
INTERNVL_TOKEN_ROLES = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# The chat template InternVL3.5-HF releases ship, less its long default system prompt: an image is
# `<IMG_CONTEXT>` and a video `<video>` on a line of its own, before the text.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _internvl_text(text: dict, head_dim: int, moe: bool, expert_size: int) -> dict:
    """InternVL3.5's decoders: Qwen3 (dense sizes) or Qwen3-MoE (InternVL3.5-30B-A3B)."""
    text = dict(text, model_type="qwen3_moe" if moe else "qwen3", head_dim=head_dim, tie_word_embeddings=False)
    if moe:  # Qwen3-VL-30B-A3B's decoder: every layer sparse, normalized top-k, no shared expert
        _moe_text(text, "3-vl-moe", num_experts=8, experts_per_token=2, expert_size=expert_size)
    return text


def build_internvl(
    out_dir: str | Path,
    words: Sequence[str] = BASE_WORDS,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    image_side: int = 56,
    moe: bool = False,
    expert_size: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    generation: dict | None = None,
) -> Path:
    """Write an InternVL checkpoint shaped like InternVL3.5-HF (InternViT tower, pixel shuffle to a
    quarter of the patches, an MLP projector, a Qwen3 or Qwen3-MoE decoder), its tokenizer (the image
    token roles set), processor (tiles up to 4, video frames at `image_side`) and chat template."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = _internvl_tokenizer(words)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in INTERNVL_SPECIAL}
    text = _text_config(tokenizer, ids, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads)
    vision = dict(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_depth,
        num_attention_heads=2,
        image_size=[image_side, image_side],
        patch_size=[14, 14],
    )
    tokens_per_tile = (image_side // 14) ** 2 // 4
    config = InternVLConfig(
        vision_config=vision,
        text_config=_internvl_text(text, head_dim, moe, expert_size),
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = _seeded_model(InternVLForConditionalGeneration, config, ids, seed, dtype, generation)
    size = {"height": image_side, "width": image_side}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=4),
        video_processor=InternVLVideoProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=tokens_per_tile,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return _save(Path(out_dir), model, processor)


def _internvl_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """The word tokenizer with InternVL's image token roles (what its processor reads them by)."""
    frames = [f"Frame{i}" for i in range(1, 65)] + [":"]  # the processor writes "Frame{i}: " before each frame
    tokenizer = word_tokenizer([*words, *frames], INTERNVL_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens=INTERNVL_TOKEN_ROLES,
    )
