"""Concurrent requests share batches; a client that goes away has its queued work dropped."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace

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


def test_a_request_that_breaks_the_running_batch_fails_alone(models):
    """The transformers sampler: a request the model cannot run (a token id beyond its vocabulary)
    joins a running batch; the step fails, every request it held runs again alone, and only the
    bad one's caller gets the error."""
    from server.engines.contract import SampleRequest, SamplingParams
    from server.engines.hf.models import load_policy
    from server.engines.hf.sampler import TransformersSampler

    policy = load_policy(models["llama_policy"], "cpu", "float32")
    ids = policy.tokenizer("the cat runs").input_ids
    params = SamplingParams(max_tokens=6, seed=1)

    async def scenario():
        sampler = TransformersSampler(
            "cpu", "float32", max_batch_tokens=1000, max_queued=8, gather_seconds=0.05
        )
        alone = await sampler.sample(SampleRequest(ids, 2, params, policy))
        results = await asyncio.gather(
            sampler.sample(SampleRequest(ids, 2, params, policy)),
            sampler.sample(SampleRequest([10**6], 2, params, policy)),
            sampler.sample(SampleRequest(ids[:2], 3, params, policy)),
            return_exceptions=True,
        )
        await sampler.close()
        return alone, results

    alone, (good, bad, other) = asyncio.run(scenario())
    assert isinstance(bad, IndexError)
    assert [c.token_ids for c in good] == [c.token_ids for c in alone]  # rerun alone, same seed
    assert len(other) == 3 and all(len(c.token_ids) == 6 for c in other)


def test_a_short_request_finishes_while_a_long_one_decodes_and_draws_what_it_draws_alone(models):
    from server.engines.contract import SampleRequest, SamplingParams
    from server.engines.hf.models import load_policy
    from server.engines.hf.sampler import EXPRESS_TOKENS, TransformersSampler

    policy = load_policy(models["gpt2_policy"], "cpu", "float32")
    ids = policy.tokenizer("the cat runs").input_ids
    # A long request leaves the batch when its 200 tokens are done: eos must not end it early.
    long = SampleRequest(ids, 8, SamplingParams(max_tokens=200, seed=3), policy)
    short = SampleRequest(ids[:2], 2, SamplingParams(max_tokens=EXPRESS_TOKENS, seed=4), policy)

    async def scenario():
        sampler = TransformersSampler("cpu", "float32", max_batch_tokens=4000, max_queued=8)
        alone = await sampler.sample(replace(short))
        running = asyncio.ensure_future(sampler.sample(long))
        await asyncio.sleep(0.1)  # the long request is decoding
        late = await sampler.sample(replace(short))
        long_done_first = running.done()
        await running
        await sampler.close()
        return alone, late, long_done_first

    alone, late, long_done_first = asyncio.run(scenario())
    assert not long_done_first
    assert [c.token_ids for c in late] == [c.token_ids for c in alone]


def test_a_job_that_breaks_its_batch_fails_alone():
    """The batch runs again job by job: the bad job's caller gets the error, the others results."""
    from server.engines.scheduler import Scheduler

    calls = []

    class Upper:
        """A backend whose step finishes every job: its result is the job upper-cased."""

        def joins(self, job, holding):
            return True

        def step(self, jobs: list[str]) -> list[tuple[str, str]]:
            calls.append(list(jobs))
            if "bad" in jobs:
                raise OverflowError("the bad job's numbers do not fit the batch's tensors")
            return [(job, job.upper()) for job in jobs]

        def alone(self, job: str) -> str:
            [(_, result)] = self.step([job])
            return result

        def reset(self):
            pass

    async def scenario():
        batcher = Scheduler(
            Upper(), max_batch_tokens=100, max_queued=8, stage="sampling", gather_seconds=0.05
        )
        results = await asyncio.gather(
            *(batcher.submit(job, cost=1, sequences=1) for job in ("a", "bad", "b")), return_exceptions=True
        )
        await batcher.close()
        return results

    a, bad, b = asyncio.run(scenario())
    assert (a, b) == ("A", "B") and isinstance(bad, OverflowError)
    assert calls[0] == ["a", "bad", "b"] and sorted(map(tuple, calls[1:])) == [("a",), ("b",), ("bad",)]


def test_a_large_score_request_goes_in_budget_sized_chunks_and_stops_when_its_client_leaves():
    from server.engines.hf.scorer import TransformersScorer, token_budget_chunks
    from server.reward import Reward

    # Padded sizes: 2 x 4 = 8 fits; 2 + 6 would pad to 12, 6 + 1 to 12; 9 runs alone.
    inputs = [[1] * n for n in (3, 4, 2, 6, 1, 9)]
    assert token_budget_chunks(inputs, 8) == [[[1] * 3, [1] * 4], [[1] * 2], [[1] * 6], [[1] * 1], [[1] * 9]]

    class Weights:
        """Stands in for a reward model: each input's reward is its length, each call slow."""

        calls = 0

        def rewards(self, batch):
            Weights.calls += 1
            time.sleep(0.05)
            return [Reward(float(len(ids))) for ids in batch]

    async def scenario():
        scorer = TransformersScorer("cpu", "auto", max_batch_tokens=8, max_queued=8)
        assert [r.value for r in await scorer.score(inputs, Weights())] == [3.0, 4.0, 2.0, 6.0, 1.0, 9.0]
        done = Weights.calls
        task = asyncio.create_task(scorer.score(inputs * 10, Weights()))
        await asyncio.sleep(0.12)
        task.cancel()
        await asyncio.sleep(0.3)
        await scorer.close()
        return done, Weights.calls - done

    whole, cut = asyncio.run(scenario())
    assert whole == 5 and cut < 10, cut  # 50 chunks were asked for; the rest never ran
