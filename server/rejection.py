"""Early rejection (speculative rejection, Sun et al. 2024): stop decoding candidates that the
reward model already ranks low, and spend the tokens on the rest.

All best_of candidates are decoded to `after_tokens` tokens and scored as they stand. Those that
ended by themselves (eos, a stop string) are complete; of the rest, the best `ceil(keep x best_of)`
go on to the end and the others stop there ("pruned": logged with their partial text and reward,
never returned). A survivor goes on as a new sampling request whose prompt is the
original prompt plus its own tokens so far, so the option needs nothing of an engine beyond the
`Sampler` contract: on vLLM the prefix cache makes that prompt nearly free, and the losers are
simply never continued (the same effect as aborting them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from server.engines.contract import Candidate, SampleRequest, SamplingParams, stop_cut

SEED_RANGE = 2**63  # what the API accepts as a seed


@dataclass(frozen=True)
class EarlyRejection:
    after_tokens: int  # the decision point: tokens every candidate gets
    keep: float  # share of best_of that goes on past it, in (0, 1]

    def survivors(self, best_of: int) -> int:
        return max(1, math.ceil(self.keep * best_of - 1e-9))

    def prunes(self, params: SamplingParams, best_of: int) -> bool:
        """Whether anything is pruned: not when the decision point is past max_tokens, when every
        candidate is kept, or for greedy decoding (one distinct candidate)."""
        return (
            self.after_tokens < params.max_tokens
            and self.survivors(best_of) < best_of
            and params.temperature > 0
        )

    def logged(self) -> dict[str, float]:
        return {"after_tokens": self.after_tokens, "keep": self.keep}


def continuation(
    prompt_ids: list[int], partial: Candidate, params: SamplingParams, index: int, weights: object
) -> SampleRequest:
    """The request that decodes candidate `index` from where it stopped, to the same max_tokens.
    Seeded requests stay reproducible: each survivor's continuation has its own seed."""
    seed = None if params.seed is None else (params.seed * 1_000_003 + index + 1) % SEED_RANGE
    rest = replace(params, max_tokens=params.max_tokens - len(partial.token_ids), seed=seed)
    return SampleRequest(prompt_ids + partial.token_ids, 1, rest, weights)


def joined(partial: Candidate, rest: Candidate, stops: tuple[str, ...]) -> Candidate:
    """A survivor whole: its first tokens and their continuation. A stop string that spans the
    two parts ends it where it starts."""
    text = partial.text + rest.text
    finish = rest.finish_reason
    if stops and (cut := stop_cut(text, stops)) is not None:
        text, finish = cut, "stop"
    return Candidate(text=text, token_ids=partial.token_ids + rest.token_ids, finish_reason=finish)
