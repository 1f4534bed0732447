"""Step-level beam search with a process reward model, as a request option (search-and-learn's
beam search, Snell et al. 2024).

`best_of` partial answers are kept. Each round expands every partial answer by one step (decoding
stops at the step delimiter), the reward members score the answers so far, and the best
`best_of / beam_width` partial answers survive, each to be expanded `beam_width` times in the next
round. An answer that ends (eos, a request's stop string, max_tokens) is finished and stays as it
is; the last round (`max_steps`) decodes to the end. Finished answers are what the selection rule
chooses among; every partial answer is returned and logged as a pruned candidate (never returned as
a choice, never trained on).

Each expansion is a sampling request whose prompt is the original prompt plus the answer so far,
re-tokenized from its text, so search needs nothing of an engine beyond the `Sampler` contract
(vLLM's prefix cache makes the repeated prefix nearly free).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from server.engines.contract import Candidate, SamplingParams, stop_cut


@dataclass(frozen=True)
class BeamSearch:
    beam_width: int  # M: children of each surviving partial answer
    max_steps: int  # S: rounds; the last decodes to the end

    def survivors(self, best_of: int) -> int:
        return best_of // self.beam_width

    def logged(self) -> dict:
        return {"type": "beam", "beam_width": self.beam_width, "max_steps": self.max_steps}


@dataclass
class Beam:
    """A partial answer to expand: its text and every token generated along its lineage."""

    text: str
    token_ids: list[int]


@dataclass
class Expansion:
    """What one round produced from one beam: the answer so far, and what the round spent on it."""

    candidate: Candidate  # text: the whole answer so far; token_ids: its lineage's tokens
    generated: int  # tokens decoded for it in its round (usage counts these)
    finished: bool


def step_text(
    candidate: Candidate, stops: tuple[str, ...], delimiter: str, tokenizer, eos_ids: frozenset[int]
) -> str | None:
    """The step `candidate` decoded, when it stopped at the step delimiter (not eos, nor a request's
    own stop string); None when it finished the answer. Decoded here from its tokens, so the two
    engines' detokenizers cannot disagree on where the delimiter was."""
    if candidate.finish_reason != "stop" or (candidate.token_ids and candidate.token_ids[-1] in eos_ids):
        return None
    text = tokenizer.decode(candidate.token_ids, skip_special_tokens=True)
    cut = stop_cut(text, (*stops, delimiter))
    if cut is None:
        return None
    after = text[len(cut) :]
    if any(after.startswith(stop) for stop in stops):
        return None
    return cut if after.startswith(delimiter) else None


def expand(
    beam: Beam,
    child: Candidate,
    params: SamplingParams,
    delimiter: str | None,
    tokenizer,
    eos_ids: frozenset[int],
) -> Expansion:
    """`beam` with one more decoded piece: a step, which leaves it partial (unless no token is left
    to go on with), or the rest of the answer. `delimiter` None: the last round, to the end."""
    tokens = beam.token_ids + child.token_ids
    step = None if delimiter is None else step_text(child, params.stop, delimiter, tokenizer, eos_ids)
    if step is None:
        finished = Candidate(beam.text + child.text, tokens, child.finish_reason)
        return Expansion(finished, len(child.token_ids), finished=True)
    if len(tokens) >= params.max_tokens:  # the step ends the token budget: the answer ends there
        return Expansion(Candidate(beam.text + step, tokens, "length"), len(child.token_ids), finished=True)
    partial = Candidate(beam.text + step + (delimiter or ""), tokens, "stop")
    return Expansion(partial, len(child.token_ids), finished=False)


def round_params(
    params: SamplingParams, beam: Beam, delimiter: str | None, seed: int | None, room: int
) -> SamplingParams:
    """Sampling for one beam's children: the tokens its lineage has left (and the context `room`
    its re-tokenized prompt leaves, at least one), stopping at the delimiter."""
    stops = params.stop if delimiter is None else (*params.stop, delimiter)
    left = max(1, min(params.max_tokens - len(beam.token_ids), room))
    return replace(params, max_tokens=left, stop=stops, seed=seed)
