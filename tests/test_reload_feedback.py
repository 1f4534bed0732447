"""The server side of the loop: /v1/feedback, /admin/reload, --watch, and reload under load."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest
from conftest import start_server, stop_server

from server.log.sources import read_feedback, read_records
from trainers.data import load_feedback

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def loop_server(pair_gpt2_llama, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("loop")
    watched = workdir / "published"
    watched.mkdir()
    server = start_server(
        pair_gpt2_llama,
        workdir,
        "--admin-key",
        "admin-secret",
        "--api-key",
        "user-key",
        "--watch",
        str(watched),
        "--watch-interval-seconds",
        "0.3",
    )
    server.watched = watched
    yield server
    stop_server(server)


USER = {"Authorization": "Bearer user-key"}


def complete(server, **extra) -> dict:
    body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 4, "best_of": 3, **extra}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=USER, timeout=60)
    response.raise_for_status()
    return response.json()


def feedback(server, body) -> httpx.Response:
    # json.dumps writes NaN and Infinity as Python reads them: what a careless client sends.
    headers = {**USER, "Content-Type": "application/json"}
    return httpx.post(f"{server.url}/v1/feedback", content=json.dumps(body), headers=headers, timeout=30)


def test_feedback_is_stored_and_read_by_the_rm_trainer(loop_server):
    first = complete(loop_server, return_candidates=True, seed=1)
    second = complete(loop_server, return_candidates=True, seed=2)
    texts = [[c["text"] for c in r["candidates"]] for r in (first, second)]
    assert feedback(loop_server, {"request_id": first["id"], "chosen": 2, "rejected": 0}).json()["pairs"] == 1
    assert feedback(loop_server, {"request_id": second["id"], "ranks": [2, 1, 2]}).json()["pairs"] == 2
    time.sleep(1.2)  # the feedback rows are committed with the next flush
    stored = read_feedback(loop_server.sample_log)[-2:]
    # One numbering with the candidate log's rank column: 0 = best.
    assert [row["ranks"] for row in stored] == [[1, None, 0], [1, 0, 1]]
    groups = load_feedback(loop_server.sample_log)[-2:]
    pair, ranked = groups
    assert pair.prompt == "the cat"
    assert [(pair.responses[w], pair.responses[lo]) for w, lo in pair.pairs()] == [(texts[0][2], texts[0][0])]
    assert [(ranked.responses[w], ranked.responses[lo]) for w, lo in ranked.pairs()] == [
        (texts[1][1], texts[1][0]),
        (texts[1][1], texts[1][2]),
    ]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"request_id": "cmpl-nope", "chosen": 0, "rejected": 1}, 404, "request_id"),
        ({"request_id": "X", "chosen": 0}, 400, None),
        ({"request_id": "X", "chosen": 1, "rejected": 1}, 400, None),
        ({"request_id": "X", "ranks": [1, 1, 1]}, 400, None),
        ({"request_id": "X", "chosen": 0, "rejected": 1, "ranks": [1, 2, 3]}, 400, None),
        ({"request_id": "REAL", "chosen": 0, "rejected": 7}, 400, "rejected"),
        ({"request_id": "REAL", "ranks": [1, 2]}, 400, "ranks"),
        ({"request_id": "REAL", "prompt_index": 3, "chosen": 0, "rejected": 1}, 400, "prompt_index"),
        ({"request_id": "REAL", "ranks": [1, True, 2]}, 400, "ranks"),
        ({"request_id": "REAL", "ranks": [1, float("nan"), 2]}, 400, "ranks"),
        ({"request_id": "REAL", "ranks": [1, float("inf"), 2]}, 400, "ranks"),
        ({"request_id": "REAL", "ranks": [1, -float("inf"), 2]}, 400, "ranks"),
    ],
)
def test_bad_feedback_says_why(loop_server, body, status, param):
    if body["request_id"] == "REAL":
        body = {**body, "request_id": complete(loop_server)["id"]}
    response = feedback(loop_server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] is not None, error


def test_feedback_ranks_of_1e999_are_refused(loop_server):
    request_id = complete(loop_server)["id"]
    raw = '{"request_id": "' + request_id + '", "ranks": [1, 1e999, 2]}'
    response = httpx.post(
        f"{loop_server.url}/v1/feedback", content=raw, headers={**USER, "Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "ranks"


def test_an_unknown_request_id_is_not_echoed_whole(loop_server):
    response = feedback(loop_server, {"request_id": "x" * 500_000, "chosen": 0, "rejected": 1})
    assert response.status_code == 404 and len(response.text) < 1000


def test_feedback_on_an_unlogged_request_is_unknown(loop_server):
    unlogged = complete(loop_server, log=False)
    assert (
        feedback(loop_server, {"request_id": unlogged["id"], "chosen": 0, "rejected": 1}).status_code == 404
    )


@pytest.mark.parametrize(
    ("headers", "status"), [({}, 401), (USER, 403), ({"Authorization": "Bearer nope"}, 403)]
)
def test_admin_needs_the_admin_key(loop_server, headers, status, pair_gpt2_llama):
    body = {"policy": str(pair_gpt2_llama.policy)}
    response = httpx.post(f"{loop_server.url}/admin/reload", json=body, headers=headers)
    assert response.status_code == status and "error" in response.json()


def test_admin_is_off_without_an_admin_key(server, pair_gpt2_llama):
    response = httpx.post(
        f"{server.url}/admin/reload", json={"policy": "x"}, headers={"Authorization": "Bearer k"}
    )
    assert response.status_code == 403 and "--admin-key" in response.json()["error"]["message"]


def models_entry(server) -> dict:
    return httpx.get(f"{server.url}/v1/models", headers=USER).json()["data"][0]


def test_a_bad_checkpoint_is_refused_and_the_old_one_keeps_serving(loop_server, models, tmp_path):
    before = models_entry(loop_server)
    broken = tmp_path / "broken"
    shutil.copytree(models["gpt2_policy"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    for body in (
        {"policy": str(broken)},
        {"reward_model": str(models["two_labels_rm"])},
        {"policy": "/nowhere"},
    ):
        response = httpx.post(f"{loop_server.url}/admin/reload", json=body, headers=ADMIN, timeout=60)
        assert response.status_code == 400, response.text
        assert "still serving" in response.json()["error"]["message"]
    assert models_entry(loop_server) == before
    complete(loop_server)


def test_reload_under_concurrent_requests_fails_none(loop_server, models):
    first_policy = models_entry(loop_server)["root"]

    async def scenario():
        async with httpx.AsyncClient(timeout=120, headers=USER) as client:
            body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 16, "best_of": 4}
            requests = [
                asyncio.create_task(client.post(f"{loop_server.url}/v1/completions", json=body))
                for _ in range(12)
            ]
            await asyncio.sleep(0.05)
            reload = await client.post(
                f"{loop_server.url}/admin/reload", json={"policy": str(models["llama_policy"])}, headers=ADMIN
            )
            later = [await client.post(f"{loop_server.url}/v1/completions", json=body) for _ in range(3)]
            return reload, await asyncio.gather(*requests), later

    reload, during, after = asyncio.run(scenario())
    assert reload.status_code == 200, reload.text
    assert all(r.status_code == 200 for r in during + after)
    new = models_entry(loop_server)
    assert new["root"] == str(models["llama_policy"]) != first_policy
    fingerprints = {r.json()["system_fingerprint"] for r in after}
    assert fingerprints == {f"bon-{new['policy_version']}-{new['reward_model_version']}"}
    assert loop_server.metric("bon_model_info", role="policy", path=str(models["llama_policy"])) == 1
    assert loop_server.metric("bon_model_info", role="policy", path=first_policy) == 0
    # The accepted model names follow the policy now served, not the start-up one.
    assert complete(loop_server, model=str(models["llama_policy"]))["choices"]
    stale = {"model": first_policy, "prompt": "x", "max_tokens": 1}
    refused = httpx.post(f"{loop_server.url}/v1/completions", json=stale, headers=USER)
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "model"
    # Candidates are logged with the policy that actually produced them.
    time.sleep(1.2)  # committed within a second
    policies = {record["policy"] for record in read_records(loop_server.sample_log)}
    assert {first_policy, str(models["llama_policy"])} <= policies


def test_watch_serves_a_newly_published_checkpoint(loop_server, models):
    staging = loop_server.watched / ".v2.tmp-x"  # hidden while in progress: never picked up
    shutil.copytree(models["qwen2_policy"], staging)
    time.sleep(1.0)
    assert models_entry(loop_server)["root"] != str(loop_server.watched / "v2")
    staging.rename(loop_server.watched / "v2")
    deadline = time.monotonic() + 30
    while models_entry(loop_server)["root"] != str(loop_server.watched / "v2"):
        assert time.monotonic() < deadline, "watched checkpoint not picked up"
        time.sleep(0.2)
    assert complete(loop_server)["choices"]


def test_bon_train_rm_reads_the_feedback(loop_server, models, tmp_path):
    import subprocess
    import sys

    first = complete(loop_server)
    assert feedback(loop_server, {"request_id": first["id"], "ranks": [1, 2, 3]}).status_code == 200
    time.sleep(1.2)
    command = [
        sys.executable,
        "-m",
        "bon",
        "train",
        "rm",
        "--base",
        str(models["gpt2_policy"]),
        "--sample-log",
        str(loop_server.sample_log),
        "--output",
        str(tmp_path / "rm"),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--eval-fraction",
        "0",
        "--learning-rate",
        "1e-3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    history = json.loads((tmp_path / "rm" / "training_history.json").read_text())
    groups = load_feedback(loop_server.sample_log)
    assert len(history) == -(-len(groups) // 2)  # one step per two feedback groups
