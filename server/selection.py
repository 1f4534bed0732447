"""Choosing among candidates: every rule that orders them or picks what is returned lives here.

Ranks are numbered 0 = best everywhere (responses, the candidate log, feedback); equal rewards keep
sampling order, so ties break the same way every time.
"""

from __future__ import annotations

from dataclasses import dataclass


def rank_by_reward(rewards: list[float]) -> list[int]:
    """Candidate indices best first; ties keep sampling order."""
    return sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))


def ranks_of(order: list[int]) -> list[int]:
    """Each candidate's rank (0 = best) in sampling order, from the indices best first."""
    ranks = [0] * len(order)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks


def dense_ranks(ranks: list[float | None]) -> list[int | None]:
    """Any ranking where lower is better (a client's 1 = best, scores negated) in this module's
    numbering: 0 = best, ties equal, no gaps; None (unranked) stays None."""
    levels = sorted({r for r in ranks if r is not None})
    return [None if r is None else levels.index(r) for r in ranks]


@dataclass(frozen=True)
class Ranking:
    order: list[int]  # candidate indices, best first
    ranks: list[int]  # each candidate's rank (0 = best), in sampling order

    def top(self, n: int) -> list[int]:
        """The `n` candidates returned, best first."""
        return self.order[:n]


def rank_candidates(rewards: list[float], pruned: list[bool]) -> Ranking:
    """Best first, every candidate decoded to its end before any that early rejection pruned (a
    partial reward does not compete with finished ones)."""
    order = rank_by_reward(rewards)
    order = [i for i in order if not pruned[i]] + [i for i in order if pruned[i]]
    return Ranking(order, ranks_of(order))


def keep_best(rewards: list[float], among: list[int], keep: int) -> list[int]:
    """The `keep` best of the candidates `among` (early rejection's survivors), in sampling order."""
    by_reward = rank_by_reward([rewards[i] for i in among])
    return sorted(among[j] for j in by_reward[:keep])
