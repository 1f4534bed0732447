"""One policy's measures from its pools of samples: reward and gold vs N, KL, win rate, diversity."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from server.rules import LAST_NUMBER
from trainers.data import Prompt
from trainers.evaluation.estimators import (
    distinct_n,
    expected_best_of_n,
    kl_bound_at_n,
    mean_with_interval,
    mean_with_stderr,
    ngrams,
    powers_of_two,
    win_probabilities,
    win_rate_at_n,
    win_rate_ceiling_at_n,
)
from trainers.evaluation.rules import rules_at_n


@dataclass
class Pool:
    """K samples of one prompt from one policy."""

    prompt: Prompt
    completions: list[str]
    rewards: list[float]  # the reward model's (proxy)
    gold: list[float] | None = None  # a gold scorer's, where one exists
    log_ratios: list[float] | None = None  # log p_policy - log p_reference of each completion
    members: dict[str, list[float]] | None = None  # each reward member's raw reward, by name


def _at_n(pools: list[Pool], ns: list[int], value) -> dict[str, dict[str, float]]:
    return {str(n): mean_with_interval([value(pool, n) for pool in pools], seed=n) for n in ns}


def common_k(pools: list[Pool]) -> int:
    """The sample count the report measures at: the most common one (the larger on a tie). A
    prompt with fewer samples is left out rather than cutting every prompt's N down to its own."""
    counts = Counter(len(p.rewards) for p in pools)
    return max(counts, key=lambda count: (counts[count], count))


@dataclass(frozen=True)
class RuleSettings:
    """What the offline comparison of selection rules uses (trainers/evaluation/rules.py)."""

    temperatures: tuple[float, ...] = (0.5, 1.0, 2.0)  # soft's
    answer_pattern: str = LAST_NUMBER  # vote's


def measure(
    pools: list[Pool], reference: list[Pool] | None = None, rules: RuleSettings | None = None
) -> dict:
    """Every measure of one policy. `reference`, aligned with `pools` by prompt, adds win rates.
    Prompts with fewer samples than most have are left out, and named in `left_out`."""
    k = common_k(pools)
    kept = [i for i, p in enumerate(pools) if len(p.rewards) >= k]
    short = [pools[i] for i in range(len(pools)) if len(pools[i].rewards) < k]
    pools = [pools[i] for i in kept]
    reference = [reference[i] for i in kept] if reference is not None else None
    ns = powers_of_two(k)
    result: dict = {
        "prompts": len(pools),
        "samples_per_prompt": k,
        "left_out": {
            "prompts": len(short),
            "why": f"fewer than {k} samples" if short else None,
            "examples": [str(p.prompt)[:80] for p in short[:5]],
        },
        "reward_at_n": _at_n(pools, ns, lambda p, n: expected_best_of_n(p.rewards, n)),
        "kl_bound_at_n": {str(n): kl_bound_at_n(n) for n in ns},
        "win_rate_ceiling_at_n": {str(n): win_rate_ceiling_at_n(n) for n in ns},
    }
    if all(p.gold is not None for p in pools):
        result["gold_at_n"] = _at_n(pools, ns, lambda p, n: expected_best_of_n(p.rewards, n, p.gold))
    if rules is not None:
        result["rules_at_n"] = rules_at_n(pools, ns, list(rules.temperatures), rules.answer_pattern)
        result["rules_measured_by"] = "gold" if all(p.gold is not None for p in pools) else "proxy reward"
    if all(p.log_ratios is not None for p in pools):
        result["kl_to_reference"] = mean_with_stderr([r for p in pools for r in p.log_ratios])
    if reference is not None:
        by_prompt = list(zip(pools, reference, strict=True))
        result["win_rate_vs_reference"] = mean_with_interval(
            [float(win_probabilities(p.rewards, r.rewards).mean()) for p, r in by_prompt]
        )
        result["win_rate_at_n_vs_reference"] = {
            str(n): mean_with_interval([win_rate_at_n(p.rewards, r.rewards, n) for p, r in by_prompt], seed=n)
            for n in ns
        }
    result["diversity"] = {
        f"distinct_{n}": {
            "across_inputs": distinct_n([c for p in pools for c in p.completions], n),
            "per_input": statistics.fmean(distinct_n(p.completions, n) for p in pools),
            # Short completions have few n-grams or none: a ratio over a handful says little.
            "ngrams": len(ngrams([c for p in pools for c in p.completions], n)),
        }
        for n in range(1, 5)
    }
    lengths = [len(c) for p in pools for c in p.completions]
    result["completion_chars"] = {"mean": statistics.fmean(lengths), "median": statistics.median(lengths)}
    return result
