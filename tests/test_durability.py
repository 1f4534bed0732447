"""The candidate log survives kill -9 intact, and SIGTERM writes everything before exiting."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time

import httpx
from conftest import start_server, stop_server


def send(server, count: int, best_of: int = 3) -> list[str]:
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 6, "best_of": best_of}
            return await asyncio.gather(
                *(client.post(f"{server.url}/v1/completions", json=body) for _ in range(count))
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    return [r.json()["id"] for r in responses]


def logged_ids(path) -> list[str]:
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ids = [row[0] for row in connection.execute("SELECT request_id FROM candidates")]
    connection.close()
    return ids


def test_kill_9_keeps_everything_committed_a_second_earlier(pair_gpt2_llama, tmp_path):
    server = start_server(pair_gpt2_llama, tmp_path)
    try:
        ids = send(server, 6) + send(server, 6)
        time.sleep(1.2)  # past the promised commit interval
        ids += send(server, 4)  # these may or may not make it: the crash lands within their second
    finally:
        stop_server(server, signal.SIGKILL)
    assert server.process.returncode == -signal.SIGKILL
    logged = logged_ids(server.sample_log)
    for request_id in ids[:12]:
        assert logged.count(request_id) == 3
    # Whatever did land is whole: a request's candidates are committed together or not at all.
    assert all(logged.count(i) in (0, 3) for i in ids[12:])


def test_sigterm_flushes_the_queue(pair_gpt2_llama, tmp_path):
    # A one-second commit interval: without the flush on shutdown the last requests would be lost.
    server = start_server(pair_gpt2_llama, tmp_path, "--sample-log-flush-seconds", "1.0")
    try:
        ids = send(server, 8, best_of=4)
    finally:
        code = stop_server(server, signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught, as a process should.
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.output()
    logged = logged_ids(server.sample_log)
    assert sorted(set(logged)) == sorted(ids) and len(logged) == 32
    assert "candidate log flushed" in server.output()
