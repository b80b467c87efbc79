"""The target adapter: one place that loads a Hugging Face VLM and drives it for
speculative decoding, without forking any modeling file.

`load_target` reads a checkpoint directory (safetensors only). `Target.prompt`
runs the prompt, vision tower included, and returns its cache with the features
(final hidden states, the input of the LM head) and the positions of the visual
tokens. A `TargetSession` owns a fixed number of slots (`flash.kv.TargetCache`,
one length per slot): `load` writes a prompt's rows into free slots, `verify`
scores a block of tokens for the first `bucket` slots in one forward pass,
`commit` keeps the accepted part (the rest is overwritten later), `release`
frees a finished row's slot (continuous batching). `Target.prefill` is a prompt
loaded into a session of its own.

Positions are always passed explicitly. Qwen2-VL and Qwen2.5-VL use 3-D
multimodal rotary positions (mrope): at prefill they come from the model's own
`get_rope_index`, after it every text token sits at `text_index + rope_delta`
on all three axes, exactly as Hugging Face `generate` computes them. Because the
session derives positions from its own per-row counters, rolling the cache back
never leaves a stale position behind.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch._dynamo
from torch import nn
from transformers import AutoConfig, AutoProcessor, BatchFeature
from transformers.cache_utils import DynamicCache

from flash.capture import capture, fallback_reason
from flash.hybrid import LinearStates, linear_layers
from flash.kv import TargetCache

# A compiled engine's spans are `flash.kv.span_bucket`s from this size up: few shapes, few graphs.
SPAN_STEP = 64
UNCAPTURABLE_HYBRID = "linear-attention rollback records each position's state in Python: decoding eager"

# model_type -> (family, model class name in transformers)
SUPPORTED_MODELS: dict[str, tuple[str, str]] = {
    "qwen2_5_vl": ("qwen", "Qwen2_5_VLForConditionalGeneration"),
    "qwen2_vl": ("qwen", "Qwen2VLForConditionalGeneration"),
    "qwen3_vl": ("qwen", "Qwen3VLForConditionalGeneration"),
    "qwen3_5": ("qwen", "Qwen3_5ForConditionalGeneration"),
    "qwen3_vl_moe": ("qwen", "Qwen3VLMoeForConditionalGeneration"),
    "qwen3_5_moe": ("qwen", "Qwen3_5MoeForConditionalGeneration"),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    "internvl": ("internvl", "InternVLForConditionalGeneration"),
}


def _check_checkpoint(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"target checkpoint {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"target checkpoint {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"target checkpoint {str(path)!r} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        raise ValueError(
            f"target checkpoint {str(path)!r} has no .safetensors weights"
            + (f" (found {', '.join(found)}; pickled weights can run code and are refused)" if found else "")
        )


@dataclass
class Prefill:
    """What the prompt pass returns for a batch of B rows of length L (left-padded)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] 1 = real token
    features: torch.Tensor  # [B, L, D] final hidden states
    visual_mask: torch.Tensor  # [B, L] True at image/video tokens
    last_logits: torch.Tensor  # [B, V] logits after the last prompt token

    def select_rows(self, rows: torch.Tensor) -> Prefill:
        return Prefill(*(getattr(self, f.name)[rows] for f in fields(self)))


