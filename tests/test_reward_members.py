"""Several reward members in one server: two reward models with different tokenizers, standardised
by their reward_stats.json, two rule rewards, combined by uwo with weights; each member's value is
checked against an independent computation, and the combination against README's formula."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from conftest import Pair, same_on_every_engine, start_server, stop_server
from reference import completion_reward, reward_of_ids
from transformers import AutoTokenizer

KEY = "members-key"
USER = {"Authorization": f"Bearer {KEY}"}
ADMIN = {"Authorization": "Bearer members-admin"}
STATS = {"a": (0.1, 2.0), "b": (-0.3, 0.5)}  # (mean, std) written beside each reward model
WEIGHTS = {"a": 2.0, "b": 1.0, "exact": 0.5, "letters": 1.0, "moody": 1.0}
PENALTY = 0.3


def last_number_matches(completion: str, reference: str) -> float:
    """exact_match restated: the last number of the completion equals the reference."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion)
    return float(bool(numbers) and numbers[-1] == reference)


def uwo(raw: dict[str, float]) -> float:
    """README's uwo on standardised members: weighted mean minus lambda x weighted variance."""
    z = {n: (v - STATS[n][0]) / STATS[n][1] if n in STATS else v for n, v in raw.items()}
    total = sum(WEIGHTS[n] for n in z)
    mean = sum(WEIGHTS[n] * v for n, v in z.items()) / total
    variance = sum(WEIGHTS[n] * (v - mean) ** 2 for n, v in z.items()) / total
    return mean - PENALTY * variance


