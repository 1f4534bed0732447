"""The FastAPI application: routes, auth, readiness, metrics, and the engines' life cycle."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from server import metrics
from server.api import errors
from server.api.errors import APIError, failure_response
from server.api.guard import Guard
from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ReloadRequest,
    ScoreRequest,
)
from server.api.responses import as_stream, chat_body, completion_body
from server.engines.contract import RewardScorer, Sampler, SamplingParams
from server.failures import EngineDead, NotReady
from server.log.sample_log import FeedbackRecord, SampleLog
from server.policy import PolicyInfo
from server.reload import Reloader
from server.reward import RewardModelInfo
from server.service import BestOfN, Loaded
from server.settings import Settings

log = logging.getLogger(__name__)

ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/score",
    "/v1/feedback",
    "/v1/models",
    "/health",
    "/ready",
    "/admin/reload",
)
# How often a waiting handler checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.1


class _RequestMetrics:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which breaks disconnect detection)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in ROUTES:
            return await self.app(scope, receive, send)
        route, start, status = scope["path"], time.perf_counter(), {"code": 499}

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            metrics.REQUESTS.labels(route=route, status=str(status["code"])).inc()
            metrics.REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - start)


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
router = APIRouter(prefix="/v1")


@router.get("/models")
async def list_models(request: Request, service: Service) -> dict:
    """The served model, with the loaded policy and reward-model versions."""
    return {
        "object": "list",
        "data": [
            {
                "id": request.app.state.model_name,
                "object": "model",
                "created": request.app.state.started,
                "owned_by": "bon",
                "root": str(service.policy.path),
                "policy_version": service.policy.version,
                "reward_model": str(service.reward_model.path),
                "reward_model_version": service.reward_model.version,
            }
        ],
    }


def _params(request: Request, service: Service, body, prompts) -> SamplingParams:
    max_tokens = service.resolve_max_tokens(prompts, body.max_tokens, request.app.state.default_max_tokens)
    params = body.sampling_params(max_tokens)
    service.check_best_of(body.best_of, params, prompts)
    return params


def _maybe_stream(body: dict, stream: bool):
    return StreamingResponse(as_stream(body), media_type="text/event-stream") if stream else body


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, service: Service):
    """Best-of-N text completion for one prompt or a list of prompts."""
    body.refuse_unsupported()
    _check_model(request, service, body.model)
    prompts = await service.text_prompts(body.prompts())
    params = _params(request, service, body, prompts)
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    results = await _until_disconnect(
        request, service.run(request_id, prompts, params, body.n, body.best_of, body.log)
    )
    response = completion_body(
        request_id, created, body.model, service.fingerprint, results, body.n, body.return_candidates
    )
    return _maybe_stream(response, body.stream)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, service: Service):
    """Best-of-N chat completion; the RM reads the conversation through its own chat template."""
    body.refuse_unsupported()
    _check_model(request, service, body.model)
    prompt = await service.chat_prompt([m.plain() for m in body.messages])
    params = _params(request, service, body, [prompt])
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    [result] = await _until_disconnect(
        request, service.run(request_id, [prompt], params, body.n, body.best_of, body.log)
    )
    response = chat_body(request_id, created, body.model, service.fingerprint, result, body.return_candidates)
    return _maybe_stream(response, body.stream)


@router.post("/score")
async def score(body: ScoreRequest, request: Request, service: Service) -> dict:
    """Rewards of given responses (one prompt, many responses; or unrelated pairs), in input order."""
    _check_model(request, service, body.model)
    pairs = [
        (p.prompt if isinstance(p.prompt, str) else [m.plain() for m in p.prompt], p.response)
        for p in body.as_pairs()
    ]
    inputs = await service.score_inputs(pairs, "pairs" if body.pairs is not None else "responses")
    rewards = await _until_disconnect(request, service.score(inputs))
    return {
        "object": "list",
        "model": request.app.state.model_name,
        "reward_model": str(service.reward_model.path),
        "data": [{"index": i, "reward": r} for i, r in enumerate(rewards)],
    }


@router.post("/feedback")
async def feedback(body: FeedbackRequest, request: Request, service: Service) -> dict:
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
            f"unknown request_id {body.request_id!r}: no logged candidates (unknown id, or the "
            "request was sent with log: false)",
            "request_id",
            "unknown_request",
        )
    if body.prompt_index not in counts:
        raise APIError(
            400,
            f"prompt_index {body.prompt_index} is out of range: the request had {len(counts)} prompt(s)",
            "prompt_index",
        )
    k = counts[body.prompt_index]
    if body.ranks is not None:
        if len(body.ranks) != k:
            raise APIError(
                400, f"ranks has {len(body.ranks)} entries but the request has {k} candidates", "ranks"
            )
        ranks = body.ranks
    else:
        for field, index in (("chosen", body.chosen), ("rejected", body.rejected)):
            if index >= k:
                raise APIError(400, f"{field} is {index} but the request has candidates 0..{k - 1}", field)
        ranks = [None] * k
        ranks[body.chosen], ranks[body.rejected] = 1, 2
    sample_log.append_feedback(FeedbackRecord(body.request_id, body.prompt_index, ranks, time.time()))
    pairs = sum(1 for a in ranks for b in ranks if a is not None and b is not None and a < b)
    return {"object": "feedback", "request_id": body.request_id, "pairs": pairs}


admin = APIRouter(prefix="/admin")


@admin.post("/reload")
async def reload(body: ReloadRequest, request: Request) -> dict:
    """Load new checkpoints and switch to them; in-flight requests finish on the old ones."""
    return await request.app.state.reloader.reload(body.policy, body.reward_model)


async def _warm_up(app: FastAPI, service: BestOfN) -> None:
    """One forward through each model, so /ready means a request will not pay first-call costs."""
    try:
        prompt = service.text_prompt("Hello")
        await service.run("warmup", [prompt], SamplingParams(max_tokens=1), n=1, best_of=1, log=False)
        app.state.ready = True
        log.info("ready: policy %s, reward model %s", service.policy.path, service.reward_model.path)
    except Exception:
        log.exception("warm-up failed; the server stays not ready")


def build_app(
    settings: Settings,
    policy: PolicyInfo,
    reward_model: RewardModelInfo,
    sampler: Sampler,
    scorer: RewardScorer,
) -> FastAPI:
    """Wire the engines and the checkpoints into routes.

    The caller reads (and so checks) the checkpoints and builds the engines, so a bad checkpoint or
    a missing engine stops `bon serve` before anything loads. The engines load the weights during
    start-up, which uvicorn runs before it binds the port.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Both at once: an engine start is mostly waiting (processes, imports, warm-up).
        loads = await asyncio.gather(sampler.load(policy), scorer.load(reward_model), return_exceptions=True)
        failed = [error for error in loads if isinstance(error, BaseException)]
        if failed:
            await sampler.close()
            await scorer.close()
            raise failed[0]
        loaded_policy, loaded_reward_model = Loaded(policy, loads[0]), Loaded(reward_model, loads[1])
        sample_log = (
            None
            if settings.no_sample_log
            else SampleLog(settings.sample_log, settings.sample_log_flush_seconds)
        )
        service = BestOfN(
            policy=loaded_policy,
            reward_model=loaded_reward_model,
            sampler=sampler,
            scorer=scorer,
            sample_log=sample_log,
            max_best_of=settings.max_best_of,
            max_batch_tokens=settings.max_batch_tokens,
            max_prompts=settings.max_queued_prompts,
            max_score_inputs=settings.max_score_inputs,
            max_score_tokens=settings.max_score_tokens,
        )
        app.state.service = service
        app.state.reloader = reloader = Reloader(service)
        watcher = (
            asyncio.create_task(reloader.watch(settings.watch, settings.watch_interval_seconds))
            if settings.watch
            else None
        )
        for role, info in (("policy", policy), ("reward_model", reward_model)):
            metrics.MODEL_INFO.labels(role=role, path=str(info.path), version=info.version).set(1)
        warm_up = asyncio.create_task(_warm_up(app, service))
        try:
            yield
        finally:
            warm_up.cancel()
            if watcher is not None:
                watcher.cancel()
            await service.close()
            if sample_log is not None:
                sample_log.close()  # SIGTERM ends here: everything queued is committed first
                log.info("candidate log flushed to %s", sample_log.path)

    app = FastAPI(title="bon", lifespan=lifespan)
    app.state.ready = False
    app.state.started = int(time.time())
    app.state.default_max_tokens = settings.default_max_tokens
    app.state.model_name = settings.model_name
    errors.install(app)

    @app.get("/health")
    async def health() -> dict:
        """The process is up (it may still be warming up)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Both models are loaded, one warm-up forward has run, and both engines can serve."""
        if not app.state.ready:
            return failure_response(NotReady("warming up"))
        service: BestOfN = app.state.service
        try:
            await service.check()
        except EngineDead as dead:
            return failure_response(dead)
        # Public, so it names no paths: /v1/models (with a key) says what is loaded.
        return {"status": "ready"}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text format (a route rather than a mount, which would redirect to /metrics/)."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    app.include_router(admin)
    app.add_middleware(
        Guard,
        api_keys=[key.get_secret_value() for key in settings.api_key],
        admin_keys=[key.get_secret_value() for key in settings.admin_key],
        max_body_bytes=settings.max_body_bytes,
        public_metrics=settings.public_metrics,
    )
    app.add_middleware(_RequestMetrics)  # outermost: counts what the Guard refuses too
    return app
