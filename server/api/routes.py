"""The API's routes: /v1 (OpenAI's and bon's) and /admin. Keys are checked before any route runs,
by the Guard middleware; every route names the statuses it can answer with (see `openapi`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.admission import Admission
from server.api.errors import APIError
from server.api.openapi import ADMIN_ERRORS, V1_ERRORS, errors_of
from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ReloadRequest,
    ScoreRequest,
)
from server.api.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    FeedbackResponse,
    LoadedCheckpoint,
    ModelCard,
    ModelList,
    ReloadResponse,
    ScoreItem,
    ScoreResponse,
    as_stream,
    chat_body,
    completion_body,
    selection_out,
    with_steps,
)
from server.assembly import Service
from server.engines.contract import SamplingParams
from server.failures import NotReady
from server.log.records import FeedbackRecord
from server.registry import Pinned
from server.selection import dense_ranks

# How often a waiting handler checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.1


def _service(request: Request) -> Service:
    if not request.app.state.ready:
        raise NotReady("the models are still warming up; retry shortly")
    return request.app.state.service


async def _pinned(request: Request) -> AsyncIterator[Pinned]:
    # This request keeps its policy and reward model even if a reload lands meanwhile.
    async with _service(request).checkpoints.pinned() as pinned:
        yield pinned


Checkpoints = Annotated[Pinned, Depends(_pinned)]
Parts = Annotated[Service, Depends(_service)]


def _check_model(request: Request, pinned: Pinned, model: str | None) -> None:
    """The served name, or the path of the policy this request runs on (it changes on reload)."""
    name = request.app.state.model_name
    if model is not None and model not in (name, str(pinned.policy.info.path)):
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {name!r}",
            "model",
            "model_not_found",
        )


async def _until_disconnect(request: Request, work):
    """Run `work`, cancelling it (and so dropping its queued batches) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client closed the request")
    finally:
        task.cancel()


# Keys are checked by the Guard middleware, on the headers, before any body is read.
router = APIRouter(prefix="/v1", responses=errors_of(*V1_ERRORS))


def _model_card(request: Request, pinned: Pinned) -> ModelCard:
    policy = pinned.policy.info
    paths, versions = pinned.reward_model_label()
    return ModelCard(
        id=request.app.state.model_name,
        object="model",
        created=request.app.state.started,
        owned_by="bon",
        root=str(policy.path),
        policy_version=policy.version,
        reward_model=paths,
        reward_model_version=versions,
        reward_models={
            name: LoadedCheckpoint(path=str(rm.info.path), version=rm.info.version)
            for name, rm in pinned.reward_models.items()
        },
    )


@router.get("/models")
async def list_models(request: Request, pinned: Checkpoints) -> ModelList:
    """The served model, with the loaded policy and reward-model versions."""
    return ModelList(object="list", data=[_model_card(request, pinned)])


@router.get("/models/{model}")
async def retrieve_model(model: str, request: Request, pinned: Checkpoints) -> ModelCard:
    """The served model, by its name (what the openai client's models.retrieve asks)."""
    _check_model(request, pinned, model)
    return _model_card(request, pinned)


def _check_step_aggregate(pinned: Pinned, step_aggregate: str | None) -> None:
    """A step rule asks for a process reward model: refused by name when none is loaded."""
    if step_aggregate is not None and not any(rm.info.steps for rm in pinned.reward_models.values()):
        raise APIError(
            400,
            "step_aggregate needs a process reward model, and this server's reward models are all "
            "outcome models",
            "step_aggregate",
            "invalid_value",
        )


def _params(request: Request, admission: Admission, pinned: Pinned, body, prompts) -> SamplingParams:
    default = request.app.state.default_max_tokens
    max_tokens = admission.resolve_max_tokens(pinned.policy.info, prompts, body.max_tokens, default)
    params = body.sampling_params(max_tokens)
    admission.check_best_of(body.sampled, params, prompts)
    return params


async def _best_of_n(request: Request, service: Service, pinned: Pinned, body, request_id: str, prompts):
    """A completions or chat request's prompts through admission's checks and the pipeline,
    cancelled if the client goes away."""
    params = _params(request, service.admission, pinned, body, prompts)
    _check_step_aggregate(pinned, body.step_aggregate)
    run = service.best_of_n.run(
        pinned, request_id, prompts, params, body.n, body.sampled, body.log, body.options()
    )
    return await _until_disconnect(request, run)


def _maybe_stream(body: CompletionResponse | ChatCompletionResponse, stream: bool):
    return StreamingResponse(as_stream(body), media_type="text/event-stream") if stream else body


@router.post("/completions", response_model=CompletionResponse, response_model_exclude_unset=True)
async def completions(body: CompletionRequest, request: Request, pinned: Checkpoints, service: Parts):
    """Best-of-N text completion for one prompt or a list of prompts."""
    body.refuse_unsupported()
    _check_model(request, pinned, body.model)
    prompts = await service.admission.text_prompts(pinned.policy.info, body.prompts())
    prompts = [replace(p, reference=r) for p, r in zip(prompts, body.references(len(prompts)), strict=True)]
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    results = await _best_of_n(request, service, pinned, body, request_id, prompts)
    response = completion_body(
        request_id, created, body.model, pinned.fingerprint, results, body.n, body.return_candidates
    )
    if body.selection is not None:
        response.selection = [selection_out(result) for result in results]
    return _maybe_stream(response, body.stream)