@pytest.fixture(scope="module")
def members(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    dirs = {"a": root / "a", "b": root / "rm_b"}
    shutil.copytree(models["llama_rm"], dirs["a"])
    shutil.copytree(models["gpt2_rm_plain"], dirs["b"])
    for name, directory in dirs.items():
        mean, std = STATS[name]
        (directory / "reward_stats.json").write_text(json.dumps({"mean": mean, "std": std}))
    args = [
        "--reward-model", str(dirs["b"]),  # named after its directory: rm_b
        "--reward-function", "exact=server.rules:exact_match",
        "--reward-function", "letters=tests.rule_rewards:letters",
        "--reward-function", "moody=tests.rule_rewards:moody",
        "--reward-function-timeout-seconds", "1",
        "--reward-combine", "uwo", "--reward-uncertainty-penalty", str(PENALTY),
        "--reward-weights", "a=2,exact=0.5",
        "--api-key", KEY, "--admin-key", "members-admin", "--open-reward-routes", "--max-best-of", "8",
    ]  # fmt: skip
    server = start_server(Pair(models["gpt2_policy"], f"a={dirs['a']}"), root, *args)
    yield server, {"a": dirs["a"], "rm_b": dirs["b"]}
    stop_server(server)


def post(server, path: str, body: dict, headers=USER) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def expected_members(dirs, prompt: str, completion: str, reference: str) -> dict[str, float]:
    return {
        "a": completion_reward(dirs["a"], prompt, completion),
        "rm_b": completion_reward(dirs["rm_b"], prompt, completion),
        "exact": last_number_matches(completion, reference),
        "letters": float(sum(c.isalpha() for c in completion)),
        "moody": 0.0,
    }


def check(reward: float, rewards: dict[str, float], expected: dict[str, float]) -> None:
    assert list(rewards) == ["a", "rm_b", "exact", "letters", "moody"]  # models first, as given
    for name, value in expected.items():
        assert rewards[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    renamed = {"b" if n == "rm_b" else n: v for n, v in rewards.items()}
    assert reward == pytest.approx(uwo(renamed), rel=1e-6, abs=1e-6)


def test_each_member_matches_an_independent_computation_and_the_reward_is_their_uwo(members):
    server, dirs = members
    body = {"model": "gpt2_policy", "prompt": "2 + 3 =", "max_tokens": 6, "best_of": 4, "seed": 3,
            "return_candidates": True, "reference": "5"}  # fmt: skip
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    payload = response.json()
    for candidate in payload["candidates"]:
        expected = expected_members(dirs, "2 + 3 =", candidate["text"], "5")
        check(candidate["reward"], candidate["rewards"], expected)
    [choice] = payload["choices"]
    best = max(payload["candidates"], key=lambda c: c["reward"])
    assert choice["rewards"] == best["rewards"] and choice["reward"] == best["reward"]

    time.sleep(1.2)  # committed with the next flush
    logged = sqlite3.connect(server.sample_log).execute(
        "SELECT rewards, reward FROM completions WHERE request_id = ? ORDER BY candidate_index",
        (payload["id"],),
    )
    assert [(json.loads(r), v) for r, v in logged] == [
        (c["rewards"], c["reward"]) for c in payload["candidates"]
    ]


@same_on_every_engine
def test_score_returns_every_member_and_the_combination(members):
    server, dirs = members
    responses = [" 5", " it is 5", " 6"]
    body = {"prompt": "2 + 3 =", "responses": responses, "reference": "5"}
    data = post(server, "/v1/score", body).json()["data"]
    for item, response in zip(data, responses, strict=True):
        check(item["reward"], item["rewards"], expected_members(dirs, "2 + 3 =", response, "5"))
    assert [item["rewards"]["exact"] for item in data] == [1.0, 1.0, 0.0]
    assert server.metric("bon_member_reward_count", member="letters") > 0


@same_on_every_engine
@pytest.mark.parametrize(
    ("reference", "says"),
    [("raise", "ZeroDivisionError"), ("sleep", "did not return within 1"), ("nan", "not a finite number")],
)
def test_a_rule_that_fails_fails_its_request_naming_it_and_the_server_goes_on(members, reference, says):
    server, _ = members
    body = {"model": "gpt2_policy", "prompt": "x", "max_tokens": 2, "best_of": 2, "reference": reference}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert (
        error["code"] == "reward_function_failed"
        and "'moody'" in error["message"]
        and says in error["message"]
    )
    ok = post(server, "/v1/completions", {**body, "reference": "5"})
    assert ok.status_code == 200, ok.text


@same_on_every_engine
def test_one_member_reloads_alone(members, models):
    server, dirs = members
    before = post(server, "/admin/reload", {"reward_models": {"rm_b": str(dirs["rm_b"])}}, ADMIN)
    assert before.status_code == 200, before.text
    copy = dirs["rm_b"].parent / "rm_b_v2"
    shutil.copytree(dirs["rm_b"], copy, dirs_exist_ok=True)
    (copy / "note.txt").write_text("a new version")  # another version of the same weights
    after = post(server, "/admin/reload", {"reward_models": {"rm_b": str(copy)}}, ADMIN).json()
    assert after["reward_models"]["rm_b"]["path"] == str(copy.resolve())
    assert after["reward_models"]["a"] == before.json()["reward_models"]["a"]
    card = httpx.get(f"{server.url}/v1/models", headers=USER).json()["data"][0]
    assert card["reward_models"] == after["reward_models"]
    # The one-model form names the field when there are several; an unknown member is named too.
    one = post(server, "/admin/reload", {"reward_model": str(copy)}, ADMIN)
    assert one.status_code == 400 and one.json()["error"]["param"] == "reward_model"
    unknown = post(server, "/admin/reload", {"reward_models": {"zz": str(copy)}}, ADMIN)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "reward_models"


# --- selection rules, checked from the returned candidates ----------------------------------------


def sampled(server, selection: dict, seed: int = 11, best_of: int = 8) -> dict:
    body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 5, "best_of": best_of, "seed": seed,
            "temperature": 1.5, "return_candidates": True, "selection": selection}  # fmt: skip
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


@same_on_every_engine
@pytest.mark.parametrize("weighting", ["reward", "count"])
def test_vote_returns_the_best_of_the_heaviest_answer_group(members, weighting):
    server, _ = members
    pattern = r"(\w)\W*$"  # a candidate's answer: its last word character
    payload = sampled(server, {"rule": "vote", "answer_pattern": pattern, "weighting": weighting})
    candidates = payload["candidates"]
    groups: dict[str, list[dict]] = {}
    for c in candidates:
        if match := re.search(pattern, c["text"]):
            groups.setdefault(match.group(1), []).append(c)
    weight = {a: (len(g) if weighting == "count" else sum(c["reward"] for c in g)) for a, g in groups.items()}
    heaviest = max(weight.values())
    # Ties: the group whose best candidate ranks higher.
    best = max(
        (c for a, g in groups.items() if weight[a] == heaviest for c in g),
        key=lambda c: (c["reward"], -c["index"]),
    )
    assert payload["choices"][0]["text"] == best["text"]
    [selection] = payload["selection"]
    assert selection["rule"] == "vote" and selection["chosen"][0] == best["index"]
    shown = {g["answer"]: (g["size"], g["weight"]) for g in selection["groups"]}
    assert shown == {a: (len(g), pytest.approx(weight[a])) for a, g in groups.items()}


@same_on_every_engine
def test_length_penalty_picks_the_best_reward_less_alpha_per_token(members):
    server, _ = members
    payload = sampled(server, {"rule": "max", "length_penalty": 0.5})
    score = {c["index"]: c["reward"] - 0.5 * c["completion_tokens"] for c in payload["candidates"]}
    best = max(score, key=lambda i: (score[i], -i))
    assert payload["selection"][0]["chosen"] == [best]


@same_on_every_engine
def test_soft_repeats_with_its_seed_and_approaches_max_as_it_cools(members):
    server, _ = members
    first = sampled(server, {"rule": "soft", "temperature": 2.0}, seed=5)
    again = sampled(server, {"rule": "soft", "temperature": 2.0}, seed=5)
    assert first["selection"] == again["selection"] and first["choices"] == again["choices"]
    cold = sampled(server, {"rule": "soft", "temperature": 1e-6}, seed=5)
    top = max(cold["candidates"], key=lambda c: (c["reward"], -c["index"]))
    assert cold["selection"][0]["chosen"] == [top["index"]]
    # Hot, it picks across candidates: over seeds, more than one index is returned.
    hot = {
        sampled(server, {"rule": "soft", "temperature": 1e6}, seed=s)["selection"][0]["chosen"][0]
        for s in range(6)
    }
    assert len(hot) > 1


@same_on_every_engine
@pytest.mark.parametrize(
    ("selection", "field"),
    [
        ({"rule": "best"}, "selection.rule"),
        ({"rule": "vote", "answer_pattern": "(a)(b)"}, "selection.answer_pattern"),
        ({"rule": "soft", "temperature": 0}, "selection.temperature"),
        ({"rule": "max", "tie": 1}, "selection.tie"),
    ],
)
def test_a_bad_selection_is_a_400_naming_its_field(members, selection, field):
    server, _ = members
    body = {"model": "gpt2_policy", "prompt": "x", "max_tokens": 2, "selection": selection}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


# --- the reward API trainers call -------------------------------------------------------------------

OPENRLHF = """
import asyncio, json, sys
from openrlhf.utils.agent import SingleTurnAgentExecutor

url, queries, prompts, labels = sys.argv[1], *map(json.loads, sys.argv[2:])
executor = SingleTurnAgentExecutor(url)
print(json.dumps(asyncio.run(executor._fetch_rewards_via_http(queries, prompts, labels))))
"""


@pytest.fixture(scope="module")
def openrlhf(tmp_path_factory):
    """OpenRLHF 0.11.2's own client module, installed without its heavy dependencies (torch and
    transformers come from this venv; aiohttp, sympy and pylatexenc are what it imports)."""
    target = tmp_path_factory.mktemp("openrlhf")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(target)]
    try:
        subprocess.run([*pip, "--no-deps", "openrlhf==0.11.2"], check=True, timeout=300)
        subprocess.run([*pip, "aiohttp", "sympy", "pylatexenc"], check=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"openrlhf could not be installed here ({error}); the exact-payload test still runs")
    return target


