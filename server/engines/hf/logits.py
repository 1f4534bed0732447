"""Per-row temperature, top-k and top-p, and seeded sampling for a mixed batch.

Rows of one batch belong to different requests with different parameters, so every knob is a
per-row tensor rather than one scalar (which is all `generate()` offers).
"""

from __future__ import annotations

import torch


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Scale by temperature and mask what top-k/top-p exclude with -inf.

    Args:
        logits: (R, V) next-token logits.
        temperature: (R,) > 0 for sampled rows; greedy rows (0) are left unscaled.
        top_k: (R,) number of tokens kept; 0 keeps all.
        top_p: (R,) nucleus mass kept; 1 keeps all.
    Returns:
        (R, V) float32 logits.
    """
    logits = logits.float()
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = logits / scale[:, None]
    if not bool(((top_k > 0) | (top_p < 1)).any()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the mass before it already reaches top_p. The most likely one always
    # stays, even for a top_p so small that it is 0 in float32 (then the mask would drop them all).
    outside_nucleus = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    outside_nucleus[:, 0] = False
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, logits.shape[-1]))
    outside_top_k = rank[None, :] >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(outside_nucleus | outside_top_k, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def gumbel_noise(uniform: torch.Tensor) -> torch.Tensor:
    """argmax(logits + Gumbel noise) is a sample from softmax(logits) (the Gumbel-max trick)."""
    tiny = torch.finfo(uniform.dtype).tiny
    exponential = (-uniform.clamp_min(tiny).log()).clamp_min(tiny)  # > 0
    return -exponential.log()


def choose_tokens(logits: torch.Tensor, noise: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: (R, V) filtered logits from `filter_logits`.
        noise: (R, V) Gumbel noise drawn from each row's own request generator.
        greedy: (R,) bool, rows at temperature 0.
    Returns:
        (R,) token ids.
    """
    sampled = (logits + noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
