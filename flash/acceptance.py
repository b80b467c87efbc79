"""Acceptance: which drafted tokens the target keeps. Pure functions, no state.

Words (DESIGN.md §2):
- draft: the block of k tokens the drafter proposed, `draft[:, i]` for i < k.
- accepted: the leading drafted tokens the target agrees with (n_accepted per row).
- bonus: the target's own token right after the accepted prefix; on a rejection
  it replaces the rejected draft (the "recovered" token), after a full accept it
  is one more token past the block.
- emitted: accepted + bonus; a row emits `n_accepted + 1` tokens per cycle,
  `tokens[:, :n_accepted + 1]`.

Greedy keeps the longest prefix equal to the target's argmax. Sampling is
standard speculative sampling: accept draft token x with probability
min(1, p(x) / q(x)); at the first rejection draw from normalised max(p - q, 0);
after a full accept draw the bonus from p. The output distribution is p.
"""

from __future__ import annotations

import torch


def greedy_accept(draft: torch.Tensor, target_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft [B, k], target_tokens [B, k+1] (target argmax at each verified position).

    Returns (n_accepted [B], tokens [B, k+1]); the emitted tokens are
    `tokens[:, :n_accepted + 1]`, which equal the target's argmax by construction.
    """
    k = draft.shape[1]
    match = draft == target_tokens[:, :k]  # [B, k]
    n_accepted = match.to(torch.int64).cumprod(dim=1).sum(dim=1)
    return n_accepted, target_tokens


def speculative_accept(
    draft: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling over a block.

    draft [B, k], draft_probs q [B, k, V], target_probs p [B, k+1, V];
    uniform [B, k] may be given (tests), else drawn from `generator`.
    Returns (n_accepted [B], tokens [B, k+1]) with the bonus at index n_accepted.
    """
    batch, k = draft.shape
    if uniform is None:
        uniform = torch.rand((batch, k), generator=generator, device=draft.device, dtype=target_probs.dtype)
    p_draft = target_probs[:, :k].gather(-1, draft.unsqueeze(-1)).squeeze(-1)  # [B, k]
    q_draft = draft_probs.gather(-1, draft.unsqueeze(-1)).squeeze(-1)  # [B, k]
    keep = uniform * q_draft < p_draft  # u < p/q without dividing by q
    n_accepted = keep.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]

    # Residual at the stop position: max(p - q, 0) after a rejection, p after a full accept.
    q_padded = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, draft_probs.shape[-1])], dim=1)  # [B, k+1, V]
    at = n_accepted.view(batch, 1, 1).expand(batch, 1, target_probs.shape[-1])
    p_stop = target_probs.gather(1, at).squeeze(1)  # [B, V]
    residual = (p_stop - q_padded.gather(1, at).squeeze(1)).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q on a rejection cannot happen (acceptance would be certain); guard rounding anyway.
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(residual.dtype).tiny), p_stop)
    bonus = torch.multinomial(residual, 1, generator=generator).squeeze(1)  # [B]

    tokens = torch.cat([draft, draft.new_zeros(batch, 1)], dim=1)
    tokens = tokens.scatter(1, n_accepted.unsqueeze(1), bonus.unsqueeze(1))
    return n_accepted, tokens


def clip_at_stop(
    tokens: torch.Tensor, n_emitted: torch.Tensor, eos_ids: torch.Tensor, budget: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a row's emitted tokens at its first EOS (kept) and at its token budget.

    tokens [B, T], n_emitted [B] (valid leading tokens), eos_ids [E], budget [B]
    (new tokens the row may still add). Returns (n_kept [B], finished [B]).
    """
    width = tokens.shape[1]
    idx = torch.arange(width, device=tokens.device)
    valid = idx.unsqueeze(0) < n_emitted.unsqueeze(1)  # [B, T]
    is_eos = torch.isin(tokens, eos_ids) & valid
    upto_eos = torch.where(is_eos.any(dim=1), is_eos.to(torch.int64).argmax(dim=1) + 1, width + 1)
    n_kept = torch.minimum(torch.minimum(n_emitted, upto_eos), budget)
    finished = (upto_eos <= n_kept) | (n_kept >= budget)
    return n_kept, finished
