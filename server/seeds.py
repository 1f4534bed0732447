"""Seeds derived from a user's seed: one home for every rule, so a seeded job repeats and no two
streams it draws share a seed.

vLLM draws candidate i of a request from seed + i, so derived seeds are spaced by STRIDE, more
than any best_of: the candidates of one prompt never reuse another prompt's seeds.
"""

from __future__ import annotations

SEED_RANGE = 2**63  # what the API accepts as a seed
STRIDE = 1_000_003  # a prime above any best_of


def prompt_seed(seed: int | None, position: int) -> int | None:
    """The seed of the prompt at `position` of a job seeded `seed` (bon generate, RAFT, eval, the
    demo): the same job repeats, and different prompts draw different candidates."""
    return None if seed is None else (seed + STRIDE * position) % SEED_RANGE


def continuation_seed(seed: int | None, candidate: int) -> int | None:
    """The seed that decodes candidate `candidate` on from a partial answer (early rejection): a
    stream of its own, apart from the request's candidates and from every other continuation."""
    return None if seed is None else (seed * STRIDE + candidate + 1) % SEED_RANGE


def expansion_seed(seed: int | None, round_index: int, beam: int) -> int | None:
    """The seed of beam `beam`'s children in round `round_index` of a beam search: each expansion
    its own stream (its children draw seed + i, and beams are spaced by STRIDE)."""
    if seed is None:
        return None
    return (seed * STRIDE**3 + ((round_index + 1) * STRIDE + beam) * STRIDE) % SEED_RANGE
