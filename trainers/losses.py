"""Losses as plain functions, checked against hand computations in tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


def bradley_terry_loss(
    rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, margins: torch.Tensor
) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_w - r_l - margin).

    Args:
        rewards: (N,) one reward per response of the batch.
        winners, losers: (P,) indices into `rewards`, one pair per position.
        margins: (P,) required gap per pair (0 for plain preferences).
    """
    return -F.logsigmoid(rewards[winners] - rewards[losers] - margins).mean()


def reward_centering(rewards: torch.Tensor, coefficient: float) -> torch.Tensor:
    """coefficient x mean(r^2): keeps rewards near zero, since BT fixes them only up to a constant."""
    return coefficient * rewards.pow(2).mean()


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on labelled (completion) tokens only.

    Args:
        logits: (B, T, V); labels: (B, T) with IGNORE on prompt and padding.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE)
