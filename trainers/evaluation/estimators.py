"""Estimators over pools of K samples per prompt.

Best-of-N from one pool: drawing N of the K samples without replacement, the i-th smallest (by the
proxy reward, i = 1..K) is the best of the N with probability C(i-1, N-1) / C(K, N): the other N-1
must all come from the i-1 below it. Weighting the sorted pool by these gives the expected value
of whatever is measured on the chosen sample (its proxy reward, its gold score, its win against a
reference sample) without bias, using every sample; "the best of the first N" would throw most
of the pool away and vary with its order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def best_of_n_weights(k: int, n: int) -> np.ndarray:
    """(K,) probability that the i-th smallest of K is the maximum of a random N-subset."""
    if not 1 <= n <= k:
        raise ValueError(f"best of {n} needs a pool of at least {n} samples, not {k}")
    total = math.comb(k, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, k + 1)])


def expected_best_of_n(proxy: Sequence[float], n: int, value: Sequence[float] | None = None) -> float:
    """Expected `value` (default: the proxy itself) of the sample with the highest proxy among N
    drawn without replacement from the pool."""
    order = np.argsort(np.asarray(proxy, dtype=float), kind="stable")
    measured = np.asarray(proxy if value is None else value, dtype=float)[order]
    return float(best_of_n_weights(len(order), n) @ measured)


def win_probabilities(proxy: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    """(K,) for each pool sample, in ascending proxy order, its chance of beating a random
    reference sample (a tie counts half)."""
    mine = np.sort(np.asarray(proxy, dtype=float))[:, None]  # (K, 1)
    theirs = np.asarray(reference, dtype=float)[None, :]  # (1, R)
    return ((mine > theirs) + 0.5 * (mine == theirs)).mean(axis=1)


def win_rate_at_n(proxy: Sequence[float], reference: Sequence[float], n: int) -> float:
    """Chance that the best of N (by proxy) beats one reference sample, as judged by the proxy."""
    return float(best_of_n_weights(len(proxy), n) @ win_probabilities(proxy, reference))


def kl_bound_at_n(n: int) -> float:
    """KL(best-of-N || policy) for continuous rewards: log N - (N-1)/N (an upper bound otherwise)."""
    return math.log(n) - (n - 1) / n


def win_rate_ceiling_at_n(n: int) -> float:
    """Chance that the best of N beats one more sample of the same policy, ties aside: N/(N+1)."""
    return n / (n + 1)


def powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def mean_with_interval(per_prompt: Sequence[float], seed: int = 0, resamples: int = 1000) -> dict[str, float]:
    """Mean over prompts with a 95 % percentile-bootstrap interval (prompts resampled)."""
    values = np.asarray(per_prompt, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


def mean_with_stderr(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    stderr = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else float("nan")
    return {"mean": float(array.mean()), "stderr": stderr}


def ngrams(texts: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Every word n-gram of every text."""
    return [
        tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)
    ]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams of `texts` (1: no n-gram repeats); 0 without any."""
    grams = ngrams(texts, n)
    return len(set(grams)) / len(grams) if grams else 0.0
