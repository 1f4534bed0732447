"""Choosing what to return: the top `n` of `best_of` candidates by reward."""

from __future__ import annotations


def rank_by_reward(rewards: list[float]) -> list[int]:
    """Candidate indices best first; equal rewards keep sampling order, so ties break the same way
    every time."""
    return sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))


def ranks_of(rewards: list[float]) -> list[int]:
    """Each candidate's rank in its request (0 = best), in sampling order."""
    ranks = [0] * len(rewards)
    for rank, index in enumerate(rank_by_reward(rewards)):
        ranks[index] = rank
    return ranks
