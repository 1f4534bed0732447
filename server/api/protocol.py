"""Wire schemas of the HTTP API (OpenAI's, plus bon's extensions), validated where they are defined.

A schema violation becomes a 400 in the OpenAI error envelope naming the field (see `errors`).
Extensions: `best_of` on chat, `top_k`, `return_candidates`, `log`, `early_rejection`, `selection`,
`reference`, `step_aggregate`, `search`.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from server.engines.contract import SamplingParams
from server.failures import InvalidInput
from server.prompts import unicode_text
from server.rejection import EarlyRejection
from server.search import BeamSearch
from server.selection import MAX, Selection
from server.service import Options

Text = Annotated[str, AfterValidator(unicode_text)]

# Engines search for every stop string in the text of every row at every step (vLLM keeps a
# buffer as long as the longest): 16 stops of 400,000 characters slowed vLLM to a crawl.
MAX_STOP_CHARS = 1000
# Each round of a beam search is a sampling and a scoring call: bounded like best_of is.
MAX_SEARCH_STEPS = 64

# OpenAI parameters bon does not implement, each with the values that ask for nothing (some
# clients send those by default). Any other value is refused by name, never silently ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
}

# OpenAI parameters that change nothing bon returns (bookkeeping, or transport options): accepted
# whatever their value.
HARMLESS = frozenset(
    {"user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls",
     "prompt_cache_key", "safety_identifier"}
)  # fmt: skip


class _Request(BaseModel):
    # Fields outside the schema are kept (in model_extra) so that each can be refused by name: an
    # OpenAI parameter bon does not implement, or a misspelt one ("bestof": 4 used to pass,
    # ignored). Only the harmless OpenAI parameters pass.
    model_config = ConfigDict(extra="allow")

    def refuse_unsupported(self) -> None:
        """Raise InvalidInput naming the first field bon would otherwise ignore."""
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS or value in UNSUPPORTED.get(name, ()):
                continue
            if name in UNSUPPORTED:
                raise InvalidInput(f"{name} is not supported by this server (got {value!r})", name)
            known = [*type(self).model_fields, *HARMLESS]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise InvalidInput(
                f"unknown field {shown!r}{hint} (bon refuses fields rather than ignore them)", shown
            )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        """Text parts are joined; other part types (images, audio) have no meaning for a text RM."""
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        return unicode_text(content or "")

    def plain(self) -> dict[str, str]:
        """Role and text (the validator has joined any content parts into one string)."""
        return {"role": self.role, "content": str(self.content or "")}


class EarlyRejectionParams(BaseModel):
    """Decode every candidate to `after_tokens`, score them, and finish only the best `keep` share."""

    model_config = ConfigDict(extra="forbid")
    after_tokens: int = Field(ge=1, description="Tokens every candidate gets before the decision.")
    keep: float = Field(gt=0.0, le=1.0, description="Share of best_of decoded past it (rounded up).")

    def rule(self) -> EarlyRejection:
        return EarlyRejection(self.after_tokens, self.keep)


class SearchParams(BaseModel):
    """Step-level search instead of independent candidates (README, Step-level search)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["beam"] = Field(description="beam: keep best_of partial answers, a step at a time.")
    beam_width: int = Field(ge=1, description="Children of each surviving partial answer; divides best_of.")
    max_steps: int = Field(ge=1, le=MAX_SEARCH_STEPS, description="Rounds; the last decodes to the end.")

    def rule(self) -> BeamSearch:
        return BeamSearch(self.beam_width, self.max_steps)


StepAggregate = Literal["last", "min", "prod", "mean"]  # process_reward.AGGREGATES


