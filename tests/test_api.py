"""The real server over HTTP with the official openai client: rewards, selection, usage, log."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import API_KEYS
from reference import chat_reward, completion_reward

from server.log.sources import read_records

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 3?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEYS[1], max_retries=0)


@pytest.fixture(scope="module")
def client_b(server_b):
    return openai.OpenAI(base_url=f"{server_b.url}/v1", api_key="env-key", max_retries=0)


def logged(server, request_id: str, timeout: float = 5.0) -> list[dict]:
    """The candidate log's rows of one request, waiting for the writer's commit."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in read_records(server.sample_log) if r["request_id"] == request_id]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_completion_rewards_match_an_independent_forward(client, server, pair_gpt2_llama):
    prompt = "the cat runs and the dog"
    response = client.completions.create(
        model="gpt2_policy",
        prompt=prompt,
        max_tokens=12,
        n=2,
        extra_body={"best_of": 6, "return_candidates": True},
    )
    body = response.model_dump()
    assert len(body["choices"]) == 2 and len(body["candidates"]) == 6
    for candidate in body["candidates"]:
        expected = completion_reward(pair_gpt2_llama.reward_model, prompt, candidate["text"])
        assert candidate["reward"] == pytest.approx(expected, abs=1e-4)
    # The two returned choices are the two best candidates, best first.
    best = sorted(body["candidates"], key=lambda c: -c["reward"])[:2]
    assert [c["text"] for c in body["choices"]] == [c["text"] for c in best]
    assert [c["reward"] for c in body["choices"]] == [c["reward"] for c in best]


def test_returned_choice_is_the_argmax_of_its_logged_candidates(client, server, pair_gpt2_llama):
    prompt = "one two three"
    response = client.completions.create(
        model="gpt2_policy", prompt=prompt, max_tokens=8, extra_body={"best_of": 5}
    )
    rows = logged(server, response.id)
    assert len(rows) == 5
    best = max(rows, key=lambda r: r["reward"])
    assert response.choices[0].text == best["completion"]
    assert best["rank"] == 0 and sorted(r["rank"] for r in rows) == list(range(5))
    for row in rows:  # the log's rewards are the RM's, not something the server made up
        assert row["reward"] == pytest.approx(
            completion_reward(pair_gpt2_llama.reward_model, prompt, row["completion"]), abs=1e-4
        )
        assert row["policy"] == str(pair_gpt2_llama.policy) and row["reward_model"] == str(
            pair_gpt2_llama.reward_model
        )
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0


def test_usage_counts_the_prompt_once_and_every_candidate(client, server, pair_gpt2_llama):
    from transformers import AutoTokenizer

    prompt = "seven eight nine"
    response = client.completions.create(
        model="gpt2_policy", prompt=prompt, max_tokens=6, extra_body={"best_of": 4}
    )
    rows = logged(server, response.id)
    prompt_tokens = len(AutoTokenizer.from_pretrained(pair_gpt2_llama.policy)(prompt).input_ids)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == sum(r["completion_tokens"] for r in rows)
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens


def test_chat_rewards_use_the_reward_models_chat_template(client, pair_gpt2_llama):
    response = client.chat.completions.create(
        model="gpt2_policy",
        messages=MESSAGES,
        max_tokens=10,
        extra_body={"best_of": 4, "return_candidates": True},
    )
    body = response.model_dump()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    for candidate in body["candidates"]:
        expected = chat_reward(
            pair_gpt2_llama.reward_model, pair_gpt2_llama.policy, MESSAGES, candidate["text"]
        )
        assert candidate["reward"] == pytest.approx(expected, abs=1e-4)
    best = max(body["candidates"], key=lambda c: c["reward"])
    assert body["choices"][0]["message"]["content"] == best["text"]


def test_second_pair_qwen2_policy_and_templateless_gpt2_rm(client_b, server_b, pair_qwen2_gpt2):
    response = client_b.chat.completions.create(
        model="qwen2_policy",
        messages=MESSAGES,
        max_tokens=8,
        extra_body={"best_of": 3, "return_candidates": True},
    )
    for candidate in response.model_dump()["candidates"]:
        expected = chat_reward(
            pair_qwen2_gpt2.reward_model, pair_qwen2_gpt2.policy, MESSAGES, candidate["text"]
        )
        assert candidate["reward"] == pytest.approx(expected, abs=1e-4)
    rows = logged(server_b, response.id)
    assert rows and rows[0]["prompt"][-1]["role"] == "user"  # chat prompts are logged as messages