@router.post("/chat/completions", response_model=ChatCompletionResponse, response_model_exclude_unset=True)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, pinned: Checkpoints, service: Parts
):
    """Best-of-N chat completion; the RM reads the conversation through its own chat template."""
    body.refuse_unsupported()
    _check_model(request, pinned, body.model)
    prompt = await service.admission.chat_prompt(pinned.policy.info, [m.plain() for m in body.messages])
    prompt = replace(prompt, reference=body.references(1)[0])
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    [result] = await _best_of_n(request, service, pinned, body, request_id, [prompt])
    response = chat_body(request_id, created, body.model, pinned.fingerprint, result, body.return_candidates)
    if body.selection is not None:
        response.selection = [selection_out(result)]
    return _maybe_stream(response, body.stream)


@router.post("/score", response_model_exclude_unset=True)
async def score(body: ScoreRequest, request: Request, pinned: Checkpoints, service: Parts) -> ScoreResponse:
    """Rewards of given responses (one prompt, many responses; or unrelated pairs), in input order."""
    body.refuse_unsupported()
    _check_model(request, pinned, body.model)
    given = body.as_pairs()
    pairs = [
        (p.prompt if isinstance(p.prompt, str) else [m.plain() for m in p.prompt], p.response) for p in given
    ]
    field = "pairs" if body.pairs is not None else "responses"
    references = [p.reference for p in given]
    _check_step_aggregate(pinned, body.step_aggregate)
    rewards = await _until_disconnect(
        request, service.best_of_n.score_pairs(pinned, pairs, references, field, body.step_aggregate)
    )
    return ScoreResponse(
        object="list",
        model=request.app.state.model_name,
        reward_model=pinned.reward_model_label()[0],
        data=[
            with_steps(ScoreItem(index=i, reward=r.value, rewards=r.members), r)
            for i, r in enumerate(rewards)
        ],
    )


@router.post("/feedback")
async def feedback(body: FeedbackRequest, request: Request, service: Parts) -> FeedbackResponse:
    """Store a client's comparison of a request's candidates, for reward-model training."""
    sample_log = service.sample_log
    if sample_log is None:
        raise APIError(
            400,
            "feedback is stored with the candidate log, which this server does not keep (--no-sample-log)",
            code="no_sample_log",
        )
    counts = await asyncio.to_thread(sample_log.candidate_counts, body.request_id)
    if not counts:
        raise APIError(
            404,
            f"unknown request_id {body.request_id[:64]!r}: no logged candidates (unknown id, or the "
            "request was sent with log: false)",
            "request_id",
            "unknown_request",
        )
    if body.prompt_index not in counts:
        raise APIError(
            400,
            f"prompt_index {body.prompt_index} is out of range: the request had {len(counts)} prompt(s)",
            "prompt_index",
            "invalid_value",
        )
    k = counts[body.prompt_index]
    given: list[float | None]
    if body.ranks is not None:
        if len(body.ranks) != k:
            raise APIError(
                400,
                f"ranks has {len(body.ranks)} entries but the request has {k} candidates",
                "ranks",
                "invalid_value",
            )
        given = body.ranks
    else:
        chosen, rejected = body.chosen or 0, body.rejected or 0  # both given: the validator checked
        for field, index in (("chosen", chosen), ("rejected", rejected)):
            if index >= k:
                message = f"{field} is {index} but the request has candidates 0..{k - 1}"
                raise APIError(400, message, field, "invalid_value")
        given = [None] * k
        given[chosen], given[rejected] = 0, 1
    ranks = dense_ranks(given)  # stored as the candidate log numbers its ranks: 0 = best
    sample_log.append_feedback(FeedbackRecord(body.request_id, body.prompt_index, ranks, time.time()))
    pairs = sum(1 for a in ranks for b in ranks if a is not None and b is not None and a < b)
    return FeedbackResponse(object="feedback", request_id=body.request_id, pairs=pairs)


admin = APIRouter(prefix="/admin", responses=errors_of(*ADMIN_ERRORS))


@admin.post("/reload")
async def reload(body: ReloadRequest, request: Request) -> ReloadResponse:
    """Load new checkpoints and switch to them; in-flight requests finish on the old ones."""
    reloader = request.app.state.reloader
    members = body.reward_models
    if body.reward_model is not None:
        names = list(reloader.checkpoints.reward_models)
        if len(names) > 1:
            raise APIError(
                400,
                f"this server has {len(names)} reward models ({', '.join(names)}): name the one to "
                'reload, as {"reward_models": {NAME: DIR}}',
                "reward_model",
                "invalid_value",
            )
        members = {names[0]: body.reward_model}
    return ReloadResponse.model_validate(await reloader.reload(body.policy, members))