class SelectionParams(BaseModel):
    """How the returned candidates are chosen among the scored ones (README, Selection rules)."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["max", "soft", "vote"] = Field(
        "max",
        description="max: the top n by reward; soft: sampled, P ~ exp(reward / temperature); "
        "vote: the best of the heaviest answer group.",
    )
    temperature: float = Field(1.0, gt=0, description="soft: lower is closer to max.")
    answer_pattern: Text | None = Field(
        None, description="vote: a regex with one group, the answer (default: the last number)."
    )
    weighting: Literal["reward", "count"] = Field(
        "reward", description="vote: a group weighs its summed reward, or its size (majority vote)."
    )
    length_penalty: float = Field(
        0.0, ge=0, description="Subtracted x completion tokens from every reward, before the rule."
    )

    @field_validator("answer_pattern")
    @classmethod
    def _one_group(cls, pattern):
        if pattern is None:
            return pattern
        try:
            groups = re.compile(pattern).groups
        except re.error as error:
            raise ValueError(f"answer_pattern is not a regular expression: {error}") from None
        if groups != 1:
            raise ValueError(f"answer_pattern must have exactly one group (the answer), not {groups}")
        return pattern

    def rule_of(self) -> Selection:
        return Selection(
            self.rule, self.temperature, self.answer_pattern, self.weighting, self.length_penalty
        )


class _Sampling(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    n: int = Field(1, ge=1)
    # validate_default: a missing best_of still runs its validator, which sets it to n.
    best_of: int | None = Field(
        None, ge=1, validate_default=True, description="Candidates sampled; the top n are returned."
    )
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # int32: what every engine's top-k tensor holds; any k above the vocabulary keeps every token.
    top_k: int = Field(0, ge=-1, le=2**31 - 1, description="0 or -1 disables top-k.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    return_candidates: bool = False
    selection: SelectionParams | None = None
    reference: Text | list[Text | None] | None = Field(
        None,
        description="The known answer, for rule reward members (--reward-function): a string, or "
        "one per prompt (null where unknown).",
    )
    log: bool = Field(True, description="false keeps this request's candidates out of the log.")
    early_rejection: EarlyRejectionParams | None = Field(
        None,
        description="Extension, off by default: stop decoding the candidates the reward model "
        "ranks lowest partway (speculative rejection).",
    )
    step_aggregate: StepAggregate | None = Field(
        None, description="How a process reward model's step scores make one reward (default: the server's)."
    )
    search: SearchParams | None = Field(
        None,
        description="Extension: step-level beam search with the reward members, instead of best_of draws.",
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        for text in stops:
            unicode_text(text)
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters")
        return stops

    # Cross-field checks are field validators (fields validate in order) so the error names the field.
    @property
    def sampled(self) -> int:
        """Candidates to sample: best_of, which the validator sets to n when it is not given."""
        return self.best_of if self.best_of is not None else self.n

    @field_validator("best_of")
    @classmethod
    def _best_of_covers_n(cls, best_of, info: ValidationInfo):
        n = info.data.get("n", 1)
        if best_of is None:
            return n
        if best_of < n:
            raise ValueError(f"best_of ({best_of}) must be at least n ({n})")
        return best_of

    @field_validator("early_rejection")
    @classmethod
    def _keeps_n(cls, rejection, info: ValidationInfo):
        n, best_of = info.data.get("n", 1), info.data.get("best_of") or 1
        if rejection is not None and rejection.rule().survivors(best_of) < n:
            raise ValueError(
                f"keep {rejection.keep} of best_of {best_of} finishes "
                f"{rejection.rule().survivors(best_of)} candidates, fewer than n ({n})"
            )
        return rejection

    @field_validator("search")
    @classmethod
    def _search_fits_best_of(cls, search, info: ValidationInfo):
        if search is None:
            return search
        best_of = info.data.get("best_of") or 1
        if best_of % search.beam_width:
            raise ValueError(f"beam_width ({search.beam_width}) must divide best_of ({best_of})")
        if info.data.get("early_rejection") is not None:
            raise ValueError("search and early_rejection cannot be combined: give one")
        return search

    @field_validator("stream")
    @classmethod
    def _no_stream_of_many(cls, stream, info: ValidationInfo):
        if stream and (info.data.get("best_of") or 1) > 1:
            raise ValueError(
                "streaming is not supported with best_of > 1: the best candidate is known only after "
                "all best_of candidates are sampled and scored"
            )
        return stream

    def selection_rule(self) -> Selection:
        return self.selection.rule_of() if self.selection is not None else MAX

    def references(self, prompts: int) -> list[str | None]:
        """One known answer (or None) per prompt, for the rule reward members."""
        if self.reference is None:
            return [None] * prompts
        if isinstance(self.reference, str):
            return [self.reference] * prompts
        return list(self.reference)

    def options(self) -> Options:
        return Options(
            rejection=self.early_rejection.rule() if self.early_rejection is not None else None,
            selection=self.selection_rule(),
            step_aggregate=self.step_aggregate,
            search=self.search.rule() if self.search is not None else None,
        )

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            stop=tuple(self.stop or ()),
            seed=self.seed,
        )


class CompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "MODEL", "prompt": "the cat", "max_tokens": 8, "best_of": 4}]
        }
    )

    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, prompt):
        """Name the field, not the union's branches ("prompt.str"), when the prompt is not text."""
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt list is empty")
        if isinstance(prompt, list) and all(isinstance(p, int) for p in prompt):
            raise ValueError("token-id prompts are not supported: send the prompt as text")
        if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)
        ):
            raise ValueError("prompt must be a string or a list of strings")
        for text in [prompt] if isinstance(prompt, str) else prompt:
            unicode_text(text)
        return prompt

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @model_validator(mode="after")
    def _a_reference_per_prompt(self):
        if isinstance(self.reference, list) and len(self.reference) != len(self.prompts()):
            raise ValueError(
                f"reference has {len(self.reference)} entries but there are {len(self.prompts())} prompts"
            )
        return self


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "best_of": 4}]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    # The chat API's newer name for max_tokens; either may be given.
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_reference(self):
        if isinstance(self.reference, list) and len(self.reference) != 1:
            raise ValueError("a chat request has one conversation: give reference as a string")
        return self

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; give one")
            self.max_tokens = self.max_completion_tokens
        return self


