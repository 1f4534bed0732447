"""Selection rules compared offline on one logged pool (`bon eval --samples`): what each rule
would have returned at N, measured by gold (or, without a gold scorer, by the proxy reward), with
no new sampling. The rules are the server's own (server/selection.py).

`max` (and each reward member alone, by its own raw reward) has an exact estimator over every
N-subset of the pool (estimators.expected_best_of_n). `soft` and `vote` are estimated over random
N-subsets, `WORK` in all spread over the prompts (between 8 and 200 each): soft's expectation
within a subset is exact (the sum of its probabilities times the values), vote picks as the
server does. With N = K the one subset is the pool, and both are exact.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from server.rules import extract_answer
from server.selection import soft_probabilities, vote_groups
from trainers.evaluation.estimators import expected_best_of_n, mean_with_interval

if TYPE_CHECKING:
    from trainers.evaluation.measures import Pool

WORK = 20_000  # random N-subsets over all prompts, for the rules without an exact estimator

Rule = Callable[["Pool", list[int], list[float]], float]  # (pool, subset, values) -> value of the choice


def _soft(temperature: float) -> Rule:
    def value(pool: Pool, subset: list[int], values: list[float]) -> float:
        probabilities = soft_probabilities([pool.rewards[i] for i in subset], temperature)
        return sum(p * values[i] for p, i in zip(probabilities, subset, strict=True))

    return value


def _vote(weighting: str, answers: Callable[[Pool], list[str | None]]) -> Rule:
    def value(pool: Pool, subset: list[int], values: list[float]) -> float:
        best_first = sorted(subset, key=lambda i: (-pool.rewards[i], i))
        groups = vote_groups(pool.rewards, answers(pool), best_first, weighting)
        return values[groups[0].members[0] if groups else best_first[0]]

    return value


def _sampled(pools: list[Pool], values: list[list[float]], n: int, rule: Rule) -> list[float]:
    """Per prompt, the rule's mean value over random N-subsets (the pool once when N = K)."""
    draws = min(200, max(8, WORK // len(pools)))
    out = []
    for pool, pool_values in zip(pools, values, strict=True):
        k = len(pool.rewards)
        rng = random.Random(n * 7919 + k)
        subsets = [list(range(k))] if n == k else [rng.sample(range(k), n) for _ in range(draws)]
        out.append(statistics.fmean(rule(pool, subset, pool_values) for subset in subsets))
    return out


def rules_at_n(pools: list[Pool], ns: list[int], temperatures: list[float], answer_pattern: str) -> dict:
    """{rule: {N: mean with interval}} for max, each member alone, soft at each temperature and
    vote (summed reward and count); measured by gold where the pools have it, else the proxy."""
    values = [p.gold if p.gold is not None else p.rewards for p in pools]
    answers: dict[int, list[str | None]] = {}

    def answers_of(pool: Pool) -> list[str | None]:
        if id(pool) not in answers:
            answers[id(pool)] = [extract_answer(c, answer_pattern) for c in pool.completions]
        return answers[id(pool)]

    def exact(proxy: Callable[[Pool], list[float]]) -> dict:
        return {
            str(n): mean_with_interval(
                [expected_best_of_n(proxy(p), n, v) for p, v in zip(pools, values, strict=True)], seed=n
            )
            for n in ns
        }

    def sampled(rule: Rule) -> dict:
        return {str(n): mean_with_interval(_sampled(pools, values, n, rule), seed=n) for n in ns}

    out = {"max": exact(lambda p: p.rewards)}
    for name in pools[0].members or {}:
        out[f"{name} alone"] = exact(lambda p, name=name: (p.members or {})[name])
    for t in temperatures:
        out[f"soft (temperature {t:g})"] = sampled(_soft(t))
    out["vote (summed reward)"] = sampled(_vote("reward", answers_of))
    out["vote (count)"] = sampled(_vote("count", answers_of))
    return out
