"""Turning logits into a token choice, the way Hugging Face `generate` does, so
that "the target's output" means the same thing on both sides of every
comparison: logits are cast to float32, the repetition penalty is applied,
then (when sampling) temperature, top-k and top-p, with the same tie rules.

`SamplingParams.from_generation_config` reads a checkpoint's
`generation_config.json` as `model.generate()` would; settings flashcap cannot
reproduce exactly are refused rather than ignored.

The repetition penalty needs to know which tokens a row has seen: `seen` holds
their ids, [B, N] (the prompt without left padding, plus every token emitted so
far), owned by the decoding loop. Places that hold nothing (left padding, ids
past the LM head, tokens cut at EOS) repeat an id the row has seen, so the
penalty needs no filler column. A block's
position t also sees the block's own tokens up to t (`seen_through`). The
penalty gathers and scatters at those ids, as Hugging Face's processor does,
so its cost grows with the sequence, not with the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# generate()'s own defaults for settings a checkpoint leaves unset.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}

# Settings that change which token generate() picks and that flashcap does not apply: (name, value when off).
_UNSUPPORTED = (
    ("num_beams", 1),
    ("no_repeat_ngram_size", 0),
    ("bad_words_ids", None),
    ("sequence_bias", None),
    ("suppress_tokens", None),
    ("begin_suppress_tokens", None),
    ("forced_bos_token_id", None),
    ("forced_eos_token_id", None),
    ("min_new_tokens", 0),
    ("min_length", 0),
    ("exponential_decay_length_penalty", None),
    ("guidance_scale", 1.0),
)
_UNSUPPORTED_WHEN_SAMPLING = (
    ("min_p", None),
    ("typical_p", 1.0),
    ("epsilon_cutoff", 0.0),
    ("eta_cutoff", 0.0),
    ("top_h", None),
)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature == 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens the row has seen

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0

    @classmethod
    def from_generation_config(
        cls,
        config,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
    ) -> SamplingParams:
        """What `model.generate()` does with this `GenerationConfig` (None: HF's defaults), unless
        the caller sets a value: temperature 0 means greedy, > 0 sampling at that temperature.

        Sampling with top_k == 1 keeps only the most likely token, so it is greedy decoding
        (Qwen2.5-VL instruct releases ship do_sample with top_k 1).
        """

        def setting(name: str):
            value = getattr(config, name, None) if config is not None else None
            return HF_DEFAULTS[name] if value is None else value

        sample = bool(setting("do_sample")) if temperature is None else temperature > 0
        temp = float(setting("temperature")) if temperature is None else float(temperature)
        k = int(setting("top_k")) if top_k is None else int(top_k)
        p = float(setting("top_p")) if top_p is None else float(top_p)
        penalty = float(setting("repetition_penalty")) if repetition_penalty is None else float(repetition_penalty)
        if config is not None:
            checks = _UNSUPPORTED + (_UNSUPPORTED_WHEN_SAMPLING if sample and k != 1 else ())
            unsupported = [
                f"{name}={getattr(config, name)!r}"
                for name, off in checks
                if getattr(config, name, off) is not None and getattr(config, name, off) != off
            ]
            if unsupported:
                raise ValueError(
                    f"the generation config sets {', '.join(unsupported)}, which flashcap does not apply; "
                    "remove it from generation_config.json to decode without it"
                )
        if not sample or k == 1:
            return cls(temperature=0.0, repetition_penalty=penalty)
        if temp <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {temp}")
        return cls(temperature=temp, top_k=k, top_p=p, repetition_penalty=penalty)


def seen_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The ids a row's prompt has seen.  [B, L] -> [B, L]

    Left padding and ids past the LM head (which it never scores) repeat the row's last prompt token,
    which is real: batches are left-padded."""
    assert bool((attention_mask[:, -1] != 0).all() and (input_ids[:, -1] < vocab_size).all())
    nothing = (attention_mask == 0) | (input_ids >= vocab_size)
    return torch.where(nothing, input_ids[:, -1:], input_ids)


def mark_seen(seen: torch.Tensor, tokens: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Add each row's first n[b] tokens.  seen [B, N], tokens [B, T], n [B] -> [B, N + T]"""
    valid = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < n.unsqueeze(1)
    return torch.cat([seen, torch.where(valid, tokens, seen[:, :1])], dim=1)


def seen_through(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Position t of a block also sees tokens[:, :t+1].  seen [B, N], tokens [B, T] -> [B, T, N + T]"""
    width = tokens.shape[1]
    steps = torch.arange(width, device=tokens.device)
    upto = torch.minimum(steps.unsqueeze(0), steps.unsqueeze(1))  # [T, T]: place j of position t holds token min(j, t)
    block = tokens[:, upto]  # [B, T, T]; repeats of tokens[:, t] past t add nothing
    return torch.cat([seen.unsqueeze(1).expand(-1, width, -1), block], dim=2)


def penalize(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's repetition penalty: the scores of seen ids are divided by it (multiplied when negative).
    scores [..., V], seen [..., N]; an id seen twice is penalized once."""
    picked = scores.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(-1, seen, picked)


def process(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """float32 scores after the repetition penalty, as generate() sees them.  [..., V] -> [..., V]"""
    scores = logits.float()
    if params.penalized and seen is not None:
        scores = penalize(scores, seen, params.repetition_penalty)
    return scores


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as HF's warpers do.  # [..., V] -> [..., V]"""
    scores = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - params.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def probabilities(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 distribution tokens are drawn from.  # [..., V] -> [..., V]"""
    return warp_logits(process(logits, params, seen), params).softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of a [..., V] distribution.  # -> [...]"""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def choose(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick tokens from logits [..., V] (seen [..., N] ids for the penalty).
    Returns (tokens [...], probs [..., V] or None when greedy)."""
    if params.greedy:
        return process(logits, params, seen).argmax(dim=-1), None
    probs = probabilities(logits, params, seen)
    return draw(probs, generator), probs