class ScorePair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text | list[ChatMessage]
    response: Text
    reference: Text | None = None  # the known answer, for rule reward members


class ScoreRequest(_Request):
    """Either one prompt with several responses, or a batch of unrelated (prompt, response) pairs."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "2 + 3 =", "responses": [" 5", " 6"]},
                {"pairs": [{"prompt": "the cat", "response": " runs"}]},
            ]
        }
    )

    model: str | None = None
    prompt: Text | list[ChatMessage] | None = None
    responses: list[Text] | None = None
    reference: Text | None = Field(None, description="The known answer, with prompt and responses.")
    pairs: list[ScorePair] | None = None
    step_aggregate: StepAggregate | None = Field(
        None, description="How a process reward model's step scores make one reward (default: the server's)."
    )

    @model_validator(mode="after")
    def _one_form(self):
        if self.pairs is not None:
            if self.prompt is not None or self.responses is not None or self.reference is not None:
                raise ValueError("give either pairs, or prompt with responses (and reference), not both")
            if not self.pairs:
                raise ValueError("pairs is empty")
        elif self.prompt is None or not self.responses:
            raise ValueError("give prompt with a non-empty responses list, or pairs")
        return self

    def as_pairs(self) -> list[ScorePair]:
        if self.pairs is not None:
            return self.pairs
        prompt = self.prompt
        if prompt is None:  # never past the validator: pairs, or a prompt with responses
            return []
        return [ScorePair(prompt=prompt, response=r, reference=self.reference) for r in self.responses or []]


class FeedbackRequest(BaseModel):
    """A comparison of one request's candidates: a chosen/rejected pair, or ranks over all of them."""

    model_config = ConfigDict(extra="forbid")

    request_id: Text = Field(min_length=1)
    prompt_index: int = Field(0, ge=0, description="Which prompt of a multi-prompt completion request.")
    chosen: int | None = Field(None, ge=0)
    rejected: int | None = Field(None, ge=0)
    ranks: list[float | None] | None = Field(
        None,
        description="One per candidate index; lower is better (1 = best), equal = tie, null = unranked. "
        "Stored as the candidate log numbers ranks: 0 = best.",
    )

    @field_validator("ranks", mode="before")
    @classmethod
    def _finite_numbers(cls, ranks):
        """A rank is a finite number or null: JSON's true, NaN and 1e999 (infinity) rank nothing."""
        for rank in ranks if isinstance(ranks, list) else []:
            if isinstance(rank, bool) or (isinstance(rank, float) and not math.isfinite(rank)):
                raise ValueError(f"a rank is a finite number or null, not {rank!r}")
        return ranks

    @model_validator(mode="after")
    def _one_form(self):
        pair = self.chosen is not None or self.rejected is not None
        if pair == (self.ranks is not None):
            raise ValueError("give either chosen and rejected, or ranks")
        if pair and (self.chosen is None or self.rejected is None):
            raise ValueError("chosen and rejected go together")
        if pair and self.chosen == self.rejected:
            raise ValueError("chosen and rejected must be different candidates")
        if self.ranks is not None and len({r for r in self.ranks if r is not None}) < 2:
            raise ValueError("ranks must hold at least two different ranks (all ties compare nothing)")
        return self


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Text | None = Field(None, min_length=1)
    reward_model: Text | None = Field(
        None, min_length=1, description="The reward model's new directory, when the server has one."
    )
    reward_models: dict[str, Text] | None = Field(
        None, description="New directories by reward member name; reloaded one at a time."
    )

    @model_validator(mode="after")
    def _something(self):
        if self.policy is None and self.reward_model is None and not self.reward_models:
            raise ValueError("give policy, reward_model or reward_models (checkpoint directories)")
        if self.reward_model is not None and self.reward_models is not None:
            raise ValueError("give reward_model or reward_models, not both")
        return self
