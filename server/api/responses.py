"""Response bodies, typed: OpenAI's (plus bon's `reward` and `candidates`), bon's own, and errors.

The routes declare these as their response models, so /openapi.json describes what is sent.
Optional fields a request did not ask for (`candidates`) are left unset and so left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, TypeVar

from pydantic import BaseModel

from server.reward import Reward
from server.service import BestOfNResult, groups_out

FinishReason = Literal["stop", "length"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error, whatever its status: OpenAI's envelope."""

    error: ErrorBody


class Usage(BaseModel):
    """Each prompt counted once; every candidate's tokens counted, returned or not."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CandidateOut(BaseModel):
    """One sampled candidate (with `return_candidates`), in sampling order."""

    prompt_index: int
    index: int
    text: str
    reward: float
    rewards: dict[str, float]  # each reward member's raw reward, by name
    completion_tokens: int  # generated tokens, eos included: what length_penalty counts
    finish_reason: FinishReason
    pruned: bool  # partial (early rejection, beam search): text and reward are partial
    step_rewards: list[float] | None = None  # a process reward model's score of each step
    generated_tokens: int | None = None  # beam search: tokens decoded for this expansion alone


class VoteGroupOut(BaseModel):
    answer: str
    size: int
    weight: float  # summed reward (weighting "reward") or size ("count")


class SelectionOut(BaseModel):
    """How one prompt's returned candidates were chosen (given when the request sets `selection`)."""

    rule: Literal["max", "soft", "vote"]
    chosen: list[int]  # candidate indices returned, in order
    groups: list[VoteGroupOut] | None = None  # vote: every answer group, heaviest first


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason
    reward: float  # the reward model's raw logit (several members: their combination)
    rewards: dict[str, float]  # each reward member's raw reward, by name
    step_rewards: list[float] | None = None  # a process reward model's score of each step


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str  # bon-<policy version>-<reward model version>
    choices: list[CompletionChoice]
    usage: Usage
    candidates: list[CandidateOut] | None = None
    selection: list[SelectionOut] | None = None  # one per prompt


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason
    reward: float
    rewards: dict[str, float]
    step_rewards: list[float] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    candidates: list[CandidateOut] | None = None
    selection: list[SelectionOut] | None = None  # one per prompt