def test_prompt_list_returns_n_choices_per_prompt(client, server):
    prompts = ["the cat", "a dog runs", "12 + 3 ="]
    response = client.completions.create(
        model="gpt2_policy", prompt=prompts, max_tokens=5, n=2, extra_body={"best_of": 3}
    )
    assert [c.index for c in response.choices] == list(range(6))
    rows = logged(server, response.id)
    assert sorted({r["prompt_index"] for r in rows}) == [0, 1, 2] and len(rows) == 9
    for index in range(3):  # each prompt's pair of choices is that prompt's top two
        mine = sorted((r for r in rows if r["prompt_index"] == index), key=lambda r: r["rank"])
        assert [c.text for c in response.choices[2 * index : 2 * index + 2]] == [
            r["completion"] for r in mine[:2]
        ]


def test_same_seed_same_candidates(client):
    def run(seed: int):
        return client.completions.create(
            model="gpt2_policy",
            prompt="the river",
            max_tokens=10,
            seed=seed,
            extra_body={"best_of": 4, "return_candidates": True},
        ).model_dump()["candidates"]

    first, second, other = run(1234), run(1234), run(99)
    assert [c["text"] for c in first] == [c["text"] for c in second]
    assert [c["text"] for c in other] != [c["text"] for c in first]


def test_max_tokens_and_stop_strings(client):
    response = client.completions.create(
        model="gpt2_policy",
        prompt="the cat",
        max_tokens=7,
        seed=5,
        extra_body={"best_of": 4, "return_candidates": True},
    )
    candidates = response.model_dump()["candidates"]
    length_cut = [c for c in candidates if c["finish_reason"] == "length"]
    assert length_cut, "a random tiny policy should run to max_tokens at least once"
    # Stop on a character that appears inside one of those texts: the same seed reproduces the
    # candidates, now cut before the stop string with finish_reason "stop".
    text = length_cut[0]["text"]
    stop = text[len(text) // 2]
    stopped = client.completions.create(
        model="gpt2_policy",
        prompt="the cat",
        max_tokens=7,
        seed=5,
        stop=[stop],
        extra_body={"best_of": 4, "return_candidates": True},
    ).model_dump()["candidates"]
    cut = stopped[candidates.index(length_cut[0])]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"] and text.startswith(cut["text"])


def test_log_false_keeps_a_request_out_of_the_log(client, server):
    response = client.completions.create(
        model="gpt2_policy", prompt="the cat", max_tokens=4, extra_body={"best_of": 2, "log": False}
    )
    time.sleep(1.5)
    assert logged(server, response.id, timeout=0) == []


def test_streaming_with_best_of_one(client):
    chunks = list(client.completions.create(model="gpt2_policy", prompt="the cat", max_tokens=5, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    chat = list(
        client.chat.completions.create(model="gpt2_policy", messages=MESSAGES, max_tokens=5, stream=True)
    )
    assert chat and chat[0].choices[0].delta.role == "assistant"


def test_models_lists_the_served_model_with_versions(client, server, pair_gpt2_llama):
    [model] = client.models.list().data
    assert model.id == "gpt2_policy"
    extra = model.model_dump()
    assert extra["root"] == str(pair_gpt2_llama.policy) and extra["reward_model"] == str(
        pair_gpt2_llama.reward_model
    )
    response = client.completions.create(model="gpt2_policy", prompt="x", max_tokens=1)
    assert response.system_fingerprint == f"bon-{extra['policy_version']}-{extra['reward_model_version']}"


def test_score_endpoint_matches_independent_forward(server, pair_gpt2_llama):
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    responses = ["four", "five, surely", "the answer is 5"]
    body = httpx.post(
        f"{server.url}/v1/score", headers=headers, json={"prompt": "2 + 3 =", "responses": responses}
    ).json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    for item, text in zip(body["data"], responses, strict=True):
        assert item["reward"] == pytest.approx(
            completion_reward(pair_gpt2_llama.reward_model, "2 + 3 =", text), abs=1e-4
        )

    pairs = [{"prompt": "the cat", "response": " runs"}, {"prompt": MESSAGES, "response": "5"}]
    body = httpx.post(f"{server.url}/v1/score", headers=headers, json={"pairs": pairs}).json()
    assert body["data"][0]["reward"] == pytest.approx(
        completion_reward(pair_gpt2_llama.reward_model, "the cat", " runs"), abs=1e-4
    )
    assert body["data"][1]["reward"] == pytest.approx(
        chat_reward(pair_gpt2_llama.reward_model, pair_gpt2_llama.policy, MESSAGES, "5"), abs=1e-4
    )


def test_health_and_ready_need_no_key(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200
