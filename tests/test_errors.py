"""Every bad input gets its status and the OpenAI error envelope naming the field; nothing is a 500."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from conftest import API_KEYS, start_server, stop_server
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api import errors

AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}
LONG_PROMPT = " ".join(["the cat runs"] * 200)  # far over the tiny policy's 256-token context


def post(server, path: str, body, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def assert_envelope(response: httpx.Response, status: int, param: str | None = None, says: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert says.lower() in error["message"].lower()
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"model": "gpt2_policy"}, "prompt", "field required"),
        ({"model": "gpt2_policy", "prompt": "x", "temperature": -1}, "temperature", "greater than"),
        ({"model": "gpt2_policy", "prompt": "x", "top_p": 0}, "top_p", "greater than"),
        ({"model": "gpt2_policy", "prompt": "x", "max_tokens": 0}, "max_tokens", "greater than"),
        ({"model": "gpt2_policy", "prompt": "x", "n": 3, "best_of": 2}, "best_of", "at least n"),
        ({"model": "gpt2_policy", "prompt": "x", "stop": [""]}, "stop", "empty"),
        ({"model": "gpt2_policy", "prompt": []}, "prompt", "empty"),
        ({"model": "gpt2_policy", "prompt": "x", "best_of": 2, "stream": True}, "stream", "best_of > 1"),
        ({"model": "gpt2_policy", "prompt": "x", "best_of": 9}, "best_of", "at most 8"),
        ({"model": "gpt2_policy", "prompt": LONG_PROMPT}, "prompt", "maximum context length is 256"),
        (
            {"model": "gpt2_policy", "prompt": "x", "max_tokens": 300},
            "max_tokens",
            "maximum context length is 256",
        ),
    ],
)
def test_completions_bad_input(server, body, param, says):
    response = post(server, "/v1/completions", body)
    error = assert_envelope(response, 400, param, says)
    assert error["type"] == "invalid_request_error"


def test_prompt_too_long_names_the_token_counts(server):
    error = assert_envelope(
        post(server, "/v1/completions", {"model": "gpt2_policy", "prompt": LONG_PROMPT, "max_tokens": 4}),
        400,
        "prompt",
    )
    assert "in the prompt, 4 to generate" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt2_policy", "messages": []}, "messages"),
        ({"model": "gpt2_policy", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        (
            {"model": "gpt2_policy", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
        (
            {"model": "gpt2_policy", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            "logprobs",
        ),
        (
            {
                "model": "gpt2_policy",
                "messages": [{"role": "user", "content": "x"}],
                "best_of": 3,
                "stream": True,
            },
            "stream",
        ),
    ],
)
def test_chat_bad_input(server, body, param):
    assert_envelope(post(server, "/v1/chat/completions", body), 400, param)


def test_score_bad_input(server):
    assert_envelope(post(server, "/v1/score", {"prompt": "x"}), 400, None, "responses")
    assert_envelope(
        post(
            server,
            "/v1/score",
            {"prompt": "x", "responses": ["a"], "pairs": [{"prompt": "x", "response": "y"}]},
        ),
        400,
        None,
        "either",
    )
    error = assert_envelope(
        post(server, "/v1/score", {"prompt": LONG_PROMPT, "responses": ["a", "b"]}), 400, "responses"
    )
    assert "responses[0]" in error["message"] and "256" in error["message"]


def test_malformed_json_is_a_400(server):
    response = httpx.post(
        f"{server.url}/v1/completions",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_envelope(response, 400)


def test_unknown_model_is_a_404(server):
    with pytest.raises(openai.NotFoundError) as raised:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEYS[0], max_retries=0).completions.create(
            model="gpt-4", prompt="x", max_tokens=1
        )
    assert raised.value.body["param"] == "model" and raised.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {API_KEYS[0]}"},
        {"Authorization": "Bearer clé".encode("latin-1")},  # non-ASCII must not become a 500
    ],
)
def test_missing_or_wrong_key_is_a_401(server, headers):
    assert_envelope(
        post(server, "/v1/completions", {"model": "gpt2_policy", "prompt": "x"}, headers=headers),
        401,
        None,
        "api key",
    )
    assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401


def test_every_configured_key_works(server):
    for key in API_KEYS:
        assert (
            httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
        )


def test_unknown_route_uses_the_envelope(server):
    assert_envelope(httpx.get(f"{server.url}/v1/nothing-here", headers=AUTH), 404)


def test_internal_errors_are_500_without_internals():
    app = FastAPI()
    errors.install(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals /etc/passwd")

    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert_envelope(response, 500, None, "internal server error")
    assert "secret" not in response.text


def test_overload_is_a_429_with_retry_after(pair_gpt2_llama, tmp_path):
    # One queued prompt at most and a small batch budget, so a burst overflows the queue.
    server = start_server(pair_gpt2_llama, tmp_path, "--max-queued-prompts", "1", "--max-batch-tokens", "300")

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 64, "best_of": 4}
            return await asyncio.gather(
                *(client.post(f"{server.url}/v1/completions", json=body) for _ in range(8))
            )

    try:
        responses = asyncio.run(burst())
    finally:
        stop_server(server)
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert_envelope(refused, 429, None, "overloaded")
