"""/openapi.json as the server behaves: errors in OpenAI's envelope, bearer keys, real content types.

FastAPI's generated document promises a 422 `{"detail"}` the server never sends (its handler
answers 400 in the envelope) and knows nothing of the Guard's 401/403/413; it is corrected here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from server.api.responses import ChatCompletionChunk, CompletionChunk, ErrorEnvelope

_WHY = {
    400: "Invalid request: the field at fault is `error.param`",
    401: "Missing or invalid key",
    403: "The key may not use this route",
    404: "Unknown model or record",
    408: "Body not sent within --body-timeout-seconds",
    413: "Request body over --max-body-bytes",
    429: "Queue full; retry after `Retry-After` seconds",
    500: "Internal error (no details are shown)",
    503: "Warming up (`Retry-After`), an engine died, or the candidate log is behind",
}
# What every /v1 route can answer besides success: the Guard's, the schema's, the engines'.
V1_ERRORS = (400, 401, 404, 408, 413, 429, 500, 503)
ADMIN_ERRORS = (400, 401, 403, 408, 413, 500)

# The event stream of each route that may stream (`stream: true`): one chunk, then "[DONE]".
STREAMED: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionChunk,
    "/v1/chat/completions": ChatCompletionChunk,
}
SERIALIZATION: JsonSchemaMode = "serialization"  # a stream's chunks are only ever written


def errors_of(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route for these error statuses, all in the envelope."""
    return {status: {"model": ErrorEnvelope, "description": _WHY[status]} for status in statuses}


def describe(app: FastAPI, model_name: str, keyed: bool, public_metrics: bool) -> dict[str, Any]:
    """The OpenAPI document of `app`, corrected (see the module docstring).

    `model` fields list the one served name, so a client (or a fuzzer) that follows the schema
    reaches sampling and scoring instead of stopping at 404.
    """
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, chunks = models_json_schema(
        [(chunk, SERIALIZATION) for chunk in STREAMED.values()], ref_template="#/components/schemas/{model}"
    )
    schemas.update(chunks["$defs"])
    for path, chunk in STREAMED.items():
        # Each event's data is the chunk as JSON, or the "[DONE]" that ends the stream.
        json_chunk = {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"},
        }
        data = {"anyOf": [{"const": "[DONE]"}, json_chunk]}
        event = {"type": "object", "required": ["data"], "properties": {"data": data}}
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {"schema": event}
    served = {"type": "string", "enum": [model_name]}
    for schema in schemas.values():
        properties = schema.get("properties", {})
        if "model" in properties:
            required = "model" in schema.get("required", [])
            properties["model"] = served if required else {"anyOf": [served, {"type": "null"}]}
        for example in schema.get("examples", []):
            if "model" in example:
                example["model"] = model_name
    security = {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key (--api-key)"}}
    document.setdefault("components", {})["securitySchemes"] = security
    for path, operations in document["paths"].items():
        keyed_path = path.startswith("/v1/") or (path == "/metrics" and not public_metrics)
        guarded = path.startswith("/admin/") or (keyed and keyed_path)
        for operation in operations.values():
            operation["responses"].pop("422", None)
            if guarded:
                operation["security"] = [{"bearer": []}]
    return document
