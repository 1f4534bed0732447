"""The API's routes: /v1 (OpenAI's and bon's) and /admin. Keys are checked before any route runs,
by the Guard middleware; every route names the statuses it can answer with (see `openapi`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

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
    ModelCard,
    ModelList,
    ReloadResponse,
    ScoreItem,
    ScoreResponse,
    as_stream,
    chat_body,
    completion_body,
)
from server.engines.contract import SamplingParams
from server.failures import NotReady
from server.log.sample_log import FeedbackRecord
from server.service import BestOfN

# How often a waiting handler checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.1


async def _service(request: Request) -> AsyncIterator[BestOfN]:
    if not request.app.state.ready:
        raise NotReady("the models are still warming up; retry shortly")
    # Pinned: this request keeps its policy and reward model even if a reload lands meanwhile.
    async with request.app.state.service.pinned() as service:
        yield service


Service = Annotated[BestOfN, Depends(_service)]


def _check_model(request: Request, service: BestOfN, model: str | None) -> None:
    """The served name, or the path of the policy this request runs on (it changes on reload)."""
    name = request.app.state.model_name
    if model is not None and model not in (name, str(service.policy.path)):
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


def _model_card(request: Request, service: BestOfN) -> ModelCard:
    return ModelCard(
        id=request.app.state.model_name,
        object="model",
        created=request.app.state.started,
        owned_by="bon",
        root=str(service.policy.path),
        policy_version=service.policy.version,
        reward_model=str(service.reward_model.path),
        reward_model_version=service.reward_model.version,
    )


@router.get("/models")
async def list_models(request: Request, service: Service) -> ModelList:
    """The served model, with the loaded policy and reward-model versions."""
    return ModelList(object="list", data=[_model_card(request, service)])


@router.get("/models/{model}")
async def retrieve_model(model: str, request: Request, service: Service) -> ModelCard:
    """The served model, by its name (what the openai client's models.retrieve asks)."""
    _check_model(request, service, model)
    return _model_card(request, service)


def _params(request: Request, service: Service, body, prompts) -> SamplingParams:
    max_tokens = service.resolve_max_tokens(prompts, body.max_tokens, request.app.state.default_max_tokens)
    params = body.sampling_params(max_tokens)
    service.check_best_of(body.best_of, params, prompts)
    return params


def _maybe_stream(body: CompletionResponse | ChatCompletionResponse, stream: bool):
    return StreamingResponse(as_stream(body), media_type="text/event-stream") if stream else body


@router.post("/completions", response_model=CompletionResponse, response_model_exclude_unset=True)
async def completions(body: CompletionRequest, request: Request, service: Service):
    """Best-of-N text completion for one prompt or a list of prompts."""
    body.refuse_unsupported()
    _check_model(request, service, body.model)
    prompts = await service.text_prompts(body.prompts())
    params = _params(request, service, body, prompts)
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    results = await _until_disconnect(
        request, service.run(request_id, prompts, params, body.n, body.best_of, body.log, body.rejection())
    )
    response = completion_body(
        request_id, created, body.model, service.fingerprint, results, body.n, body.return_candidates
    )
    return _maybe_stream(response, body.stream)


@router.post("/chat/completions", response_model=ChatCompletionResponse, response_model_exclude_unset=True)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: Service):
    """Best-of-N chat completion; the RM reads the conversation through its own chat template."""
    body.refuse_unsupported()
    _check_model(request, service, body.model)
    prompt = await service.chat_prompt([m.plain() for m in body.messages])
    params = _params(request, service, body, [prompt])
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    [result] = await _until_disconnect(
        request, service.run(request_id, [prompt], params, body.n, body.best_of, body.log, body.rejection())
    )
    response = chat_body(request_id, created, body.model, service.fingerprint, result, body.return_candidates)
    return _maybe_stream(response, body.stream)


@router.post("/score")
async def score(body: ScoreRequest, request: Request, service: Service) -> ScoreResponse:
    """Rewards of given responses (one prompt, many responses; or unrelated pairs), in input order."""
    body.refuse_unsupported()
    _check_model(request, service, body.model)
    pairs = [
        (p.prompt if isinstance(p.prompt, str) else [m.plain() for m in p.prompt], p.response)
        for p in body.as_pairs()
    ]
    inputs = await service.score_inputs(pairs, "pairs" if body.pairs is not None else "responses")
    rewards = await _until_disconnect(request, service.score(inputs))
    return ScoreResponse(
        object="list",
        model=request.app.state.model_name,
        reward_model=str(service.reward_model.path),
        data=[ScoreItem(index=i, reward=r) for i, r in enumerate(rewards)],
    )


@router.post("/feedback")
async def feedback(body: FeedbackRequest, request: Request, service: Service) -> FeedbackResponse:
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
    if body.ranks is not None:
        if len(body.ranks) != k:
            raise APIError(
                400,
                f"ranks has {len(body.ranks)} entries but the request has {k} candidates",
                "ranks",
                "invalid_value",
            )
        ranks = body.ranks
    else:
        for field, index in (("chosen", body.chosen), ("rejected", body.rejected)):
            if index >= k:
                message = f"{field} is {index} but the request has candidates 0..{k - 1}"
                raise APIError(400, message, field, "invalid_value")
        ranks = [None] * k
        ranks[body.chosen], ranks[body.rejected] = 1, 2
    sample_log.append_feedback(FeedbackRecord(body.request_id, body.prompt_index, ranks, time.time()))
    pairs = sum(1 for a in ranks for b in ranks if a is not None and b is not None and a < b)
    return FeedbackResponse(object="feedback", request_id=body.request_id, pairs=pairs)


admin = APIRouter(prefix="/admin", responses=errors_of(*ADMIN_ERRORS))


@admin.post("/reload")
async def reload(body: ReloadRequest, request: Request) -> ReloadResponse:
    """Load new checkpoints and switch to them; in-flight requests finish on the old ones."""
    return ReloadResponse.model_validate(
        await request.app.state.reloader.reload(body.policy, body.reward_model)
    )