def openrlhf_query(policy_dir, prompt: str, completion: str) -> str:
    """What OpenRLHF's SingleTurnExecutor posts as `query`: prompt ids (no special tokens) and the
    response ids (eos included), decoded as one string with special tokens kept."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids += tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=False)


@same_on_every_engine
def test_get_reward_answers_openrlhfs_own_client(members, models, openrlhf):
    server, _ = members
    prompt, completions = "2 + 3 =", [" 5", " six"]
    queries = [openrlhf_query(models["gpt2_policy"], prompt, c) for c in completions]
    script = [sys.executable, "-c", OPENRLHF, f"{server.url}/get_reward", json.dumps(queries),
              json.dumps([prompt] * 2), json.dumps(["5", "5"])]  # fmt: skip
    ran = subprocess.run(
        script, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(openrlhf)}
    )
    assert ran.returncode == 0, ran.stderr
    [answer] = json.loads(ran.stdout.strip().splitlines()[-1])  # one server: one shard
    scored = post(server, "/v1/score", {"prompt": prompt, "responses": completions, "reference": "5"}).json()
    assert answer["rewards"] == pytest.approx([d["reward"] for d in scored["data"]], rel=1e-6)
    assert answer["scores"] == answer["rewards"]
    assert answer["extra_logs"]["exact"] == [1.0, 0.0]
    assert answer["extra_logs"]["a"] == pytest.approx([d["rewards"]["a"] for d in scored["data"]], rel=1e-6)


@same_on_every_engine
def test_get_reward_reads_the_exact_payload_and_names_bad_fields(members, models):
    server, dirs = members
    query = openrlhf_query(models["gpt2_policy"], "2 + 3 =", " 5")
    plain = post(server, "/get_reward", {"query": [query]}, headers={})  # open: no key needed
    assert plain.status_code == 200, plain.text
    # Without prompts the whole query (less its eos) is the response to an empty prompt.
    [value] = plain.json()["extra_logs"]["a"]
    assert value == pytest.approx(completion_reward(dirs["a"], "", "2 + 3 = 5"), rel=1e-4)
    for body, field in [
        ({"query": [query], "prompts": ["a", "b"]}, "prompts"),
        ({"query": [query], "prompts": ["not its prompt"]}, "prompts"),
        ({"query": []}, "query"),
        ({"query": [query], "labels": [1]}, "labels.0"),
    ]:
        response = post(server, "/get_reward", body, headers={})
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    assert post(server, "/v1/score", {"prompt": "x", "responses": ["y"]}, headers={}).status_code == 401


@same_on_every_engine
def test_classify_answers_verls_payload_with_the_raw_logit(members):
    """verl/experimental/reward_loop/reward_loop.py (compute_score_disrm, verl 0.9.1) posts the RM's
    chat-templated text, bos stripped, with use_activation false, and reads data[-1].probs[-1]."""
    server, dirs = members
    tokenizer = AutoTokenizer.from_pretrained(dirs["a"])
    chat = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    if tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]
    expected = reward_of_ids(dirs["a"], tokenizer(text).input_ids)  # vLLM adds the special tokens back

    raw = post(server, "/classify", {"model": str(dirs["a"]), "input": text, "use_activation": False}, {})
    assert raw.status_code == 200, raw.text
    assert raw.json()["data"][-1]["probs"][-1] == pytest.approx(expected, rel=1e-4)
    default = post(server, "/classify", {"model": "a", "input": text}, {}).json()["data"][-1]["probs"][-1]
    assert default == pytest.approx(1 / (1 + math.exp(-expected)), rel=1e-4)  # vLLM's default: sigmoid
    old = post(server, "/classify", {"model": "a", "input": [text], "activation": False}, {}).json()
    assert old["data"][0]["probs"][0] == pytest.approx(expected, rel=1e-4)
    pooled = post(server, "/pooling", {"model": "a", "messages": chat, "use_activation": False}, {}).json()
    assert pooled["data"][0]["data"][0] == pytest.approx(
        reward_of_ids(
            dirs["a"],
            tokenizer(
                tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False
            ).input_ids,
        ),
        rel=1e-4,
    )
    # The served name: both reward models read the text, standardised and combined by uwo (rules
    # need a prompt and a completion, which this body does not separate).
    both = post(server, "/classify", {"model": "gpt2_policy", "input": text, "use_activation": False}, {})
    item = both.json()["data"][0]
    assert list(item["rewards"]) == ["a", "rm_b"]
    renamed = {"b" if n == "rm_b" else n: v for n, v in item["rewards"].items()}
    assert item["probs"][0] == pytest.approx(uwo(renamed), rel=1e-6)
    bad = [
        ({"model": "a"}, None),
        ({"model": "nope", "input": "x"}, "model"),
        ({"model": "a", "input": "x", "use_activation": True, "activation": False}, None),
    ]
    for body, field in bad:
        response = post(server, "/classify", body, {})
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == field, (
            response.text
        )


@same_on_every_engine
def test_a_keyed_server_keys_the_reward_routes_unless_opened(server):
    response = httpx.post(f"{server.url}/classify", json={"input": "x"}, timeout=30)
    assert response.status_code == 401
