"""The FastAPI application: the engines' life cycle, health, readiness, metrics, the middleware."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from server import metrics
from server.api import errors, reward_api
from server.api.errors import failure_response
from server.api.guard import Guard
from server.api.openapi import describe, errors_of
from server.api.responses import Health, Ready
from server.api.routes import admin, router
from server.assembly import Service, start_service
from server.checkpoints import PROBE_PROMPT, published_at
from server.engines.contract import RewardScorer, Sampler, SamplingParams
from server.failures import EngineDead, LogBehind, NotReady
from server.policy import PolicyInfo, probe_ids
from server.prompts import Prompt
from server.reload import Reloader
from server.reward import RewardModelInfo
from server.rules import Rule
from server.settings import Settings

__version__ = version("bon")

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


def _described(app: FastAPI, model_name: str, keyed: bool, public_metrics: bool) -> dict:
    app.openapi_schema = describe(app, model_name, keyed, public_metrics)
    return app.openapi_schema


async def _warm_up(app: FastAPI, service: Service) -> None:
    """One forward through each model, so /ready means a request will not pay first-call costs."""
    try:
        async with service.checkpoints.pinned() as pinned:
            policy = pinned.policy.info
            prompt = Prompt(probe_ids(policy.tokenizer), PROBE_PROMPT)
            await service.best_of_n.run(
                pinned, "warmup", [prompt], SamplingParams(max_tokens=1), n=1, best_of=1, log=False
            )
        app.state.ready = True
        log.info("ready: policy %s, reward models %s", policy.path, pinned.reward_model_label()[0])
    except Exception:
        log.exception("warm-up failed; the server stays not ready")


def build_app(
    settings: Settings,
    policy: PolicyInfo,
    reward_models: dict[str, RewardModelInfo],
    sampler: Sampler,
    scorer: RewardScorer,
    rules: list[Rule] | None = None,
) -> FastAPI:
    """Wire the engines and the checkpoints into routes.

    The caller reads (and so checks) the checkpoints and builds the engines, so a bad checkpoint or
    a missing engine stops `bon serve` before anything loads. The engines load the weights during
    start-up, which uvicorn runs before it binds the port.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = await start_service(settings, policy, reward_models, sampler, scorer, rules)
        sample_log = service.sample_log
        app.state.service = service
        app.state.reloader = reloader = Reloader(
            service.checkpoints, sampler, scorer, settings.step_delimiter
        )
        watcher = (
            asyncio.create_task(reloader.watch(settings.watch, settings.watch_interval_seconds))
            if settings.watch
            else None
        )
        roles: list[tuple[str, PolicyInfo | RewardModelInfo]] = [("policy", policy)]
        roles += [("reward_model", rm) for rm in reward_models.values()]
        for role, info in roles:
            metrics.MODEL_INFO.labels(role=role, path=str(info.path), version=info.version).set(1)
        metrics.POLICY_PUBLISHED.set(published_at(policy.path))
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
                log.info("candidate log flushed to %s", sample_log.where)

    # No /docs or /redoc: their pages load scripts from a CDN and are blank offline; /openapi.json
    # is the description.
    app = FastAPI(title="bon", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ready = False
    app.state.started = int(time.time())
    app.state.default_max_tokens = settings.default_max_tokens
    app.state.model_name = settings.model_name
    errors.install(app)

    @app.get("/health")
    async def health() -> Health:
        """The process is up (it may still be warming up)."""
        return Health(status="ok")

    @app.get("/ready", response_model=Ready, responses=errors_of(503))
    async def ready():
        """Both models are loaded, one warm-up forward has run, both engines can serve, and the
        candidate log commits."""
        if not app.state.ready:
            return failure_response(NotReady("warming up"))
        service: Service = app.state.service
        try:
            await service.best_of_n.check()
            if service.sample_log is not None:
                service.sample_log.check()
        except (EngineDead, LogBehind) as failure:
            return failure_response(failure)
        # Public, so it names no paths: /v1/models (with a key) says what is loaded.
        return Ready(status="ready")

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}, **errors_of(401)},
    )
    async def prometheus_metrics() -> Response:
        """Prometheus text format (a route rather than a mount, which would redirect to /metrics/)."""
        service: Service | None = getattr(app.state, "service", None)
        if service is not None:
            try:
                await service.best_of_n.check()
                metrics.ENGINE_HEALTHY.set(1)
            except EngineDead:
                metrics.ENGINE_HEALTHY.set(0)
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    app.include_router(reward_api.router)
    app.include_router(admin)
    keyed = bool(settings.api_key)
    app.openapi = lambda: (  # type: ignore[method-assign]  # FastAPI's documented way to extend it
        app.openapi_schema or _described(app, settings.model_name, keyed, settings.public_metrics)
    )
    app.add_middleware(
        Guard,
        api_keys=[key.get_secret_value() for key in settings.api_key],
        admin_keys=[key.get_secret_value() for key in settings.admin_key],
        max_body_bytes=settings.max_body_bytes,
        public_metrics=settings.public_metrics,
        open_reward_routes=settings.open_reward_routes,
        body_seconds=settings.body_timeout_seconds,
    )
    app.add_middleware(_RequestMetrics)  # outermost: counts what the Guard refuses too
    return app
