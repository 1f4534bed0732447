"""What every request meets before the app reads it: keys, a body-size limit, and a last catch.

A pure ASGI middleware, the outermost one of the app:
- API keys guard /v1/*, the reward API (unless it is open) and /metrics (unless it is public),
  admin keys /admin/*, checked on the
  headers alone, so a caller without a key costs no body read or parse;
- the body is read here, at most `max_body_bytes` of it (413 beyond, from Content-Length before
  reading anything, or as a chunked body streams in), within `body_seconds` (408 past it, and the
  connection is closed), and handed on;
- an exception nobody handled becomes a 500 envelope here. Starlette's own handler re-raises
  after answering, and uvicorn then drops the keep-alive connection without `Connection: close`,
  so a client's next request on it failed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from server.api.errors import error_response

log = logging.getLogger(__name__)

# The reward API (server/api/reward_api.py): keyed like /v1 unless --open-reward-routes.
REWARD_ROUTES = ("/get_reward", "/classify", "/pooling")

# A refused request's body is read and dropped up to this many times the body limit (see _refuse).
DRAINED = 4


class TimedOut:
    """What `_read_body` returns when the body did not arrive in time."""


def _bearer(headers: dict[bytes, bytes]) -> bytes | None:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return token if scheme.lower() == b"bearer" and token else None


def _known(token: bytes | None, keys: list[bytes]) -> bool:
    # Bytes: a header may carry any byte, and compare_digest takes bytes whatever they are.
    return token is not None and any(secrets.compare_digest(token, key) for key in keys)


class Guard:
    def __init__(
        self,
        app,
        api_keys: list[str],
        admin_keys: list[str],
        max_body_bytes: int,
        public_metrics: bool,
        open_reward_routes: bool = False,
        body_seconds: float = 30.0,
    ):
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]
        self.admin_keys = [key.encode() for key in admin_keys]
        self.max_body_bytes = max_body_bytes
        self.public_metrics = public_metrics
        self.open_reward_routes = open_reward_routes
        self.body_seconds = body_seconds

    def _refusal(self, path: str, headers: dict[bytes, bytes]):
        """The error response for a caller without the key this path needs, else None."""
        token = _bearer(headers)
        if path.startswith("/admin/"):
            if token is None:
                return error_response(
                    401, "admin routes need Authorization: Bearer <admin key>", code="invalid_api_key"
                )
            if not self.admin_keys:
                return error_response(
                    403, "the admin API is off: start bon serve with --admin-key", code="admin_disabled"
                )
            if not _known(token, self.admin_keys):
                return error_response(403, "this key may not use the admin API", code="forbidden")
            return None
        keyed = (
            path.startswith("/v1/")
            or (path == "/metrics" and not self.public_metrics)
            or (path in REWARD_ROUTES and not self.open_reward_routes)
        )
        if keyed and self.api_keys and not _known(token, self.api_keys):
            return error_response(
                401, "missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key"
            )
        return None

    async def _read_body(self, receive, limit: int, keep: bool = True) -> bytes | None | TimedOut:
        """The whole body (empty unless `keep`), None once it passes `limit` (the rest is not
        read), or TimedOut when it has not all arrived within `body_seconds`."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return TimedOut()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            if keep:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _refuse(self, response, announced: int, scope, receive, send) -> None:
        """Answer without using the body. Up to a few times the limit, the body is read and thrown
        away, so that the client reads the answer rather than a connection reset mid-upload; past
        that (or when it is slow to come, or its Content-Length, `announced`, is larger) the
        connection is closed instead."""
        if announced > DRAINED * self.max_body_bytes or not isinstance(
            await self._read_body(receive, DRAINED * self.max_body_bytes, keep=False), bytes
        ):
            response.headers["Connection"] = "close"
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        announced = int(length) if length.isdigit() else 0  # 0: none given (chunked, or no body)
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await self._refuse(refusal, announced, scope, receive, send)

        too_large = error_response(
            413, f"request body over {self.max_body_bytes} bytes (--max-body-bytes)", code="request_too_large"
        )
        # Announced past what would be drained: refused (and closed) before reading a byte.
        body = (
            await self._read_body(receive, self.max_body_bytes)
            if announced <= DRAINED * self.max_body_bytes
            else None
        )
        if body is None:
            return await self._refuse(too_large, announced, scope, receive, send)
        if isinstance(body, TimedOut):
            slow = error_response(
                408,
                f"the request body did not arrive within {self.body_seconds:g} s (--body-timeout-seconds)",
                code="request_timeout",
                headers={"Connection": "close"},
            )
            return await slow(scope, receive, send)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then what the client does next: a disconnect

        started = False

        async def send_recording(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, send_recording)
        except Exception:
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            if started:
                raise  # half a response went out: nothing to repair
            await error_response(500, "internal server error", code="internal_error")(scope, replay, send)
