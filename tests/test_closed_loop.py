"""The closed loop on a task a tiny model learns in seconds: serve -> log -> RAFT -> reload.

Gold score: the share of digits in a completion. A random tiny policy writes few; an RM trained
on gold-ranked samples learns to prefer digits; RAFT on what the server logged must then raise the
gold score of fresh samples on prompts that were never sent.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import httpx
from conftest import Pair, start_server, stop_server

from server.engines.contract import SampleRequest, SamplingParams
from server.engines.hf.decoding import generate
from server.engines.hf.models import load_policy
from trainers.data import PreferenceGroup
from trainers.engine import TrainArgs
from trainers.raft import Selection, raft_from_log
from trainers.reward import train_reward_model

WORDS = "the a cat dog bird fish tree river stone city road house light dark red blue".split()


def gold(text: str) -> float:
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


def sample(policy_dir, prompts: list[str], k: int, seed: int) -> list[list[str]]:
    policy = load_policy(policy_dir, "cpu", "auto")
    requests = [
        SampleRequest(policy.tokenizer(p).input_ids, k, SamplingParams(max_tokens=6, seed=seed + i), policy)
        for i, p in enumerate(prompts)
    ]
    return [[c.text for c in cands] for cands in generate(policy, requests)]


def mean_gold(samples: list[list[str]]) -> float:
    return statistics.fmean(gold(t) for texts in samples for t in texts)


def test_raft_on_the_served_log_raises_the_gold_score(models, tmp_path):
    policy = models["gpt2_policy"]
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(96)]
    train, held_out = prompts[:64], prompts[64:]

    # A reward model from gold-ranked samples (ties where the digit share is equal).
    groups = [
        PreferenceGroup(p, texts, [-gold(t) for t in texts])
        for p, texts in zip(train, sample(policy, train, 8, 0), strict=True)
    ]
    rm_args = TrainArgs(epochs=12, learning_rate=2e-3, batch_size=4, max_length=64)
    history = train_reward_model(policy, groups, rm_args, tmp_path / "rm", eval_fraction=0.2)
    assert history[-1]["eval_accuracy"] > 0.6

    server = start_server(Pair(policy, tmp_path / "rm"), tmp_path, "--admin-key", "admin")
    try:

        async def send():
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": "gpt2_policy", "max_tokens": 6, "best_of": 8}
                return await asyncio.gather(
                    *(
                        client.post(f"{server.url}/v1/completions", json={**body, "prompt": p, "seed": i})
                        for i, p in enumerate(train)
                    )
                )

        assert all(r.status_code == 200 for r in asyncio.run(send()))
        time.sleep(1.2)  # the log commits within a second
        raft_args = TrainArgs(epochs=6, learning_rate=2e-3, batch_size=8, max_length=64)
        manifest = raft_from_log(policy, server.sample_log, tmp_path / "raft", raft_args, Selection(top_k=1))
        assert manifest["samples_seen"] == 64 * 8 and manifest["prompts_kept"] == len(set(train))
        assert manifest["reward"]["kept"]["mean"] > manifest["reward"]["all"]["mean"]

        reload = httpx.post(
            f"{server.url}/admin/reload",
            json={"policy": str(tmp_path / "raft")},
            headers={"Authorization": "Bearer admin"},
            timeout=60,
        )
        assert reload.status_code == 200 and reload.json()["policy"]["version"] == manifest["version"]
    finally:
        stop_server(server)

    before, after = (
        mean_gold(sample(policy, held_out, 8, 1000)),
        mean_gold(sample(tmp_path / "raft", held_out, 8, 1000)),
    )
    assert after > before + 0.03, (before, after)
