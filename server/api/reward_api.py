"""The reward API RL trainers call as they are: OpenRLHF's `/get_reward`, vLLM's `/classify` and
`/pooling` (what verl's reward loop posts). README (Reward API) states how each body is read.

- `/get_reward` (OpenRLHF, `openrlhf/utils/agent.py: _fetch_rewards_via_http`): `query` is prompt
  and response decoded as one string by the trainer's tokenizer, special tokens kept. With
  `prompts`, each query must start with its prompt: the rest is the response, less a trailing eos
  (or pad) of the served policy's tokenizer, and the pair is scored as `/v1/score` scores a text
  prompt (each reward model's own tokenizer, the completions rule). Without `prompts` the whole
  query is the response to an empty prompt. `labels` reach the rule members as `reference`.
- `/classify` and `/pooling` (vLLM's schema; verl's `compute_score_disrm` posts
  `{"model", "input", "use_activation": false}` and reads `data[-1].probs[-1]`): `input` is the
  reward model's whole input text (already in its chat template), tokenized as vLLM does, with
  the tokenizer's special tokens; `messages` are put in the reward model's chat template.
  `use_activation` (or the deprecated `activation`) defaults to true, as in vLLM: a one-label
  model's sigmoid; false gives the raw logit. Rules need a prompt and a completion, which these
  bodies do not separate: only reward models answer here.

Keys: these routes take the API key like /v1, unless `--open-reward-routes` opens them (OpenRLHF's
and verl's clients send no Authorization header).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal, cast

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.api.errors import APIError
from server.api.openapi import V1_ERRORS, errors_of
from server.api.protocol import ChatMessage, Text
from server.api.routes import Parts
from server.assembly import Service
from server.failures import InvalidInput
from server.registry import Loaded, Pinned
from server.reward import Messages, RewardModelInfo

router = APIRouter(responses=errors_of(*V1_ERRORS), tags=["reward API"])


# --- OpenRLHF ---------------------------------------------------------------------------------------


class GetRewardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: list[Text] = Field(min_length=1, description="Prompt and response, decoded as one string.")
    prompts: list[Text] | None = Field(None, description="Each query's prompt: splits off the response.")
    labels: list[Text | None] | None = Field(None, description="Known answers, for the rule members.")

    @field_validator("prompts", "labels")
    @classmethod
    def _one_per_query(cls, given, info: ValidationInfo):
        query = info.data.get("query")
        if given is not None and query is not None and len(given) != len(query):
            raise ValueError(f"{len(given)} entries but query has {len(query)}")
        return given


class GetRewardResponse(BaseModel):
    rewards: list[float]  # the combined reward of each query
    scores: list[float]  # the same: OpenRLHF reads either
    extra_logs: dict[str, list[float]]  # each member's raw reward of each query


def split_query(query: str, prompt: str | None, trailing: list[str], index: int) -> tuple[str, str]:
    """(prompt, response) of one `/get_reward` query, as the module docstring says."""
    if prompt is None:
        prompt, response = "", query
    elif query.startswith(prompt):
        response = query[len(prompt) :]
    else:
        raise InvalidInput(
            f"query[{index}] does not start with prompts[{index}]: cannot tell the response from the prompt",
            "prompts",
        )
    stripped = True
    while stripped:
        stripped = False
        for token in trailing:
            if token and response.endswith(token):
                response, stripped = response[: -len(token)], True
    return prompt, response


@router.post("/get_reward")
async def get_reward(body: GetRewardRequest, service: Parts) -> GetRewardResponse:
    """OpenRLHF's remote reward model: the reward of each query (prompt and response)."""
    async with service.checkpoints.pinned() as pinned:
        tokenizer = pinned.policy.info.tokenizer
        trailing = [t for t in {tokenizer.eos_token, tokenizer.pad_token} if isinstance(t, str)]
        prompts: list[str | None] = list(body.prompts) if body.prompts else [None] * len(body.query)
        pairs: list[tuple[str | Messages, str]] = [
            split_query(q, p, trailing, i) for i, (q, p) in enumerate(zip(body.query, prompts, strict=True))
        ]
        labels = body.labels or [None] * len(body.query)
        rewards = await service.best_of_n.score_pairs(pinned, pairs, labels, "query")
    members = service.best_of_n.members(pinned)
    return GetRewardResponse(
        rewards=[r.value for r in rewards],
        scores=[r.value for r in rewards],
        extra_logs={name: [r.members[name] for r in rewards] for name in members},
    )


# --- vLLM's pooling schema (verl) ------------------------------------------------------------------


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: Text | list[Text] | list[int] | list[list[int]] | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    use_activation: bool | None = None
    activation: bool | None = Field(None, description="Deprecated name of use_activation.")
    add_special_tokens: bool = True
    user: str | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.input is None) == (self.messages is None):
            raise ValueError("give input (text or token ids) or messages")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input is empty")
        if self.use_activation is not None and self.activation is not None:
            if self.use_activation != self.activation:
                raise ValueError("use_activation and activation (its deprecated name) disagree")
        return self

    def activated(self) -> bool:
        chosen = self.use_activation if self.use_activation is not None else self.activation
        return True if chosen is None else chosen


