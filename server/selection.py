"""Choosing what to return: the top `n` of `best_of` candidates by reward."""

from __future__ import annotations


def rank_by_reward(rewards: list[float]) -> list[int]:
    """Candidate indices best first; equal rewards keep sampling order, so ties break the same way
    every time."""
    return sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))


def ranks_of(order: list[int]) -> list[int]:
    """Each candidate's rank (0 = best) in sampling order, from the indices best first."""
    ranks = [0] * len(order)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks


def rank_with_pruned_last(rewards: list[float], pruned: list[bool]) -> list[int]:
    """Candidate indices best first, every candidate decoded to its end before any that early
    rejection pruned (a partial reward does not compete with finished ones)."""
    order = rank_by_reward(rewards)
    return [i for i in order if not pruned[i]] + [i for i in order if pruned[i]]