def _verify_pass(
    model: nn.Module, lm_head: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of tokens [B, T] over the slots' cache: (features [B, T, D], logits [B, T, V]).
    Every shape is fixed by (bucket, T, span), and the cache's lengths are tensors: a compiled
    pass is reused for every cycle of the same shape, whatever each row has accepted."""
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    features = out.last_hidden_state
    return features, lm_head(features)


class Target:
    """A loaded VLM plus everything the decoding loop needs to know about it."""

    def __init__(self, model: nn.Module, processor, family: str, path: str = "") -> None:
        self.model = model
        self.processor = processor
        self.family = family
        self.path = path
        self.config = model.config
        text_config = model.config.get_text_config()
        self.hidden_size: int = text_config.hidden_size
        self.vocab_size: int = text_config.vocab_size
        self.embed_tokens: nn.Module = model.get_input_embeddings()
        self.lm_head: nn.Module = model.get_output_embeddings()
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = text_config.eos_token_id
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = torch.tensor(eos_list, dtype=torch.long, device=self.device)
        cfg = model.config
        self.visual_token_ids = [
            i
            for i in (
                getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None),
                getattr(cfg, "video_token_id", None) or getattr(cfg, "video_token_index", None),
            )
            if i is not None
        ]
        self._forward_args = set(inspect.signature(model.model.forward).parameters)
        self._passes: dict[str, Callable] = {}  # compiled verify passes, by backend

    def verify_pass(self, backend: str | None) -> Callable:
        """The verify forward pass: eager (None), or compiled with `backend` ("inductor",
        "aot_eager", ...) under fullgraph=True, dynamic=False; CUDA graphs on CUDA with inductor.
        One compiled function per target and backend, so engines share its graphs."""
        if backend is None:
            return _verify_pass
        return capture(self._passes, _verify_pass, backend, self.device)

    @property
    def device(self) -> torch.device:
        """Where the LM head runs: the logits, the drafter and the acceptance live there (a target
        split over several GPUs has its first layers elsewhere; Accelerate's hooks move inputs)."""
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.processor, "chat_template", None))

    def video_prompt(self, instruction: str) -> str:
        """The prompt text for one video and an instruction, as the model card's own usage builds it:
        the checkpoint's chat template (user turn: the video, then the text; generation prompt added).
        Without a chat template the instruction is the whole prompt and must hold the video placeholder."""
        if not self.has_chat_template:
            return instruction
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def collate(self, parts: list) -> BatchFeature:
        """One left-padded batch from processor outputs of one prompt each, equal to what the
        processor returns for them together: so videos can be processed one by one, ahead of the
        model, and batched in any grouping. Per-token columns (input_ids, attention_mask, ...) are
        left-padded; every other tensor (pixels, grids, time steps) is concatenated in order."""
        if not parts:
            raise ValueError("collate needs at least one processor output")
        keys = list(parts[0].keys())
        if any(sorted(p.keys()) != sorted(keys) for p in parts):
            raise ValueError(
                f"cannot batch processor outputs with different keys: {sorted({k for p in parts for k in p})}"
            )
        width = max(p["input_ids"].shape[1] for p in parts)
        pad_id = self.processor.tokenizer.pad_token_id or 0
        out = {}
        for key in keys:
            values = [p[key] for p in parts]
            if not all(isinstance(v, torch.Tensor) for v in values):
                raise ValueError(f"cannot batch processor outputs: {key!r} is not a tensor")
            if all(v.shape == p["input_ids"].shape for v, p in zip(values, parts)):  # one entry per token
                fill = pad_id if key == "input_ids" else 0
                values = [torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill) for v in values]
            elif len({tuple(v.shape[1:]) for v in values}) > 1:
                shapes = sorted({tuple(v.shape) for v in values})
                raise ValueError(f"cannot batch processor outputs: {key!r} has shapes {shapes}")
            out[key] = torch.cat(values)
        return BatchFeature(out)

    def _model_inputs(self, inputs) -> dict[str, torch.Tensor]:
        """Processor output -> tensors on the target's device, pixels in its dtype."""
        out = {}
        for key, value in dict(inputs).items():
            if key not in self._forward_args or not isinstance(value, torch.Tensor):
                continue
            value = value.to(self.device)
            out[key] = value.to(self.dtype) if value.is_floating_point() else value
        if "input_ids" not in out:
            raise ValueError("inputs have no input_ids: pass the processor's output for the prompt")
        if "attention_mask" not in out:
            out["attention_mask"] = torch.ones_like(out["input_ids"])
        mask = out["attention_mask"]
        if mask.shape[0] > 1 and not bool(mask[:, -1].all()):
            raise ValueError("batched inputs must be left-padded (set the tokenizer's padding_side='left')")
        return out

    def _prompt_positions(self, kw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids for the prompt, rope delta per row [B])."""
        ids, mask = kw["input_ids"], kw["attention_mask"]
        if self.family == "qwen":
            cfg = self.config
            token_type = (ids == cfg.image_token_id).to(torch.int32) + 2 * (ids == cfg.video_token_id).to(torch.int32)
            positions, deltas = self.model.model.get_rope_index(
                ids,
                mm_token_type_ids=token_type,
                image_grid_thw=kw.get("image_grid_thw"),
                video_grid_thw=kw.get("video_grid_thw"),
                second_per_grid_ts=kw.get("second_per_grid_ts"),
                attention_mask=mask,
            )
            return positions, deltas.view(-1).to(ids.device)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return positions, torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)

    @torch.inference_mode()
    def prompt(self, inputs) -> tuple[Prompt, Prefill]:
        """Run the prompt (vision tower included): its cache, to be loaded into slots, and its features."""
        kw = self._model_inputs(inputs)
        positions, deltas = self._prompt_positions(kw)
        cache = DynamicCache(config=self.config.get_text_config())
        out = self.model.model(**kw, position_ids=positions, past_key_values=cache, use_cache=True)
        features = out.last_hidden_state  # [B, L, D]
        ids, mask = kw["input_ids"], kw["attention_mask"]
        prefill = Prefill(
            input_ids=ids,
            attention_mask=mask,
            features=features,
            visual_mask=torch.isin(ids, torch.tensor(self.visual_token_ids, device=ids.device)) & mask.bool(),
            last_logits=self.lm_head(features[:, -1]),
        )
        return Prompt(cache, mask, deltas), prefill

    def open(self, num_slots: int, compile: str | None = None, extra: int = 256) -> TargetSession:
        """A session with `num_slots` empty slots (its buffers belong to it, not to the target);
        `compile`: the backend its verify passes are compiled with (None: eager); `extra`: columns
        a slot holds past its prompt before its buffers grow."""
        return TargetSession(self, num_slots, compile, extra)

    @torch.inference_mode()
    def prefill(self, inputs) -> tuple[TargetSession, Prefill]:
        """Run the prompt and open a session whose slots hold its rows, in order."""
        prompt, prefill = self.prompt(inputs)
        batch = prefill.input_ids.shape[0]
        session = self.open(batch)
        session.load(list(range(batch)), prompt)
        return session, prefill


@dataclass
class Prompt:
    """A prompt pass's KV cache (left-padded rows), before its rows take slots."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, L]
    rope_deltas: torch.Tensor  # [B]


