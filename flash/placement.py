"""Where a target's weights and caches go on an actor's GPUs, computed before anything loads.

`plan_placement` builds the model on the meta device (no memory, no weights read: a 72B target is
planned in seconds from its config.json) and cuts it into placement units: the modules Hugging Face
never splits across devices (`_no_split_modules`: decoder layers, vision blocks) and the leaves
between them (embeddings, norms, the LM head), in the model's own order. Each unit costs its weights
and, for a decoder layer, the caches of the engine's slots (keys and values of a full-attention layer
over the slots' capacity; the per-slot states of a linear-attention layer, with the states a verify
records per block position). The LM head's unit also carries the drafter (it reads the head's
output) and the verify logits. Units are laid in order over the devices, each device filled to an
even share of the total, never past its budget less a workspace for activations: consecutive layers
stay together, so a pass crosses each device boundary once. The result is a Hugging Face
`device_map` (`from_pretrained(device_map=...)` loads each weight straight onto its device); the
caches are allocated by the prompt pass on each layer's own device.

A target that cannot fit is refused with the sizes (`TargetDoesNotFit`), before any weight loads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

GIB = 1024**3
WORKSPACE = 0.10  # of each device's budget: activations, the vision tower's prefill, allocator slack


class TargetDoesNotFit(ValueError):
    """The target, its caches and the drafter need more memory than the actor's GPUs give."""


@dataclass(frozen=True)
class Unit:
    name: str  # module path, as Hugging Face's device_map names it
    weights: int  # bytes
    cache: int = 0  # bytes of the slots' caches this unit holds (decoder layers)
    extra: int = 0  # bytes that must sit beside it (the drafter and the logits, beside the LM head)

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.extra


@dataclass
class Placement:
    """Units over `gpus` devices of `budget` bytes each."""

    gpus: int
    budget: int
    units: list[Unit]
    devices: list[int]  # device index of each unit
    head_device: int = 0  # where the LM head, the drafter and the acceptance run
    notes: list[str] = field(default_factory=list)

    @property
    def device_map(self) -> dict[str, int]:
        return {u.name: d for u, d in zip(self.units, self.devices)}

    def used(self, device: int, what: str = "total") -> int:
        return sum(getattr(u, what) for u, d in zip(self.units, self.devices) if d == device)

    def describe(self) -> str:
        lines = []
        for d in range(self.gpus):
            w, c, e = (self.used(d, k) for k in ("weights", "cache", "extra"))
            lines.append(
                f"GPU {d}: {w / GIB:.1f} GiB weights + {c / GIB:.1f} GiB caches + {e / GIB:.1f} GiB drafter/logits "
                f"of {self.budget / GIB:.1f} GiB ({sum(1 for x in self.devices if x == d)} units)"
            )
        return "; ".join(lines)


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """The target's model class built on the meta device: shapes and dtypes only."""
    import transformers

    from flash.target import SUPPORTED_MODELS

    _, class_name = SUPPORTED_MODELS[config.model_type]
    with torch.device("meta"):
        return getattr(transformers, class_name)._from_config(config, dtype=dtype)


def _bytes(module: nn.Module, recurse: bool = True) -> int:
    tensors = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _walk(module: nn.Module, prefix: str, no_split: set[str]) -> Iterator[tuple[str, nn.Module]]:
    children = list(module.named_children())
    if type(module).__name__ in no_split or not children or _bytes(module, recurse=False):
        if _bytes(module):
            yield prefix, module
        return
    for name, child in children:
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, no_split)


_TEXT_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def layer_cache_bytes(config, slots: int, capacity: int, dtype: torch.dtype, block: int = 4) -> list[int]:
    """Bytes of the slots' caches in each decoder layer: keys and values of a full-attention layer for
    `slots` x `capacity` columns; a linear-attention layer's convolution window and recurrent state
    (float32) per slot, plus the states a verify of `block` + 1 tokens records per position."""
    text = config.get_text_config()
    size = torch.empty((), dtype=dtype).element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    full = 2 * slots * kv_heads * capacity * head_dim * size
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    out = []
    for kind in types[: text.num_hidden_layers]:
        if kind != "linear_attention":
            out.append(full)
            continue
        keys = text.linear_num_key_heads * text.linear_key_head_dim
        values = text.linear_num_value_heads * text.linear_value_head_dim
        conv = (2 * keys + values) * text.linear_conv_kernel_dim * size
        state = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim * 4
        out.append(slots * (conv + state) * (1 + block + 1))
    return out


