"""The FLASH drafter (DESIGN.md §1).

Its sequence, per row:  [visual latents (C)] [text rows ...] [slots (k-1)]

- text row j: gated fusion of the target's feature f_j and the embedding of the
  token after it, e(x_{j+1}); its output predicts f_{j+1}, hence x_{j+2}.
- visual latents: C learned queries pool the features of the visual tokens,
  V' = softmax(Q Vᵀ / √d) V, C = ceil(n_visual / compression) capped at
  max_latents. They replace the visual rows.
- slots: k-1 learned embeddings placed after the last real row; slot i
  predicts the feature i steps further on, so one pass proposes a block of k
  tokens (semi-autoregressive). A light refinement adds, to slot i, an MLP of
  the embedding of the token drafted just before it.

The embedding table and LM head are the target's, frozen and not saved. The
drafter keeps its own KV cache (`DrafterCache`), so each cycle only runs the
newly verified rows and the slots through its layer(s).

Draft vocabulary (as EAGLE-3): with `draft_vocab_size` > 0 the drafter scores
only the target tokens in `draft_ids` (saved with the drafter), through those
rows of the shared LM head (`DraftHead`), so each slot reads Vd rows of the
head instead of V. A drafted id is always in `draft_ids`; a block's `probs` is
still a distribution over the whole vocabulary, zero outside `draft_ids`.
Verification is unchanged, so the output is still exactly the target's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flash.cache import DrafterCache
from flash.capture import capture, fallback_reason
from flash.sampling import SamplingParams, choose, penalize

if TYPE_CHECKING:
    from flash.target import Prefill, Target

CONFIG_NAME = "drafter_config.json"
SPAN_STEP = 64  # a captured drafter's spans and capacities are `span_bucket`s from this size up
WEIGHTS_NAME = "drafter.safetensors"


@dataclass
class DrafterConfig:
    block_size: int = 4  # k: tokens proposed per drafter pass
    num_layers: int = 1
    num_heads: int = 0  # 0: the target's number of attention heads
    intermediate_size: int = 0  # 0: 2 x hidden_size
    compression: int = 9  # visual tokens per latent
    max_latents: int = 64  # cap on C
    use_visual_latents: bool = True  # False: the text-only ablation
    refine: bool = True  # sequential refinement of slots from the previous drafted token
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # Filled from the target by `FlashDrafter.for_target`.
    hidden_size: int = 0
    vocab_size: int = 0
    target_model_type: str = ""
    # Tokens the drafter can propose: 0 = the whole vocabulary; > 0 = that many, its `draft_ids`.
    draft_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0 (0: the whole vocabulary), got {self.draft_vocab_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.compression < 1 or self.max_latents < 1:
            raise ValueError("compression and max_latents must be >= 1")

    def sized_for(self, target: Target) -> DrafterConfig:
        """A copy with the target's sizes filled in: hidden size, vocabulary, model type, heads."""
        config = DrafterConfig(**asdict(self))
        config.hidden_size = target.hidden_size
        config.vocab_size = target.vocab_size
        config.target_model_type = target.model_type
        if config.num_heads == 0:
            config.num_heads = target.config.get_text_config().num_attention_heads
        return config

    def num_latents(self, n_visual: int) -> int:
        if not self.use_visual_latents or n_visual == 0:
            return 0
        return min(self.max_latents, math.ceil(n_visual / self.compression))


@dataclass
class Block:
    """One drafter pass: k proposed tokens per row."""

    tokens: torch.Tensor  # [B, k]
    probs: torch.Tensor | None  # [B, k, V] draft distribution q (None when greedy)
    features: torch.Tensor  # [B, k, D] predicted target features