class ClassificationData(BaseModel):
    index: int
    label: str | None = None
    probs: list[float]
    num_classes: int
    rewards: dict[str, float]  # bon: each reward model's raw reward


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"]
    data: list[float]
    rewards: dict[str, float]


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[ClassificationData]
    usage: PoolingUsage


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[PoolingData]
    usage: PoolingUsage


def _members(pinned: Pinned, model: str | None, served: str) -> dict[str, Loaded[RewardModelInfo]]:
    """The reward models a body asks for: one named (by member name or directory), or all."""
    if model is None or model == served:
        return pinned.reward_models
    for name, loaded in pinned.reward_models.items():
        if model in (name, str(loaded.info.path)):
            return {name: loaded}
    raise APIError(
        404,
        f"the model {model!r} does not exist; this server serves {served!r} and the reward models "
        f"{', '.join(pinned.reward_models)}",
        "model",
        "model_not_found",
    )


def _given(body: ClassifyRequest) -> tuple[list[str], list[list[int]]]:
    """The body's input as texts, or as token-id rows (one of the two is empty)."""
    given = body.input
    if isinstance(given, str):
        return [given], []
    if given and all(isinstance(x, str) for x in given):
        return cast(list[str], given), []
    if given and all(isinstance(x, int) for x in given):
        return [], [cast(list[int], given)]
    return [], cast(list[list[int]], given or [])


def _token_ids(rm: RewardModelInfo, body: ClassifyRequest, several: bool) -> list[list[int]]:
    """Each input as this reward model's token ids, whole (over its context: 400)."""
    texts, rows = _given(body)
    if body.messages is not None:
        messages = [m.plain() for m in body.messages]
        if not rm.tokenizer.chat_template:
            raise InvalidInput(f"the reward model {rm.path} has no chat template: send input", "messages")
        text = str(rm.tokenizer.apply_chat_template(messages, tokenize=False))
        rows = [rm.tokenizer(text, add_special_tokens=False).input_ids]
    elif texts:
        rows = [rm.tokenizer(text, add_special_tokens=body.add_special_tokens).input_ids for text in texts]
    else:
        if several:
            raise InvalidInput("token ids belong to one tokenizer: name one reward model in model", "input")
        vocabulary = len(rm.tokenizer)
        if any(not 0 <= t < vocabulary for row in rows for t in row):
            raise InvalidInput(
                f"input holds a token id outside the reward model's vocabulary ({vocabulary})", "input"
            )
    for index, ids in enumerate(rows):
        if not ids:
            raise InvalidInput(f"input[{index}] is empty", "input")
        if len(ids) > rm.max_length:
            raise InvalidInput(
                f"input[{index}] is {len(ids)} tokens, over the reward model's context of {rm.max_length}",
                "input",
            )
    return rows


async def _classify(
    body: ClassifyRequest, request: Request, service: Service
) -> tuple[str, list[tuple[float, dict[str, float]]], PoolingUsage]:
    """A `/classify` or `/pooling` body's model name, each input's (value as asked, with or without
    the activation; every reward model's raw reward), and the tokens read."""
    served = request.app.state.model_name
    async with service.checkpoints.pinned() as pinned:
        members = _members(pinned, body.model, served)
        inputs = await service.admission.tokenize(
            lambda: {name: _token_ids(rm.info, body, len(members) > 1) for name, rm in members.items()}
        )
        counts = {len(rows) for rows in inputs.values()}
        limit = service.admission.limits.max_score_inputs
        if max(counts) > limit:
            raise InvalidInput(
                f"input has {max(counts)} entries; this server scores at most {limit}", "input"
            )
        view = Pinned(pinned.policy, members)
        rewards = await service.best_of_n.combined(view, inputs, texts=None)
    tokens = sum(len(ids) for rows in inputs.values() for ids in rows)
    values = [(_activation(r.value, body.activated()), r.members) for r in rewards]
    return body.model or served, values, PoolingUsage(prompt_tokens=tokens, total_tokens=tokens)


def _activation(value: float, on: bool) -> float:
    """vLLM's activation for a one-label classifier: the sigmoid (written not to overflow)."""
    if not on:
        return value
    if value >= 0:
        return 1 / (1 + math.exp(-value))
    return math.exp(value) / (1 + math.exp(value))


@router.post("/classify")
async def classify(body: ClassifyRequest, request: Request, service: Parts) -> ClassifyResponse:
    """vLLM's classification endpoint: each input's reward as probs[0] (raw: use_activation false)."""
    model, values, usage = await _classify(body, request, service)
    data = [
        ClassificationData(index=i, probs=[value], num_classes=1, rewards=members)
        for i, (value, members) in enumerate(values)
    ]
    return ClassifyResponse(
        id=f"classify-{uuid.uuid4().hex}",
        object="list",
        created=int(time.time()),
        model=model,
        data=data,
        usage=usage,
    )


@router.post("/pooling")
async def pooling(body: ClassifyRequest, request: Request, service: Parts) -> PoolingResponse:
    """vLLM's pooling endpoint on a reward model: the reward of each input as data[0]."""
    model, values, usage = await _classify(body, request, service)
    data = [
        PoolingData(index=i, object="pooling", data=[value], rewards=members)
        for i, (value, members) in enumerate(values)
    ]
    return PoolingResponse(
        id=f"pool-{uuid.uuid4().hex}",
        object="list",
        created=int(time.time()),
        model=model,
        data=data,
        usage=usage,
    )
