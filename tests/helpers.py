"""Prompts, media and test drafters shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flash.drafter import Block

PROMPT_TEXTS = [
    "describe the video",
    "describe the video in detail",
    "what is shown ?",
    "describe the image in detail . what is shown in the video ?",
    "one two three red green blue yellow circle square triangle",
    "what",
    "describe the red circle . what moves left ? what moves right ? describe the background",
]

MEDIA_TOKEN = {
    "qwen2_5_vl": {
        "video": "<|vision_start|><|video_pad|><|vision_end|>",
        "image": "<|vision_start|><|image_pad|><|vision_end|>",
    },
    "llava_onevision": {"video": "<video>", "image": "<image>"},
}
MEDIA_TOKEN["internvl"] = {"video": "<video>", "image": "<IMG_CONTEXT>"}
for _family in ("qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe"):
    MEDIA_TOKEN[_family] = MEDIA_TOKEN["qwen2_5_vl"]


@dataclass
class Case:
    name: str
    prompt: str
    videos: list | None = None
    images: list | None = None

    def inputs(self, processor):
        kwargs = {"text": [self.prompt], "return_tensors": "pt"}
        if self.videos is not None:
            kwargs["videos"] = self.videos
        if self.images is not None:
            kwargs["images"] = self.images
        return processor(**kwargs)


def chat(family: str, text: str, media: str | None = None) -> str:
    tag = f"{MEDIA_TOKEN[family][media]} " if media else ""
    return f"<|im_start|>user {tag}{text}<|im_end|><|im_start|>assistant"


def cases(family: str, seed: int = 0) -> list[Case]:
    """20 prompt/video/image cases of varied lengths for one family."""
    rng = np.random.RandomState(seed)
    video_shapes = [
        (2, 56, 56),
        (4, 56, 56),
        (6, 56, 84),
        (8, 84, 56),
        (4, 112, 112),
        (2, 84, 84),
        (6, 56, 56),
        (4, 56, 112),
        (8, 56, 56),
        (2, 112, 56),
    ]
    image_shapes = [(56, 56), (56, 84), (84, 56), (112, 112), (56, 112), (84, 84), (112, 56)]
    out = []
    for i, (t, h, w) in enumerate(video_shapes):
        frames = rng.randint(0, 256, (t, h, w, 3), dtype=np.uint8)
        out.append(Case(f"video{i}-{t}x{h}x{w}", chat(family, PROMPT_TEXTS[i % 7], "video"), videos=[frames]))
    for i, (h, w) in enumerate(image_shapes):
        image = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(Case(f"image{i}-{h}x{w}", chat(family, PROMPT_TEXTS[(i + 3) % 7], "image"), images=[image]))
    for i in range(3):
        out.append(Case(f"text{i}", chat(family, PROMPT_TEXTS[(2 * i + 1) % 7])))
    return out


def hf_greedy(target, inputs, max_new_tokens: int) -> list[int]:
    """The target's own `generate(do_sample=False)`, new tokens only, ending at EOS if produced."""
    with torch.inference_mode():
        out = target.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = set(target.eos_token_ids.tolist())
    for i, tok in enumerate(new):
        if tok in eos:
            return new[: i + 1]
    return new


class FixedDistributionDrafter:
    """Proposes k tokens drawn i.i.d. from a fixed distribution q [V], whatever the context."""

    def __init__(self, q: torch.Tensor, block_size: int = 2):
        self.q = q
        self.block_size = block_size

    def _block(self, generator, rows: int) -> Block:
        probs = self.q.expand(rows, self.block_size, -1).contiguous()
        tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        features = torch.zeros(rows, self.block_size, 1)
        return Block(tokens=tokens.view(rows, self.block_size), probs=probs, features=features)

    def start(
        self, prefill, first_tokens, params, generator=None, block_size=None, seen=None, join=False, slots=None,
        num_slots=None, compile=None,
    ) -> Block:  # fmt: skip
        return self._block(generator, first_tokens.shape[0])

    def step(
        self, features, next_tokens, n_new, n_new_max, params, generator=None, block_size=None, seen=None
    ) -> Block:
        return self._block(generator, next_tokens.shape[0])

    def release(self, slots: list[int]) -> None:
        pass

    def move(self, src: list[int], dst: list[int]) -> None:
        pass