def placement_units(model: nn.Module, slots: int, capacity: int, block: int = 4, drafter_bytes: int = 0) -> list[Unit]:
    """The model's placement units in order, with the caches of `slots` x `capacity` on their layers
    and the drafter and verify logits ([slots, block + 1, vocab] in float32, twice) on the LM head."""
    config = model.config
    dtype = next(model.parameters()).dtype
    caches = layer_cache_bytes(config, slots, capacity, dtype, block)
    head = model.get_output_embeddings()
    vocab = config.get_text_config().vocab_size
    logits = 2 * slots * (block + 1) * vocab * 4
    units = []
    for name, module in _walk(model, "", set(model._no_split_modules or [])):
        layer = _TEXT_LAYER.search(name)
        cache = caches[int(layer.group(1))] if layer and "visual" not in name and "vision" not in name else 0
        extra = drafter_bytes + logits if module is head else 0
        units.append(Unit(name, _bytes(module), cache, extra))
    return units


def _tied_head(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embed.weight


def _lay_out(units: list[Unit], gpus: int, usable: int) -> list[int] | None:
    """Device of each unit, in order, each device filled to about an even share; None if they don't fit."""
    share = sum(u.total for u in units) / gpus
    devices, device, used = [], 0, 0
    for unit in units:
        past_share = used and used + unit.total / 2 > share and device < gpus - 1
        if past_share or used + unit.total > usable:
            device, used = device + 1, 0
            if device >= gpus or unit.total > usable:
                return None
        devices.append(device)
        used += unit.total
    return devices


def plan_placement(
    config,
    *,
    gpus: int,
    budget_bytes: int,
    dtype: torch.dtype,
    slots: int,
    capacity: int,
    block: int = 4,
    drafter_bytes: int = 0,
    workspace: float = WORKSPACE,
) -> Placement:
    """Place the target of `config` on `gpus` devices of `budget_bytes` each, with the caches of
    `slots` rows of `capacity` tokens and a drafter of `drafter_bytes`; raises TargetDoesNotFit."""
    model = meta_model(config, dtype)
    units = placement_units(model, slots, capacity, block, drafter_bytes)
    tied = _tied_head(model)
    head = next(i for i, u in enumerate(units) if u.extra or u.name.endswith("lm_head"))
    if tied:  # one weight for both: counted with the embedding, the head sits on its device
        units[head] = Unit(units[head].name, 0, units[head].cache, units[head].extra)
    usable = int(budget_bytes * (1 - workspace))
    devices = _lay_out(units, gpus, usable)
    if devices is not None and tied:
        embed = next(name for name, m in model.named_modules() if m is model.get_input_embeddings())
        devices[head] = devices[[u.name for u in units].index(embed)]
        if any(sum(u.total for u, d in zip(units, devices) if d == g) > usable for g in range(gpus)):
            devices = None
    total = sum(u.total for u in units)
    if devices is None:
        weights, cache = sum(u.weights for u in units), sum(u.cache for u in units)
        raise TargetDoesNotFit(
            f"the {config.model_type} target does not fit {gpus} GPU(s) of {budget_bytes / GIB:.1f} GiB: it needs "
            f"{weights / GIB:.1f} GiB of {dtype_name(dtype)} weights + {cache / GIB:.1f} GiB of caches for "
            f"{slots} slots x {capacity} tokens + {(total - weights - cache) / GIB:.1f} GiB of drafter and logits "
            f"= {total / GIB:.1f} GiB, and {workspace:.0%} of each GPU stays free for activations "
            f"({gpus} x {usable / GIB:.1f} GiB usable). Use more GPUs per actor (gpus_per_actor), fewer slots "
            "(max_rows / batch_size), shorter clips, or a smaller dtype"
        )
    placement = Placement(gpus, budget_bytes, units, devices, devices[head])
    if tied:
        placement.notes.append("the LM head is tied to the embedding: both sit on the embedding's device")
    return placement


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def video_prompt_tokens(config, frames: int, max_side: int) -> int:
    """An upper estimate of a video prompt's tokens: `frames` frames whose longer side is `max_side`
    (square, the worst case), as the family's processor counts them, plus the chat template's text."""
    vision = getattr(config, "vision_config", None)
    template = 128
    if config.model_type == "internvl":
        return frames * (config.image_seq_length + 8) + template
    if hasattr(vision, "spatial_merge_size"):  # Qwen: patch x merge pixels a token, temporal_patch_size frames
        side = -(-max_side // (vision.patch_size * vision.spatial_merge_size))
        return -(-frames // vision.temporal_patch_size) * side * side + 2 * frames + template
    if vision is not None and hasattr(vision, "image_size"):  # LLaVA-OneVision: a frame's patches pooled 2x2
        side = -(-(vision.image_size // vision.patch_size) // 2)
        return frames * (side * side + 1) + template
    return frames * 256 + template
