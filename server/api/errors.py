"""The OpenAI error envelope for every failure: {"error": {"message", "type", "param", "code"}}.

Domain failures (`server.failures`) get their status and code from one table, `FAILURES`.
FastAPI's default 422 `{"detail": [...]}` becomes a 400 naming the field; unexpected exceptions
become a 500 whose body says nothing of the internals (the traceback goes to the server log).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server import failures

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


# Seconds a client should wait before retrying a 429 or a 503 that can pass.
RETRY_AFTER_SECONDS = 1

# Domain failure -> (HTTP status, OpenAI error code, whether a retry can succeed). The most
# specific class of a failure's MRO that is listed here decides.
FAILURES: dict[type[failures.Failure], tuple[int, str, bool]] = {
    failures.ContextTooLong: (400, "context_length_exceeded", False),
    failures.InvalidInput: (400, "invalid_value", False),
    failures.CheckpointError: (400, "bad_checkpoint", False),
    failures.ReloadRefused: (400, "reload_refused", False),
    failures.Overloaded: (429, "overloaded", True),
    failures.NotReady: (503, "not_ready", True),
    failures.EngineStopped: (503, "shutting_down", False),
    failures.EngineDead: (503, "engine_dead", False),
    failures.LogBehind: (503, "log_behind", True),
    failures.NonFiniteReward: (500, "non_finite_reward", False),
    failures.RuleFailed: (500, "reward_function_failed", False),
    failures.SampleLogUnusable: (503, "sample_log_unusable", False),
}


class APIError(Exception):
    """A failure of the HTTP layer itself (auth, unknown model or route, a client that left)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers=None
) -> JSONResponse:
    body = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _field(location: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages.0.role'. Only the first part says where the
    field was (body, query string, path): a body field may itself be called "query"."""
    if location and location[0] in ("body", "query", "path"):
        location = location[1:]
    return ".".join(str(p) for p in location)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error.status, error.message, error.param, error.code, error.headers)


def failure_response(error: failures.Failure) -> JSONResponse:
    status, code, retry = next(FAILURES[cls] for cls in type(error).__mro__ if cls in FAILURES)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if retry else None
    return error_response(status, error.message, error.field, code, headers)


async def _failure(request: Request, error: failures.Failure) -> JSONResponse:
    return failure_response(error)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        return error_response(
            400, f"request body is not valid JSON: {first.get('msg')}", None, "invalid_json"
        )
    field = _field(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return error_response(400, f"{field}: {message}" if field else message, field or None, "invalid_value")


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error", code="internal_error")


def install(app: FastAPI) -> None:
    # Starlette types a handler as taking any Exception; each of these is registered for its own class.
    handlers: list[tuple[type[Exception], Callable[..., Awaitable[JSONResponse]]]] = [
        (APIError, _api_error),
        (failures.Failure, _failure),
        (RequestValidationError, _validation_error),
        (HTTPException, _http_error),
        (Exception, _internal_error),
    ]
    for kind, handler in handlers:
        app.add_exception_handler(kind, handler)
