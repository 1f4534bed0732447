"""Choosing among candidates: every rule that orders them or picks what is returned lives here.

Ranks are numbered 0 = best everywhere (responses, the candidate log, feedback); equal rewards keep
sampling order, so ties break the same way every time.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Literal

from server.reward import Reward, RewardStats
from server.rules import LAST_NUMBER, extract_answer

CombineRule = Literal["mean", "min", "uwo"]


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


@dataclass(frozen=True)
class Combination:
    """How several reward members make one reward (`--reward-combine`, `--reward-weights`,
    `--reward-uncertainty-penalty`); the formulas are README's (Several reward models).

    Members are standardised first when they ship `reward_stats.json`, so that no member's scale
    outweighs the rest; a member without it enters raw. One member alone is its raw value (a
    ranking does not change under standardising).
    """

    rule: CombineRule = "mean"
    weights: dict[str, float] = field(default_factory=dict)  # by member name; 1 when not given
    penalty: float = 1.0  # uwo's lambda: weighted mean minus lambda x the members' weighted variance

    def value(self, standardised: dict[str, float]) -> float:
        """One candidate's reward from its members' (standardised) values."""
        if len(standardised) == 1:
            return next(iter(standardised.values()))
        if self.rule == "min":  # the most pessimistic member decides: weights do not enter
            return min(standardised.values())
        weights = {name: self.weights.get(name, 1.0) for name in standardised}
        total = sum(weights.values())
        mean = sum(weights[name] * v for name, v in standardised.items()) / total
        if self.rule == "mean":
            return mean
        variance = sum(weights[name] * (v - mean) ** 2 for name, v in standardised.items()) / total
        return mean - self.penalty * variance


def combine(
    raw: dict[str, list[float]], stats: dict[str, RewardStats | None], combination: Combination
) -> list[Reward]:
    """Each input's Reward: the combined value, and every member's raw value.

    Args:
        raw: member name -> one raw reward per input (all members the same length).
        stats: member name -> its reward_stats.json (None: it enters raw).
    """
    scales = {name: stats.get(name) if len(raw) > 1 else None for name in raw}
    rewards = []
    for values in zip(*raw.values(), strict=True):
        members = dict(zip(raw, values, strict=True))
        standardised = {
            name: scale.standardise(v) if (scale := scales[name]) is not None else v
            for name, v in members.items()
        }
        rewards.append(Reward(combination.value(standardised), members))
    return rewards


# --- per-request selection rules ------------------------------------------------------------------

SelectionRule = Literal["max", "soft", "vote"]


@dataclass(frozen=True)
class Selection:
    """A request's `selection`: how the returned candidates are chosen (README, Selection rules)."""

    rule: SelectionRule = "max"
    temperature: float = 1.0  # soft: P(candidate) is proportional to exp(reward / temperature)
    answer_pattern: str | None = None  # vote: a regex whose one group is a candidate's answer
    weighting: Literal["reward", "count"] = "reward"  # vote: a group's weight
    length_penalty: float = 0.0  # subtracted x completion tokens from every reward, before any rule

    def logged(self) -> dict:
        return asdict(self)


MAX = Selection()  # the default: the top n by reward


@dataclass(frozen=True)
class VoteGroup:
    answer: str
    members: list[int]  # candidate indices, best first
    weight: float


@dataclass(frozen=True)
class Choice:
    """What a rule chose among one prompt's candidates."""

    ranking: Ranking  # by the rule's reward (after any length penalty), pruned last
    chosen: list[int]  # the candidates returned, in order
    rule: SelectionRule
    groups: list[VoteGroup] | None = None  # vote: every group, heaviest first


def adjusted(rewards: list[float], tokens: list[int], length_penalty: float) -> list[float]:
    """Rewards less length_penalty x each candidate's completion tokens."""
    return [r - length_penalty * t for r, t in zip(rewards, tokens, strict=True)]


def soft_probabilities(rewards: list[float], temperature: float) -> list[float]:
    """P(each) proportional to exp(reward / temperature): soft best-of-N's draw."""
    top = max(rewards)  # subtracted: exp never overflows
    weights = [math.exp((r - top) / temperature) for r in rewards]
    total = sum(weights)
    return [w / total for w in weights]


def soft_pick(rewards: list[float], among: list[int], n: int, temperature: float, rng) -> list[int]:
    """`n` of the candidates `among`, drawn one after another without replacement with probability
    proportional to exp(reward / temperature) (soft best-of-N)."""
    left, chosen = list(among), list[int]()
    while left and len(chosen) < n:
        weights = soft_probabilities([rewards[i] for i in left], temperature)
        pick = rng.choices(range(len(left)), weights=weights)[0]
        chosen.append(left.pop(pick))
    return chosen


def vote_groups(
    rewards: list[float], answers: list[str | None], among: list[int], weighting: str
) -> list[VoteGroup]:
    """Candidates grouped by answer (those without one form no group), heaviest first; a group
    weighs its summed reward, or its size. `among` is best first, so of two groups that weigh the
    same, the one holding the better candidate comes first."""
    members: dict[str, list[int]] = {}
    for i in among:
        if (answer := answers[i]) is not None:
            members.setdefault(answer, []).append(i)
    groups = [
        VoteGroup(
            answer,
            sorted(indices, key=lambda i: (-rewards[i], i)),
            float(len(indices)) if weighting == "count" else sum(rewards[i] for i in indices),
        )
        for answer, indices in members.items()
    ]
    return sorted(groups, key=lambda g: -g.weight)  # stable: first-seen order breaks ties


def choose(
    rewards: list[float],
    tokens: list[int],
    texts: list[str],
    pruned: list[bool],
    n: int,
    selection: Selection,
    seed: int | None,
) -> Choice:
    """Apply a request's selection to one prompt's candidates (pruned ones are never returned).

    Args:
        rewards, tokens, texts, pruned: one per candidate, in sampling order.
        seed: soft's draws repeat for the same seed.
    """
    values = adjusted(rewards, tokens, selection.length_penalty)
    ranking = rank_candidates(values, pruned)
    finished = [i for i in ranking.order if not pruned[i]]
    if selection.rule == "soft":
        chosen = soft_pick(values, finished, n, selection.temperature, random.Random(seed))
        return Choice(ranking, chosen, "soft")
    if selection.rule == "vote":
        pattern = selection.answer_pattern or LAST_NUMBER
        answers = [extract_answer(text, pattern) for text in texts]
        groups = vote_groups(values, answers, finished, selection.weighting)
        # The heaviest group's best first, then the next groups', then candidates with no answer.
        grouped = [i for g in groups for i in g.members]
        chosen = (grouped + [i for i in finished if i not in grouped])[:n]
        return Choice(ranking, chosen, "vote", groups)
    return Choice(ranking, ranking.top(n), "max")
