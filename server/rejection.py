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
from server.seeds import continuation_seed


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
    seed = continuation_seed(params.seed, index)
    rest = replace(params, max_tokens=params.max_tokens - len(partial.token_ids), seed=seed)
    return SampleRequest(prompt_ids + partial.token_ids, 1, rest, weights)


def joined(
    partial: Candidate, rest: Candidate, stops: tuple[str, ...], tokenizer, eos_ids: frozenset[int]
) -> Candidate:
    """A survivor whole: its first tokens and their continuation, decoded as one sequence (the two
    texts joined would split a character whose bytes span the decision point). A stop string that
    spans the two parts ends it where it starts, and its tokens end at the token that completed it,
    as an engine's would, so `usage` counts only what the text holds."""
    tokens = partial.token_ids + rest.token_ids
    ended_by_eos = rest.finish_reason == "stop" and bool(rest.token_ids) and rest.token_ids[-1] in eos_ids
    text = tokenizer.decode(tokens[:-1] if ended_by_eos else tokens, skip_special_tokens=True)
    if stops and (cut := stop_cut(text, stops)) is not None:
        # No stop string lies within the partial (it would have ended there), so search after it.
        end = next(
            k
            for k in range(len(partial.token_ids) + 1, len(tokens) + 1)
            if stop_cut(tokenizer.decode(tokens[:k], skip_special_tokens=True), stops) is not None
        )
        return Candidate(text=cut, token_ids=tokens[:end], finish_reason="stop")
    return Candidate(text=text, token_ids=tokens, finish_reason=rest.finish_reason)
