"""/metrics: Prometheus naming rules, checked by promtool, and values that follow the traffic."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest
from conftest import API_KEYS


def bon_metrics(server) -> str:
    # Only our own families: the process/GC collectors are prometheus-client's business.
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {server.key}"}).text
    blocks = re.split(r"(?m)^(?=# HELP )", text)
    return "".join(b for b in blocks if b.startswith("# HELP bon_"))


def test_promtool_finds_nothing(server):
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    httpx.post(
        f"{server.url}/v1/completions",
        headers={"Authorization": f"Bearer {API_KEYS[0]}"},
        json={"model": "gpt2_policy", "prompt": "x", "max_tokens": 2, "best_of": 2},
    ).raise_for_status()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=bon_metrics(server), capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_names_are_prefixed_in_base_units_and_never_say_vllm(server):
    text = bon_metrics(server)
    types = dict(re.findall(r"(?m)^# TYPE (\S+) (\S+)$", text))
    assert len(types) >= 15
    for name, kind in types.items():
        assert name.startswith("bon_") and "vllm" not in name
        if name.endswith("_timestamp_seconds"):  # a moment: a gauge, as Prometheus names them
            assert kind == "gauge"
        elif name.endswith(("_seconds", "_duration")):  # a duration: a histogram
            assert kind == "histogram"
    assert "bon_requests_total" in text and "bon_generation_tokens_total" in text


def test_values_follow_the_traffic(server, pair_gpt2_llama):
    before_requests = server.metric("bon_requests_total", route="/v1/completions", status="200")
    before_rewards = server.metric("bon_candidate_reward_count")
    before_returned = server.metric("bon_returned_reward_count")
    body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 3, "best_of": 5, "n": 2}
    response = httpx.post(
        f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEYS[0]}"}, json=body
    )
    response.raise_for_status()
    assert server.metric("bon_requests_total", route="/v1/completions", status="200") == before_requests + 1
    assert server.metric("bon_candidate_reward_count") == before_rewards + 5
    assert server.metric("bon_returned_reward_count") == before_returned + 2
    httpx.post(f"{server.url}/v1/completions", json=body)  # no key
    assert server.metric("bon_requests_total", route="/v1/completions", status="401") >= 1
    assert server.metric("bon_model_info", role="policy", path=str(pair_gpt2_llama.policy)) == 1
    assert server.metric("bon_model_info", role="reward_model", path=str(pair_gpt2_llama.reward_model)) == 1