class TargetSession:
    """The decoding state of a set of slots on the target. It alone touches the KV cache.

    The cache (`flash.kv.TargetCache`) keeps one committed length per slot: `load` writes a prompt
    into free slots, `verify` runs the first `bucket` slots and writes the block at each slot's own
    length, `commit` moves the lengths, `release` frees slots. `next_index[s]` counts slot s's
    tokens, which is its next text position.
    """

    def __init__(self, target: Target, num_slots: int, compile: str | None = None, extra: int = 256):
        self.target = target
        layers = linear_layers(target.config.get_text_config())
        self.compile, self.fallback = compile, None  # fallback: why a compiled pass was given up
        # (bucket, width, span, capacity) of the compiled passes run: each shape is one graph
        self.shapes: set[tuple[int, int, int, int]] = set()
        if compile and layers:
            self.compile, self.fallback = None, UNCAPTURABLE_HYBRID
        device = target.device
        self.cache = TargetCache(num_slots, layers, device, SPAN_STEP if self.compile else 1, extra)
        self.next_index = torch.zeros(num_slots, dtype=torch.long, device=device)  # [S]
        self.rope_deltas = torch.zeros(num_slots, dtype=torch.long, device=device)  # [S]
        self._pending = 0  # tokens verified but not yet committed
        # the linear-attention layers of a hybrid target (Qwen3.5): their states rolled back per slot
        self.linear = LinearStates(target.model, self.cache, layers) if layers else None

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def bucket(self) -> int:
        """Slots the next pass runs: the first `bucket`."""
        return self.cache.bucket

    @bucket.setter
    def bucket(self, value: int) -> None:
        assert self._pending == 0 and 1 <= value <= self.num_slots
        self.cache.bucket = value

    @property
    def span(self) -> int:
        """Cache columns the next pass of one token a slot attends over."""
        return self.cache.span_for(1)

    @torch.inference_mode()
    def load(self, slots: list[int], prompt: Prompt, rows: list[int] | None = None) -> None:
        """Write the prompt's `rows` (all if None) into `slots`, between cycles."""
        assert self._pending == 0, "load between cycles only"
        rows = list(range(prompt.attention_mask.shape[0])) if rows is None else rows
        device = self.next_index.device
        where, index = torch.tensor(slots, device=device), torch.tensor(rows, device=device)
        mask = prompt.attention_mask[index]
        self.cache.load(slots, prompt.cache, mask, index)
        if self.linear:
            self.linear.load(where, prompt.cache, index)
        self.next_index[where] = mask.long().sum(dim=1)
        self.rope_deltas[where] = prompt.rope_deltas.to(device)[index]

    @torch.inference_mode()
    def add_slots(self, num_slots: int) -> None:
        """Grow to `num_slots` slots, between cycles (the buffers are reallocated)."""
        extra = num_slots - self.num_slots
        self.cache.add_slots(num_slots)
        if self.linear:
            self.linear.add_slots(num_slots)
        self.next_index = torch.cat([self.next_index, self.next_index.new_zeros(extra)])
        self.rope_deltas = torch.cat([self.rope_deltas, self.rope_deltas.new_zeros(extra)])

    @torch.inference_mode()
    def move(self, src: list[int], dst: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in slots `src` move to the free slots `dst`, between cycles; returns both on the device."""
        where, to = self.cache.move(src, dst)
        if self.linear:
            self.linear.move(where, to)
        self.next_index[to] = self.next_index[where]
        self.rope_deltas[to] = self.rope_deltas[where]
        return where, to

    @torch.inference_mode()
    def release(self, slots: list[int]) -> None:
        """Free slots whose rows are done."""
        self.cache.release(slots)

    def _positions(self, width: int) -> torch.Tensor:
        bucket = self.bucket
        steps = torch.arange(width, device=self.next_index.device)
        text = self.next_index[:bucket].unsqueeze(1) + steps  # [B, T]
        if self.target.family == "qwen":
            return (text + self.rope_deltas[:bucket].unsqueeze(1)).unsqueeze(0).expand(3, -1, -1)  # [3, B, T]
        return text

    def _mask(self, width: int) -> torch.Tensor:
        mask = self.cache.begin(width)  # [B, 1, T, span] bool
        if self.target.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
            dtype = self.target.dtype
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score tokens [bucket, T] after each slot's cached prefix in one pass.

        Returns (features [bucket, T, D], logits [bucket, T, V]); logits[:, t] predict the
        token after tokens[:, t]. Must be followed by `commit`.
        """
        assert self._pending == 0, "verify called twice without commit"
        assert tokens.shape[0] == self.bucket, f"a pass runs the bucket's {self.bucket} slots, got {tokens.shape[0]}"
        width = tokens.shape[1]
        args = (self.target.model.model, self.target.lm_head, tokens, self._mask(width), self._positions(width))
        if self.compile:
            try:
                out = self.target.verify_pass(self.compile)(*args, self.cache)
                self.shapes.add((self.bucket, width, self.cache.span, self.cache.capacity))
                self._pending = width
                return out
            except Exception as err:  # a pass that cannot be captured runs eager, and says why
                self._give_up_compile(err)
        with self.linear.recording() if self.linear else contextlib.nullcontext():
            out = _verify_pass(*args, self.cache)  # writes at the same lengths: a failed try left nothing
        self._pending = width
        return out

    def _give_up_compile(self, err: Exception) -> None:
        self.fallback = fallback_reason("verify", err)
        self.compile = None

    @torch.inference_mode()
    def commit(self, n_kept: torch.Tensor, kept_max: int | None = None, kept: list[int] | None = None) -> None:
        """Keep the first n_kept[s] verified tokens of each slot of the bucket; the rest is overwritten
        later. The host's copy saves a sync: `kept` per slot (exact), or `kept_max` >= n_kept.max()."""
        bound = kept if kept is not None else (int(n_kept.max()) if kept_max is None else kept_max)
        self.cache.commit(n_kept, bound)
        if self.linear:
            self.linear.commit(n_kept)
        self.next_index[: self.bucket] += n_kept
        self._pending = 0


class TargetHead:
    """The target's token embedding and LM head alone, with what a drafter needs to know of the
    target (sizes, model type, EOS ids): all that training a drafter uses of a 7B target, about
    2.2 GB in bfloat16 instead of 15. Duck-types `Target` for `FlashDrafter.for_target` and
    `from_pretrained`."""

    def __init__(self, config, embed_tokens: nn.Embedding, lm_head: nn.Linear, eos_token_ids: list[int]) -> None:
        self.config = config
        text_config = config.get_text_config()
        self.hidden_size: int = text_config.hidden_size
        self.vocab_size: int = text_config.vocab_size
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self.eos_token_ids = torch.tensor(eos_token_ids, dtype=torch.long, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def model_type(self) -> str:
        return self.config.model_type


def _head_tensor_names(names: list[str], tied: bool) -> tuple[str, str]:
    """(embedding, LM head) tensor names among a checkpoint's, in any of the layouts transformers has
    saved VLMs with (`model.embed_tokens`, `model.language_model.embed_tokens`,
    `language_model.model.embed_tokens`, ...; `lm_head`, `language_model.lm_head`)."""
    embeds = [n for n in names if n.endswith("embed_tokens.weight") and not any(v in n for v in ("visual", "vision"))]
    heads = [n for n in names if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
    if len(embeds) != 1:
        raise ValueError(f"expected one token embedding among the checkpoint's tensors, found {embeds or 'none'}")
    if len(heads) > 1:
        raise ValueError(f"expected one LM head among the checkpoint's tensors, found {heads}")
    if not heads and not tied:
        raise ValueError("the checkpoint has no lm_head weight and does not tie it to the embedding")
    return embeds[0], heads[0] if heads else embeds[0]


def _tied(config) -> bool:
    text_config = config.get_text_config()
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False))


def head_files(path: str | Path) -> list[str] | None:
    """The weight files holding the embedding and the LM head, from a sharded checkpoint's index
    (`model.safetensors.index.json`); None without an index. Lets a trainer fetch 2 of a 7B
    checkpoint's shards instead of all of them."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text())["weight_map"]
    embed, head = _head_tensor_names(sorted(weight_map), _tied(AutoConfig.from_pretrained(path)))
    return sorted({weight_map[embed], weight_map[head]})


def load_target_head(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> TargetHead:
    """Read only the token embedding and the LM head of a checkpoint (safetensors, sharded or not)."""
    from safetensors import safe_open
    from transformers import GenerationConfig

    path = Path(path)
    _check_checkpoint(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODELS:
        raise ValueError(
            f"target checkpoint {str(path)!r} is a {config.model_type!r} model; flashcap supports vision-language "
            f"models of types {', '.join(sorted(SUPPORTED_MODELS))}"
        )
    text_config = config.get_text_config()
    files = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            files.update({name: file for name in f.keys()})
    embed_name, head_name = _head_tensor_names(sorted(files), _tied(config))

    def read(name: str) -> torch.Tensor:
        with safe_open(str(files[name]), framework="pt", device=str(device)) as f:
            return f.get_tensor(name).to(dtype)

    embed = nn.Embedding(text_config.vocab_size, text_config.hidden_size, device="meta")
    embed.weight = nn.Parameter(read(embed_name), requires_grad=False)
    head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False, device="meta")
    head.weight = embed.weight if head_name == embed_name else nn.Parameter(read(head_name), requires_grad=False)
    for module, want in ((embed, (text_config.vocab_size, text_config.hidden_size)), (head, None)):
        if want and tuple(module.weight.shape) != want:
            raise ValueError(f"{embed_name} has shape {tuple(module.weight.shape)}, the config says {want}")
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        eos = text_config.eos_token_id
    return TargetHead(config, embed, head, [eos] if isinstance(eos, int) else list(eos or []))


def has_experts(config) -> bool:
    """Whether the target's decoder has mixture-of-experts layers (Qwen3-VL-MoE, Qwen3.5-MoE, an
    InternVL over Qwen3-MoE): their routed experts run Hugging Face's grouped-matmul kernel, which
    has no float64 path, so a float64 target takes HF's eager experts (a loop over the experts)."""
    text_config = config.get_text_config()
    return bool(getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None))


def load_target(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    device_map: dict[str, int | str] | None = None,
) -> Target:
    """Load a supported VLM checkpoint directory and its processor (safetensors only). `device_map`:
    module -> device (`flash.placement.plan_placement(...).device_map`), for a target split over
    several GPUs; each weight is read straight onto its device, and `device` is ignored."""
    import transformers

    path = Path(path)
    _check_checkpoint(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"target checkpoint {str(path)!r} has an unreadable config.json: {err}") from err
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODELS:
        raise ValueError(
            f"target checkpoint {str(path)!r} is a {model_type!r} model; flashcap supports vision-language "
            f"models of types {', '.join(sorted(SUPPORTED_MODELS))}"
        )
    family, class_name = SUPPORTED_MODELS[model_type]
    model_class = getattr(transformers, class_name)
    options = {"experts_implementation": "eager"} if dtype == torch.float64 and has_experts(config) else {}
    if device_map is not None:
        options["device_map"] = device_map
    model = model_class.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **options
    )
    model = (model if device_map is not None else model.to(device=device, dtype=dtype)).eval()
    model.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"
    return Target(model, processor, family, str(path))
