"""Concurrent requests share batches; a client that goes away has its queued work dropped."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import pytest
from conftest import API_KEYS, ENGINE, start_server, stop_server

AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}


def bucket(server, name: str, le: str, **labels) -> float:
    return server.metric(f"{name}_bucket", le=le, **labels)


def test_concurrent_requests_share_batches(server):
    if ENGINE == "vllm":
        pytest.skip("vLLM schedules its own batches; bon's batch histograms describe the transformers engine")
    name, stage = "bon_batch_sequences", {"stage": "sampling"}
    small_before = bucket(server, name, "4.0", **stage)
    total_before = server.metric(f"{name}_count", **stage)

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 24, "best_of": 4}
            return await asyncio.gather(
                *(client.post(f"{server.url}/v1/completions", json=body) for _ in range(8))
            )

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    batches = server.metric(f"{name}_count", **stage) - total_before
    small = bucket(server, name, "4.0", **stage) - small_before
    # 8 requests x 4 candidates: a one-request-at-a-time loop would make 8 batches of 4 sequences.
    assert batches < 8
    assert batches - small >= 1, "no batch held more than one request's candidates"


def test_disconnected_client_has_its_queued_work_dropped(pair_gpt2_llama, tmp_path):
    # The budget fits one long request per batch, so the second waits in the queue.
    server = start_server(
        pair_gpt2_llama, tmp_path, "--max-batch-tokens", "4000", "--sample-log-flush-seconds", "0.2"
    )
    long_body = {
        "model": "gpt2_policy",
        "prompt": "the cat",
        "max_tokens": 240,
        "best_of": 16,  # sampled: a greedy request would decode one row and leave room in the batch
    }

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            first = asyncio.create_task(client.post(f"{server.url}/v1/completions", json=long_body))
            await asyncio.sleep(0.05)
            try:  # gives up while queued behind the first request
                await client.post(
                    f"{server.url}/v1/completions", json={**long_body, "prompt": "a dog"}, timeout=0.3
                )
            except httpx.TimeoutException:
                pass
            return await first

    try:
        first = asyncio.run(scenario())
        assert first.status_code == 200
        deadline = time.monotonic() + 10
        while server.metric("bon_dropped_jobs_total", stage="sampling") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.metric("bon_dropped_jobs_total", stage="sampling") == 1
        time.sleep(0.5)
        rows = (
            sqlite3.connect(server.sample_log)
            .execute("SELECT DISTINCT request_id FROM candidates")
            .fetchall()
        )
        assert rows == [(first.json()["id"],)]  # nothing sampled or logged for the abandoned request
    finally:
        stop_server(server)