class CompletionChunk(BaseModel):
    """The one event of a streamed completion (`stream: true`, best_of 1), before `[DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    candidates: list[CandidateOut] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason
    reward: float
    rewards: dict[str, float]
    step_rewards: list[float] | None = None


class ChatCompletionChunk(BaseModel):
    """The one event of a streamed chat completion, before `[DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    candidates: list[CandidateOut] | None = None


class ScoreItem(BaseModel):
    index: int
    reward: float  # several reward members: their combination
    rewards: dict[str, float]  # each member's raw reward, by name
    step_rewards: list[float] | None = None  # a process reward model's score of each step


class ScoreResponse(BaseModel):
    object: Literal["list"]
    model: str
    reward_model: str
    data: list[ScoreItem]  # in input order


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str  # the policy directory
    policy_version: str
    reward_model: str  # several: name=path, comma-separated
    reward_model_version: str
    reward_models: dict[str, LoadedCheckpoint]  # by member name


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class FeedbackResponse(BaseModel):
    object: Literal["feedback"]
    request_id: str
    pairs: int  # comparisons stored


class LoadedCheckpoint(BaseModel):
    path: str
    version: str


class ReloadResponse(BaseModel):
    policy: LoadedCheckpoint
    reward_model: LoadedCheckpoint  # the first reward model
    reward_models: dict[str, LoadedCheckpoint]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]


def _usage(results: list[BestOfNResult]) -> Usage:
    prompt = sum(len(r.prompt.token_ids) for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


Body = TypeVar("Body", bound=BaseModel)


def with_steps(body: Body, reward: Reward, generated: int | None = None) -> Body:
    """`body` with `step_rewards` (and a beam expansion's `generated_tokens`) set when there are
    any: set fields are sent, unset ones left out."""
    if reward.steps is not None:
        body.step_rewards = reward.steps  # type: ignore[attr-defined]  # every Body here has the field
    if generated is not None:
        body.generated_tokens = generated  # type: ignore[attr-defined]
    return body


def _candidates(results: list[BestOfNResult]) -> list[CandidateOut]:
    return [
        with_steps(
            CandidateOut(
                prompt_index=p,
                index=i,
                text=s.candidate.text,
                reward=s.reward,
                rewards=s.score.members,
                completion_tokens=len(s.candidate.token_ids),
                finish_reason=s.candidate.finish_reason,
                pruned=s.pruned,
            ),
            s.score,
            s.generated,
        )
        for p, result in enumerate(results)
        for i, s in enumerate(result.candidates)
    ]


def completion_body(
    request_id: str,
    created: int,
    model: str,
    fingerprint: str,
    results: list[BestOfNResult],
    n: int,
    with_candidates: bool,
) -> CompletionResponse:
    choices = [
        with_steps(
            CompletionChoice(
                index=p * n + j,
                text=result.candidates[c].candidate.text,
                logprobs=None,
                finish_reason=result.candidates[c].candidate.finish_reason,
                reward=result.candidates[c].reward,
                rewards=result.candidates[c].score.members,
            ),
            result.candidates[c].score,
        )
        for p, result in enumerate(results)
        for j, c in enumerate(result.chosen)
    ]
    body = CompletionResponse(
        id=request_id,
        object="text_completion",
        created=created,
        model=model,
        system_fingerprint=fingerprint,
        choices=choices,
        usage=_usage(results),
    )
    if with_candidates:
        body.candidates = _candidates(results)
    return body


def chat_body(
    request_id: str, created: int, model: str, fingerprint: str, result: BestOfNResult, with_candidates: bool
) -> ChatCompletionResponse:
    choices = [
        with_steps(
            ChatChoice(
                index=j,
                message=AssistantMessage(role="assistant", content=result.candidates[c].candidate.text),
                logprobs=None,
                finish_reason=result.candidates[c].candidate.finish_reason,
                reward=result.candidates[c].reward,
                rewards=result.candidates[c].score.members,
            ),
            result.candidates[c].score,
        )
        for j, c in enumerate(result.chosen)
    ]
    body = ChatCompletionResponse(
        id=request_id,
        object="chat.completion",
        created=created,
        model=model,
        system_fingerprint=fingerprint,
        choices=choices,
        usage=_usage([result]),
    )
    if with_candidates:
        body.candidates = _candidates([result])
    return body


def as_stream(body: CompletionResponse | ChatCompletionResponse) -> Iterator[str]:
    """A finished single-candidate response as server-sent events: one chunk, then [DONE].

    Streaming is allowed only with best_of == 1, and the best candidate is known only once it is
    scored, so the text arrives in one chunk; clients that stream still work unchanged.
    """
    common = body.model_dump(
        include={"id", "created", "model", "system_fingerprint", "candidates"}, exclude_unset=True
    )
    chunk: ChatCompletionChunk | CompletionChunk
    if isinstance(body, ChatCompletionResponse):
        choices = [
            ChatChunkChoice(
                index=c.index,
                delta=ChatDelta(role="assistant", content=c.message.content),
                finish_reason=c.finish_reason,
                reward=c.reward,
                rewards=c.rewards,
                **c.model_dump(include={"step_rewards"}, exclude_unset=True),
            )
            for c in body.choices
        ]
        chunk = ChatCompletionChunk(object="chat.completion.chunk", choices=choices, **common)
    else:
        chunk = CompletionChunk(object="text_completion", choices=body.choices, **common)
    yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
    yield "data: [DONE]\n\n"


def selection_out(result: BestOfNResult) -> SelectionOut:
    choice = result.choice
    groups = None if choice.groups is None else [VoteGroupOut(**g) for g in groups_out(choice)]
    return SelectionOut(rule=choice.rule, chosen=choice.chosen, groups=groups)