class DraftHead:
    """The LM head the drafter drafts with: the target's own (shared, frozen), or only its rows at
    `draft_ids` [Vd], copied once, so a slot reads Vd rows of the head instead of V.

    `choose` is `flash.sampling.choose` over the draft vocabulary: the repetition penalty is applied at
    the seen ids that are in it (the others cannot be drafted), temperature, top-k and top-p over the
    reduced logits. Drafted tokens are target ids; probs are over the whole vocabulary, zero outside
    `draft_ids`, as speculative acceptance needs.
    """

    def __init__(self, lm_head: nn.Module, vocab_size: int, draft_ids: torch.Tensor | None = None) -> None:
        self.lm_head = lm_head
        self.vocab_size = vocab_size
        self.draft_ids: torch.Tensor | None = None  # [Vd]
        if draft_ids is None:
            return
        weight = lm_head.weight  # [V, D]
        bias = getattr(lm_head, "bias", None)  # [V] or None
        ids = draft_ids.to(device=weight.device, dtype=torch.long)
        with torch.no_grad():
            self.weight = weight.index_select(0, ids).detach()  # [Vd, D]
            self.bias = bias.index_select(0, ids).detach() if bias is not None else None  # [Vd]
        self.draft_ids = ids
        # [V] -> place in the draft vocabulary; ids outside it point one past the end, a column
        # the penalty may write to and that is then dropped.
        self.place = torch.full((vocab_size,), ids.shape[0], dtype=torch.long, device=ids.device)
        self.place[ids] = torch.arange(ids.shape[0], device=ids.device)

    @property
    def size(self) -> int:
        return self.vocab_size if self.draft_ids is None else self.draft_ids.shape[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary.  [..., D] -> [..., Vd]"""
        if self.draft_ids is None:
            return self.lm_head(h)
        return F.linear(h, self.weight, self.bias)

    def tokens(self, index: torch.Tensor) -> torch.Tensor:
        """Target ids of places in the draft vocabulary.  [...] -> [...]"""
        return index if self.draft_ids is None else self.draft_ids[index]

    def choose(
        self,
        h: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        seen: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens from features h [..., D] (seen [..., N]: target ids, for the penalty).
        Returns (tokens [...], probs [..., V] or None when greedy)."""
        if self.draft_ids is None:
            return choose(self.lm_head(h), params, generator, seen)
        scores = self.logits(h).float()  # [..., Vd], cast first, as `choose` does
        if params.penalized and seen is not None:
            spill = torch.cat([scores, scores.new_zeros(*scores.shape[:-1], 1)], dim=-1)  # [..., Vd + 1]
            scores = penalize(spill, self.place[seen], params.repetition_penalty)[..., :-1]
        index, reduced = choose(scores, params, generator)
        if reduced is None:
            return self.tokens(index), None
        probs = reduced.new_zeros(*reduced.shape[:-1], self.vocab_size)
        return self.tokens(index), probs.index_copy_(-1, self.draft_ids, reduced)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not F.rms_norm: on this CPU the fused op is slower (25 us against 19 us at hidden size 128).
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


_ROTARY_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rotary_table(
    head_dim: int, theta: float, length: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length', hd] (length' >= length) for positions 0.., computed in float64 once and grown by doubling."""
    key = (head_dim, theta, dtype, device)
    table = _ROTARY_TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        size = max(length, 2 * table[0].shape[0] if table is not None else 1024)
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
        angles = torch.arange(size, device=device, dtype=torch.float64).unsqueeze(-1) * inv  # [size, hd/2]
        angles = torch.cat([angles, angles], dim=-1)
        table = (angles.cos().to(dtype), angles.sin().to(dtype))
        _ROTARY_TABLES[key] = table
    return table


def rotary(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, max_position: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, hd] for integer positions [B, T] in [0, max_position] (a host-side bound)."""
    bound = int(positions.max()) if max_position is None else max_position
    cos, sin = _rotary_table(head_dim, theta, bound + 1, dtype, positions.device)
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DrafterLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP, attention through the drafter's KV cache."""

    def __init__(self, dim: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.attn_norm = RMSNorm(dim, eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim, eps)
        self.gate_up = nn.Linear(dim, 2 * inner, bias=False)
        self.down = nn.Linear(inner, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: DrafterCache,
        index: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        batch, width, dim = x.shape  # [B, T, D]
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, width, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values = cache.write(index, k, v)  # [B, H, S, hd]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, width, dim))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def _layer_pass(
    layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache
) -> torch.Tensor:
    """The drafter's layers over x [B, T, D] through its cache. In a draft step every shape is fixed
    by (bucket, T, span) and the cache's lengths are tensors, so one compiled pass serves every step
    of that shape."""
    for index, layer in enumerate(layers):
        x = layer(x, cos, sin, cache, index, mask)
    return x


def _check_draft_ids(draft_ids: torch.Tensor, size: int, vocab_size: int) -> None:
    """A draft vocabulary is `size` distinct target ids."""
    if draft_ids.dim() != 1 or draft_ids.numel() != size:
        raise ValueError(f"draft ids must be a 1-D tensor of {size} ids, got shape {tuple(draft_ids.shape)}")
    if size > vocab_size:
        raise ValueError(f"draft_vocab_size={size} exceeds the target's vocabulary of {vocab_size}")
    if draft_ids.dtype.is_floating_point or draft_ids.dtype == torch.bool:
        raise ValueError(f"draft ids must be integers, got {draft_ids.dtype}")
    if int(draft_ids.min()) < 0 or int(draft_ids.max()) >= vocab_size:
        raise ValueError(f"draft ids must lie in [0, {vocab_size})")
    if torch.unique(draft_ids).numel() != size:
        raise ValueError("draft ids must be distinct")


class FlashDrafter(nn.Module):
    def __init__(
        self,
        config: DrafterConfig,
        embed_tokens: nn.Module,
        lm_head: nn.Module,
        draft_ids: torch.Tensor | None = None,
    ) -> None:
        """draft_ids [Vd]: the draft vocabulary when config.draft_vocab_size > 0 (None: loaded later
        with the state dict)."""
        super().__init__()
        if config.hidden_size <= 0 or config.vocab_size <= 0:
            raise ValueError("DrafterConfig.hidden_size/vocab_size unset: build drafters with FlashDrafter.for_target")
        self.config = config
        dim = config.hidden_size
        heads = config.num_heads
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"hidden_size {dim} must split into {heads} heads of even size")
        inner = config.intermediate_size or 2 * dim
        # Shared with the target, frozen, never saved: kept out of the module tree.
        self._shared = (embed_tokens, lm_head)
        self.fuse_norm_e = RMSNorm(dim, config.norm_eps)
        self.fuse_norm_f = RMSNorm(dim, config.norm_eps)
        self.fuse = nn.Linear(2 * dim, dim, bias=False)
        self.fuse_gate = nn.Linear(2 * dim, dim, bias=True)
        self.latent_queries = nn.Parameter(torch.randn(config.max_latents, dim) * dim**-0.5)
        self.latent_norm = RMSNorm(dim, config.norm_eps)
        self.latent_out = nn.Linear(dim, dim, bias=False)
        self.slots = nn.Parameter(torch.randn(max(config.block_size - 1, 1), dim) * 0.02)
        self.layers = nn.ModuleList(DrafterLayer(dim, heads, inner, config.norm_eps) for _ in range(config.num_layers))
        self.refine = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.norm = RMSNorm(dim, config.norm_eps)
        self.cache: DrafterCache | None = None
        self._head: DraftHead | None = None  # built from the shared LM head, never saved
        # Draft steps compiled with this torch.compile backend (set by the engine's `start`; None: eager).
        self.compile: str | None = None
        self.fallback: str | None = None  # why compiled steps gave way to eager
        self.shapes: set[tuple[int, int, int, int]] = set()  # compiled step shapes (bucket, T, span, capacity)
        self._passes: dict = {}
        size = config.draft_vocab_size
        if size == 0:
            if draft_ids is not None:
                raise ValueError("draft ids were given, but config.draft_vocab_size is 0 (the whole vocabulary)")
            self.register_buffer("draft_ids", None)
            self._head = DraftHead(lm_head, config.vocab_size)
            return
        # Whatever loads draft ids (from_pretrained, a training checkpoint) rebuilds the head from them.
        self.register_load_state_dict_post_hook(FlashDrafter._rebuild_head)
        if draft_ids is None:
            self.register_buffer("draft_ids", torch.zeros(size, dtype=torch.long))  # filled by load_state_dict
            return
        _check_draft_ids(draft_ids, size, config.vocab_size)
        self.register_buffer("draft_ids", draft_ids.detach().to(torch.long).clone())
        self._head = DraftHead(lm_head, config.vocab_size, self.draft_ids)

    def _rebuild_head(self, incompatible_keys) -> None:
        _check_draft_ids(self.draft_ids, self.config.draft_vocab_size, self.config.vocab_size)
        self._head = DraftHead(self.lm_head, self.config.vocab_size, self.draft_ids)

    # ---------------------------------------------------------------- building

    @classmethod
    def for_target(
        cls, target: Target, config: DrafterConfig | None = None, draft_ids: torch.Tensor | None = None
    ) -> FlashDrafter:
        """A new, untrained drafter sized for `target`, in its dtype and on its device.

        draft_ids [Vd]: the target ids it may propose (e.g. `flash.train.draft_vocabulary`); given,
        they set `draft_vocab_size`. A config with draft_vocab_size > 0 needs them.
        """
        config = (config or DrafterConfig()).sized_for(target)
        if draft_ids is not None:
            if config.draft_vocab_size not in (0, draft_ids.numel()):
                raise ValueError(
                    f"draft_vocab_size={config.draft_vocab_size} but {draft_ids.numel()} draft ids were given"
                )
            config.draft_vocab_size = draft_ids.numel()
        elif config.draft_vocab_size > 0:
            raise ValueError(
                f"draft_vocab_size={config.draft_vocab_size} needs the draft ids (flash.train.draft_vocabulary)"
            )
        drafter = cls(config, target.embed_tokens, target.lm_head, draft_ids)
        return drafter.to(device=target.device, dtype=target.dtype).eval()

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, target: Target) -> FlashDrafter:
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise ValueError(f"drafter directory {str(path)!r} needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        raw = json.loads((path / CONFIG_NAME).read_text())
        known = {f.name for f in fields(DrafterConfig)}
        config = DrafterConfig(**{k: v for k, v in raw.items() if k in known})
        if config.target_model_type and config.target_model_type != target.model_type:
            raise ValueError(
                f"drafter {str(path)!r} was trained for a {config.target_model_type!r} target, "
                f"not {target.model_type!r}"
            )
        if (config.hidden_size, config.vocab_size) != (target.hidden_size, target.vocab_size):
            raise ValueError(
                f"drafter {str(path)!r} was built for hidden_size={config.hidden_size}, vocab={config.vocab_size}; "
                f"the target has hidden_size={target.hidden_size}, vocab={target.vocab_size}"
            )
        drafter = cls(config, target.embed_tokens, target.lm_head)
        drafter.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
        return drafter.to(device=target.device, dtype=target.dtype).eval()

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def embed_tokens(self) -> nn.Module:
        return self._shared[0]

    @property
    def lm_head(self) -> nn.Module:
        return self._shared[1]

    @property
    def head(self) -> DraftHead:
        """The head the drafter drafts with: the LM head, or its rows at `draft_ids`."""
        assert self._head is not None, "draft ids not loaded"
        return self._head

    # ---------------------------------------------------------------- pieces

    def fuse_rows(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Gated fusion of [e(x_{j+1}); f_j].  features [B, T, D], next_tokens [B, T] -> [B, T, D]"""
        embedded = self._embed(next_tokens, features.device)
        both = torch.cat([self.fuse_norm_e(embedded), self.fuse_norm_f(features)], dim=-1)
        gate = torch.sigmoid(self.fuse_gate(both))
        return gate * self.fuse(both) + (1 - gate) * features

    def compress(self, visual: torch.Tensor) -> torch.Tensor:
        """Visual latents from the features of one row's visual tokens.  [N, D] -> [C, D]"""
        count = self.config.num_latents(visual.shape[0])
        if count == 0:
            return visual[:0]
        keys = self.latent_norm(visual)
        weights = torch.softmax(self.latent_queries[:count] @ keys.T / math.sqrt(visual.shape[-1]), dim=-1)
        return self.latent_out(weights @ visual)

    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: DrafterCache,
        max_position: int | None = None,
    ) -> torch.Tensor:
        """x [B, T, D] at positions [B, T] through the layers; mask [B, 1, T, span] over cache + new entries.

        max_position: a host-side upper bound of the positions (saves a device sync when decoding).
        """
        cache.begin(x.shape[1])
        head_dim = self.layers[0].head_dim
        cos, sin = rotary(positions.clamp_min(0), head_dim, self.config.rope_theta, x.dtype, max_position)
        return _layer_pass(self.layers, x, cos, sin, mask, cache)

    def _layers(self, x: torch.Tensor, valid: torch.Tensor, cache: DrafterCache) -> torch.Tensor:
        """Run new inputs x [B, T, D] (valid [B, T]) through the layers via a decoding cache; the
        slots' cache runs the compiled pass when `compile` is set."""
        span = cache.begin(x.shape[1])
        positions = cache.lengths[: x.shape[0]].unsqueeze(1) + valid.to(torch.long).cumsum(dim=1) - 1  # [B, T]
        mask = cache.attention_mask(valid)
        if not (self.compile and cache is self.cache):
            return self.run_layers(x, positions, mask, cache, span - 1)
        cos, sin = rotary(positions.clamp_min(0), self.layers[0].head_dim, self.config.rope_theta, x.dtype, span - 1)
        try:
            out = capture(self._passes, _layer_pass, self.compile, x.device)(self.layers, x, cos, sin, mask, cache)
            self.shapes.add((x.shape[0], x.shape[1], span, cache.capacity))
            return out
        except Exception as err:  # a step that cannot be captured runs eager (at the same lengths), and says why
            self.fallback, self.compile = fallback_reason("draft step", err), None
        return _layer_pass(self.layers, x, cos, sin, mask, cache)

    def new_cache(self, batch: int, capacity: int, like: torch.Tensor, span_step: int = 1) -> DrafterCache:
        heads, dim = self.config.num_heads, self.config.hidden_size
        return DrafterCache(len(self.layers), batch, heads, dim // heads, capacity, like.dtype, like.device, span_step)

    def slot_hidden(self, h: torch.Tensor, previous_tokens: torch.Tensor) -> torch.Tensor:
        """Refine slot states h [..., D] from the embedding of the token drafted just before each."""
        if not self.config.refine:
            return h
        return h + self.refine(torch.cat([h, self._embed(previous_tokens, h.device)], dim=-1))

    def _embed(self, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The target's embedding of `tokens`, on `device`: a target split over GPUs keeps its
        embedding on the first, the drafter sits with the LM head on the last."""
        return self.embed_tokens(tokens).to(device)

    def _draft(
        self,
        rows: torch.Tensor,
        valid: torch.Tensor,
        n_real: torch.Tensor,
        n_real_max: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        block_size: int | None,
        seen: torch.Tensor | None = None,
        cache: DrafterCache | None = None,
    ) -> Block:
        """Append real rows [B, R, D] (row b's first n_real[b] valid), draft a block, commit the real rows.

        n_real_max: n_real on the host, per row or as a bound. seen [B, N]: ids each row has seen
        (repetition penalty); slot i also sees the slots before it. A row with n_real 0 (an idle slot)
        drafts from nothing; its block is never read.
        """
        k = block_size or self.config.block_size
        batch = rows.shape[0]
        cache = self.cache if cache is None else cache
        if self.compile and cache is self.cache:  # a captured step: the rows' width is a power of two
            rows, valid = _pad_width(rows, valid)
        slots = self.slots[: k - 1].unsqueeze(0).expand(batch, -1, -1)
        x = torch.cat([rows, slots], dim=1)
        all_valid = torch.cat([valid, torch.ones(batch, k - 1, dtype=torch.bool, device=rows.device)], dim=1)
        hidden = self._layers(x, all_valid, cache)  # [B, R + k - 1, D]
        cache.commit(n_real, n_real_max)

        at = (n_real - 1).clamp_min(0).view(batch, 1, 1).expand(batch, 1, hidden.shape[-1])
        last = hidden.gather(1, at)  # [B, 1, D]
        slot_hidden = hidden[:, rows.shape[1] :]  # [B, k-1, D]
        one_pass = not self.config.refine and not (params.penalized and seen is not None)
        if one_pass:  # no slot depends on a drafted token: the whole block in one pass
            features = self.norm(torch.cat([last, slot_hidden], dim=1))  # [B, k, D]
            tokens, probs = self.head.choose(features, params, generator)
            return Block(tokens=tokens, probs=probs, features=features)
        tokens, probs, feats = [], [], []
        h = last.squeeze(1)
        for i in range(k):
            if i > 0:
                h = self.slot_hidden(slot_hidden[:, i - 1], tokens[-1])
                if seen is not None:
                    seen = torch.cat([seen, tokens[-1].unsqueeze(1)], dim=1)
            feature = self.norm(h)
            token, prob = self.head.choose(feature, params, generator, seen)
            tokens.append(token)
            probs.append(prob)
            feats.append(feature)
        return Block(
            tokens=torch.stack(tokens, dim=1),
            probs=None if params.greedy else torch.stack(probs, dim=1),
            features=torch.stack(feats, dim=1),
        )

    # ---------------------------------------------------------------- decoding protocol

    @torch.inference_mode()
    def start(
        self,
        prefill: Prefill,
        first_tokens: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        seen: torch.Tensor | None = None,
        join: bool = False,
        slots: list[int] | None = None,
        num_slots: int | None = None,
        compile: str | None = None,
    ) -> Block:
        """Read the prompt (latents + text rows) into the cache and draft the first block.

        first_tokens [B]: the token the target chose after the prompt. The rows take `slots`
        (default 0..B-1) of a cache of `num_slots` (default B); join: the cache's other slots keep
        the rows decoding (continuous batching), else a fresh cache replaces it. compile: the
        torch.compile backend of the draft steps that follow (None: eager); the prompt is read eager.
        """
        ids, mask, features = prefill.input_ids, prefill.attention_mask.bool(), prefill.features
        batch, length, dim = features.shape
        next_tokens = torch.cat([ids[:, 1:], first_tokens.unsqueeze(1)], dim=1)  # [B, L]
        text = mask & ~prefill.visual_mask
        text[:, -1] = True  # the last prompt position always drafts
        fused = self.fuse_rows(features, next_tokens)  # [B, L, D]
        sequences = []
        for b in range(batch):  # once per batch; rows differ in latents and padding
            latents = self.compress(features[b][prefill.visual_mask[b]])
            sequences.append(torch.cat([latents, fused[b][text[b]]], dim=0))
        lengths = [s.shape[0] for s in sequences]
        longest = max(lengths)
        rows = features.new_zeros(batch, longest, dim)
        valid = torch.zeros(batch, longest, dtype=torch.bool, device=features.device)
        for b, seq in enumerate(sequences):
            rows[b, : seq.shape[0]] = seq
            valid[b, : seq.shape[0]] = True
        prompt_cache = self.new_cache(batch, longest + 256, features)
        n_real = torch.tensor(lengths, device=features.device)
        block = self._draft(rows, valid, n_real, lengths, params, generator, block_size, seen, prompt_cache)
        slots = list(range(batch)) if slots is None else slots
        if not join or self.cache is None:
            self.compile, self.fallback = compile, None
            step = SPAN_STEP if compile else 1
            self.cache = self.new_cache(num_slots or batch, prompt_cache.capacity, features, step)
        elif num_slots and num_slots > self.cache.num_slots:
            self.cache.add_slots(num_slots)
        self.cache.load(slots, prompt_cache)
        return block

    @torch.inference_mode()
    def step(
        self,
        features: torch.Tensor,
        next_tokens: torch.Tensor,
        n_new: torch.Tensor,
        n_new_max: int | list[int],
        params: SamplingParams,
        generator: torch.Generator | None = None,
        block_size: int | None = None,
        seen: torch.Tensor | None = None,
    ) -> Block:
        """Add the newly verified rows of the first `bucket` slots and draft their next block.

        features [bucket, T, D]: target features at the kept positions; next_tokens [bucket, T]: the
        token after each; slot b has n_new[b] (<= T) valid rows (0 for an idle slot).
        """
        self.cache.bucket = features.shape[0]
        valid = torch.arange(features.shape[1], device=features.device).unsqueeze(0) < n_new.unsqueeze(1)
        rows = self.fuse_rows(features, next_tokens)
        return self._draft(rows, valid, n_new, n_new_max, params, generator, block_size, seen)

    def release(self, slots: list[int]) -> None:
        """Free the slots of finished rows."""
        self.cache.release(slots)

    @torch.inference_mode()
    def move(self, src: list[int], dst: list[int]) -> None:
        """Rows in slots `src` move to the free slots `dst`."""
        self.cache.move(src, dst)


def _pad_width(rows: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [B, R, D] and valid [B, R] padded (invalid, zero) to the next power-of-two width: a
    captured draft step sees few widths."""
    width = rows.shape[1]
    target = 1 << max(0, (width - 1).bit_length())
    if target == width:
        return rows, valid
    rows = torch.cat([rows, rows.new_zeros(rows.shape[0], target - width, rows.shape[2])], dim=1)
    return rows, torch.cat([valid, valid.new_zeros(valid.shape[0], target - width)], dim=1)
