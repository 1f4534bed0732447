"""Hostile and careless input against the real server: every case here once broke something (a 500,
a neighbour's failure, unbounded work, a leak); each test names the fix it holds in place."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import httpx
import psutil
import pytest
from conftest import API_KEYS, Pair, serve_command, start_server, stop_server
from reference import reward_of_ids
from transformers import AutoTokenizer

AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}
JSON = {"content-type": "application/json"}


def post(server, path: str, body, headers=AUTH, timeout: float = 120) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \\udXXX, which is valid JSON (httpx's json= cannot send it).
    content = json.dumps(body).encode()
    headers = {**headers, **JSON}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=timeout)


def refused(response: httpx.Response, status: int, param: str | None, says: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and says.lower() in error["message"].lower(), error
    return error


def complete(server, **body) -> httpx.Response:
    return post(server, "/v1/completions", {"model": "gpt2_policy", "prompt": "the cat", **body})


# --- numbers the engines cannot represent ----------------------------------------------------


def test_a_top_k_beyond_int32_is_a_400_and_a_huge_valid_one_keeps_every_token(server):
    refused(complete(server, top_k=2**63, max_tokens=2), 400, "top_k", "less than or equal")
    wide = complete(server, top_k=2**31 - 1, max_tokens=6, seed=4, best_of=3, return_candidates=True)
    plain = complete(server, top_k=0, max_tokens=6, seed=4, best_of=3, return_candidates=True)
    assert wide.status_code == 200
    assert [c["text"] for c in wide.json()["candidates"]] == [c["text"] for c in plain.json()["candidates"]]


def test_a_stop_string_over_its_limit_is_a_400(server):
    refused(complete(server, stop=["z" * 1001], max_tokens=2), 400, "stop", "at most 1000 characters")


def test_a_top_p_that_is_zero_in_float32_samples_the_most_likely_token(server):
    greedy = complete(server, temperature=0, max_tokens=6).json()["choices"][0]["text"]
    tiny = complete(server, top_p=1e-50, max_tokens=6, seed=1)
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy != ""


# --- text that is not text, and empty text ----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "gpt2_policy", "prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"model": "gpt2_policy", "prompt": ["ok", "\udfff"]}, "prompt"),
        ("/v1/completions", {"model": "gpt2_policy", "prompt": "x", "stop": ["\ud800"]}, "stop"),
        ("/v1/chat/completions",
         {"model": "gpt2_policy", "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        ("/v1/score", {"prompt": "x", "responses": ["fine", "\ud800"]}, "responses.1"),
        ("/v1/feedback", {"request_id": "\ud800", "chosen": 0, "rejected": 1}, "request_id"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    # bon's validator says "surrogate"; pydantic's JSON parser, where it reads a field, "unicode".
    assert "surrogate" in error["message"] or "unicode" in error["message"]


def test_an_empty_reward_model_input_reads_the_bos_token(server_b, pair_qwen2_gpt2):
    # The GPT-2 RM's tokenizer adds no special tokens: "" + "" is zero tokens.
    rm = pair_qwen2_gpt2.reward_model
    assert AutoTokenizer.from_pretrained(rm)("").input_ids == []
    response = post(
        server_b, "/v1/score", {"prompt": "", "responses": ["", "x"]}, {"Authorization": "Bearer env-key"}
    )
    assert response.status_code == 200, response.text
    bos = AutoTokenizer.from_pretrained(rm).bos_token_id
    assert response.json()["data"][0]["reward"] == pytest.approx(reward_of_ids(rm, [bos]), rel=1e-4, abs=1e-6)


# --- OpenAI parameters bon does not implement ---------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"), ({"presence_penalty": 0.5}, "presence_penalty"),
     ({"logit_bias": {"5": 10}}, "logit_bias"), ({"suffix": "end"}, "suffix")],
)  # fmt: skip
def test_unsupported_parameters_are_refused_by_name(server, extra, param):
    refused(complete(server, max_tokens=2, **extra), 400, param, "not supported")


def test_neutral_values_of_unsupported_parameters_and_unknown_harmless_ones_pass(server):
    response = complete(server, max_tokens=2, presence_penalty=0, logprobs=None, echo=False, user="someone")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("route", "body", "field", "hint"),
    [("/v1/completions", {"model": "gpt2_policy", "prompt": "a", "bestof": 4}, "bestof", "'best_of'"),
     ("/v1/chat/completions", {"model": "gpt2_policy", "messages": [{"role": "user", "content": "a"}],
      "return_candidate": True}, "return_candidate", "'return_candidates'"),
     ("/v1/score", {"prompt": "a", "responses": ["b"], "respones": ["c"]}, "respones", "'responses'"),
     ("/v1/completions", {"model": "gpt2_policy", "prompt": "a", "x" * 5000: 1}, "x" * 64 + "...", "")],
)  # fmt: skip
def test_a_misspelt_or_unknown_field_is_refused_by_name(server, route, body, field, hint):
    response = post(server, route, body)
    refused(response, 400, field, "unknown field")
    assert hint in response.json()["error"]["message"] and len(response.text) < 1000


def test_harmless_openai_fields_pass(server):
    extra = {"user": "u", "metadata": {"a": "b"}, "store": False, "service_tier": "auto"}
    messages = [{"role": "user", "content": "hi"}]
    for route, body in (
        ("/v1/completions", {"prompt": "a"}),
        ("/v1/chat/completions", {"messages": messages}),
    ):
        response = post(server, route, {"model": "gpt2_policy", "max_tokens": 2, **body, **extra})
        assert response.status_code == 200, response.text


def test_a_token_id_prompt_names_the_prompt_field(server):
    refused(complete(server, prompt=[1, 2, 3], max_tokens=2), 400, "prompt", "token-id prompts")


def test_max_completion_tokens_is_the_chat_name_for_max_tokens(server):
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": "gpt2_policy", "messages": messages, "max_completion_tokens": 3, "temperature": 0}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 3


# --- bounded work --------------------------------------------------------------------------------


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_429(server):
    error = refused(complete(server, prompt=["x"] * 257, max_tokens=1), 400, "prompt", "at most 256")
    assert "--max-queued-prompts" in error["message"]


def test_score_limits_name_their_flags(server):
    error = refused(
        post(server, "/v1/score", {"prompt": "x", "responses": ["a"] * 257}), 400, "responses", "257"
    )
    assert "--max-score-inputs" in error["message"]
    huge = "word " * 50_000  # far more characters than the RM's 256-token context can hold
    error = refused(
        post(server, "/v1/score", {"prompt": "x", "responses": ["a", huge]}), 400, "responses", "characters"
    )
    assert "responses[1]" in error["message"]


def test_a_prompt_too_long_in_characters_is_refused_without_tokenizing(server):
    refused(complete(server, prompt="the cat runs " * 200_000, max_tokens=1), 400, "prompt", "characters")


def test_a_body_over_the_limit_is_a_413_before_it_is_read(server):
    body = {"model": "gpt2_policy", "prompt": "x" * (9 * 2**20)}
    response = post(server, "/v1/completions", body)
    error = refused(response, 413, None, "--max-body-bytes")
    assert error["type"] == "invalid_request_error"


def rss(server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


def test_health_answers_fast_and_memory_stays_bounded_under_huge_requests(server):
    """A near-limit prompt, /v1/score and an unauthenticated body, three times over, while /health
    is polled: it must keep answering, and the server's memory must come back. (Before, one huge
    prompt blocked /health for 12-19 s. The 100 ms target is measured by
    benchmarks/health_under_load.py: a test on a shared machine asserts no absolute time.)"""
    big_prompt = {"model": "gpt2_policy", "prompt": "the cat " * 900_000, "max_tokens": 1}  # ~7 MB
    big_score = {"prompt": "x", "responses": ["word " * 400] * 256}  # the most inputs, each too long
    unauthenticated = b"{" + b" " * (7 * 2**20) + b"}"
    before = rss(server)

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:

            async def hostile():
                for _ in range(3):
                    await client.post(f"{server.url}/v1/completions", json=big_prompt, headers=AUTH)
                    await client.post(f"{server.url}/v1/score", json=big_score, headers=AUTH)
                    await client.post(
                        f"{server.url}/v1/completions",
                        content=unauthenticated,
                        headers={"content-type": "application/json"},
                    )

            latencies = []

            async def poll(done: asyncio.Event):
                while not done.is_set():
                    start = time.perf_counter()
                    assert (await client.get(f"{server.url}/health")).status_code == 200
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.02)

            done = asyncio.Event()
            poller = asyncio.create_task(poll(done))
            await hostile()
            done.set()
            await poller
            return latencies

    latencies = asyncio.run(scenario())
    assert len(latencies) > 5 and max(latencies) < 1.0, max(latencies)
    assert rss(server) - before < 200 * 2**20, (rss(server) - before) / 2**20


def test_an_unauthenticated_body_is_refused_on_its_headers(server):
    response = httpx.post(
        f"{server.url}/v1/completions",
        content=b"x" * (6 * 2**20),
        headers={"content-type": "application/json"},
    )
    refused(response, 401, None, "api key")


def test_work_of_a_client_that_leaves_mid_batch_is_counted_as_dropped(server):
    before = server.metric("bon_dropped_jobs_total", stage="sampling")
    # 64 rows of 240 tokens: over a second of decoding here, so the client leaves while it runs.
    body = {"model": "gpt2_policy", "prompt": ["the cat"] * 8, "max_tokens": 240, "best_of": 8}
    with pytest.raises(httpx.TimeoutException):
        post(server, "/v1/completions", body, timeout=0.2)
    deadline = time.monotonic() + 30
    while server.metric("bon_dropped_jobs_total", stage="sampling") == before:
        assert time.monotonic() < deadline, "the abandoned work was not counted"
        time.sleep(0.1)


# --- keys and what is public ------------------------------------------------------------------------


def test_ready_is_public_and_names_no_paths(server):
    response = httpx.get(f"{server.url}/ready")
    assert response.status_code == 200 and response.json() == {"status": "ready"}


def test_metrics_need_a_key_unless_opened(server, server_b):
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/metrics", headers=AUTH).status_code == 200
    assert httpx.get(f"{server_b.url}/metrics").status_code == 200  # --public-metrics


def test_a_key_in_the_query_string_never_reaches_the_log(server):
    response = httpx.get(f"{server.url}/v1/models?api_key=secret-in-the-query")
    assert response.status_code == 401
    time.sleep(0.2)
    assert "secret-in-the-query" not in server.output() and "/v1/models?<query hidden>" in server.output()


@pytest.mark.parametrize("value", ["", " , ", "good,"])
def test_an_empty_api_key_stops_bon_serve(pair_gpt2_llama, value):
    result = subprocess.run(
        serve_command(pair_gpt2_llama, "--port", "0"),
        env={**__import__("os").environ, "BON_API_KEY": value},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "empty key" in result.stderr, result.stderr


def test_serving_beyond_loopback_without_a_key_is_warned_about(pair_gpt2_llama, tmp_path):
    server = start_server(pair_gpt2_llama, tmp_path, "--host", "0.0.0.0")
    stop_server(server)
    assert "SERVING WITHOUT AN API KEY ON 0.0.0.0" in server.output()


# --- checkpoints in the wrong place ---------------------------------------------------------------


def test_a_reward_model_given_as_the_policy_is_refused(models):
    result = subprocess.run(
        serve_command(Pair(models["llama_rm"], models["llama_rm"]), "--port", "0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "not a causal LM" in result.stderr, result.stderr


def test_reload_refuses_an_empty_path_and_a_reward_model_as_policy(models, tmp_path):
    server = start_server(Pair(models["gpt2_policy"], models["llama_rm"]), tmp_path, "--admin-key", "adm")
    admin = {"Authorization": "Bearer adm"}
    try:
        refused(post(server, "/admin/reload", {"policy": ""}, admin), 400, "policy", "at least 1")
        refused(
            post(server, "/admin/reload", {"policy": str(models["llama_rm"])}, admin), 400, None, "causal LM"
        )
    finally:
        stop_server(server)


# --- a 500 keeps its connection -------------------------------------------------------------------


def test_after_an_internal_error_the_same_connection_serves_the_next_request(tmp_path):
    """A tiny app behind the Guard, on real uvicorn: a route that raises, then one that works, on
    one keep-alive connection."""
    import socket
    import threading

    import uvicorn
    from fastapi import FastAPI

    from server.api import errors
    from server.api.guard import Guard

    app = FastAPI()
    errors.install(app)

    @app.post("/boom")
    async def boom():
        raise RuntimeError("secret internals")

    @app.post("/fine")
    async def fine():
        return {"ok": True}

    app.add_middleware(Guard, api_keys=[], admin_keys=[], max_body_bytes=2**20, public_metrics=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=1)
        ) as client:
            broken = client.post("/boom", json={})
            assert broken.status_code == 500 and "secret" not in broken.text
            assert broken.json()["error"]["code"] == "internal_error"
            assert client.post("/fine", json={}).json() == {"ok": True}
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- files the trainers and the exporter write -----------------------------------------------------


def test_export_follows_the_output_extension(server, tmp_path):
    import sys

    import pyarrow.parquet as pq

    complete(server, max_tokens=2).raise_for_status()
    time.sleep(1.2)
    out = tmp_path / "samples.parquet"
    command = [
        sys.executable,
        "-m",
        "bon",
        "export-samples",
        "--sample-log",
        str(server.sample_log),
        "-o",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert pq.read_table(out).num_rows > 0
    unknown = subprocess.run([*command[:-1], str(tmp_path / "samples.txt")], capture_output=True, text=True)
    assert unknown.returncode == 2 and ".jsonl or .parquet" in unknown.stderr


def test_published_checkpoints_are_readable_by_others(models, tmp_path):
    import os

    from trainers.data import SFTExample
    from trainers.engine import TrainArgs
    from trainers.sft import finetune

    umask = os.umask(0o022)
    try:
        finetune(models["gpt2_policy"], [SFTExample("a", " b")] * 4, TrainArgs(epochs=1, batch_size=2),
                 tmp_path / "out", "sft")  # fmt: skip
    finally:
        os.umask(umask)
    for path in (tmp_path / "out").rglob("*"):
        assert path.stat().st_mode & 0o044 == 0o044, (path, oct(path.stat().st_mode))
