"""Wire schemas of the HTTP API (OpenAI's, plus bon's extensions), validated where they are defined.

A schema violation becomes a 400 in the OpenAI error envelope naming the field (see `errors`).
Extensions: `best_of` on chat, `top_k`, `return_candidates`, `log`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.engines.contract import SamplingParams


class _Request(BaseModel):
    # OpenAI clients send fields we do not use (user, presence_penalty...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


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
            return "".join(texts)
        return content or ""

    def plain(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content or ""}


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
    top_k: int = Field(0, ge=-1, description="0 or -1 disables top-k.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    return_candidates: bool = False
    log: bool = Field(True, description="false keeps this request's candidates out of the log.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return stops

    # Cross-field checks are field validators (fields validate in order) so the error names the field.
    @field_validator("best_of")
    @classmethod
    def _best_of_covers_n(cls, best_of, info: ValidationInfo):
        n = info.data.get("n", 1)
        if best_of is None:
            return n
        if best_of < n:
            raise ValueError(f"best_of ({best_of}) must be at least n ({n})")
        return best_of

    @field_validator("stream")
    @classmethod
    def _no_stream_of_many(cls, stream, info: ValidationInfo):
        if stream and (info.data.get("best_of") or 1) > 1:
            raise ValueError(
                "streaming is not supported with best_of > 1: the best candidate is known only after "
                "all best_of candidates are sampled and scored"
            )
        return stream

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
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt list is empty")
        return prompt

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs):
        if logprobs:
            raise ValueError("logprobs are not supported")
        return logprobs


class ScorePair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | list[ChatMessage]
    response: str


class ScoreRequest(_Request):
    """Either one prompt with several responses, or a batch of unrelated (prompt, response) pairs."""

    model: str | None = None
    prompt: str | list[ChatMessage] | None = None
    responses: list[str] | None = None
    pairs: list[ScorePair] | None = None

    @model_validator(mode="after")
    def _one_form(self):
        if self.pairs is not None:
            if self.prompt is not None or self.responses is not None:
                raise ValueError("give either pairs, or prompt with responses, not both")
            if not self.pairs:
                raise ValueError("pairs is empty")
        elif self.prompt is None or not self.responses:
            raise ValueError("give prompt with a non-empty responses list, or pairs")
        return self

    def as_pairs(self) -> list[ScorePair]:
        if self.pairs is not None:
            return self.pairs
        return [ScorePair(prompt=self.prompt, response=r) for r in self.responses or []]


class FeedbackRequest(BaseModel):
    """A comparison of one request's candidates: a chosen/rejected pair, or ranks over all of them."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1)
    prompt_index: int = Field(0, ge=0, description="Which prompt of a multi-prompt completion request.")
    chosen: int | None = Field(None, ge=0)
    rejected: int | None = Field(None, ge=0)
    ranks: list[float | None] | None = Field(
        None, description="One per candidate index; 1 = best, equal = tie."
    )

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

    policy: str | None = None
    reward_model: str | None = None

    @model_validator(mode="after")
    def _something(self):
        if self.policy is None and self.reward_model is None:
            raise ValueError("give policy and/or reward_model (checkpoint directories)")
        return self
