"""What only the vLLM engine has to show: mixed engine pairs, reload onto fresh weights, a dead
engine, prefix caching and aborts, all on the real vllm package (its CPU build; `make test-vllm`).

Every other server-level test also runs against vLLM there (BON_ENGINE=vllm), unchanged.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time

import httpx
import psutil
import pytest
from conftest import Pair, serve_command, start_server, stop_server
from reference import chat_reward, completion_reward

from bon.tiny_models import build_model, tokenizer_b

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

ADMIN = {"Authorization": "Bearer admin"}
MESSAGES = [{"role": "user", "content": "what is 2 + 3?"}]


def complete(server, **body) -> dict:
    body = {"model": "llama_policy", "prompt": "the cat runs", "max_tokens": 8, **body}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def texts(body: dict) -> list[str]:
    return [c["text"] for c in body["candidates"]]


def vllm_metric(server, name: str, **labels) -> float:
    return server.metric(name, **labels)


@pytest.mark.parametrize(("engine", "reward_engine"), [("vllm", "transformers"), ("transformers", "vllm")])
def test_mixed_engine_pairs_score_like_an_independent_forward(models, tmp_path, engine, reward_engine):
    pair = Pair(models["llama_policy"], models["gpt2_rm_plain"])  # different tokenizers and architectures
    # Parallel sizes and any other engine argument reach vLLM (size 1: all a CPU runs).
    parallel = ["--vllm-tensor-parallel-size", "1", "--vllm-data-parallel-size", "1",
                "--vllm-reward-tensor-parallel-size", "1", "--vllm-reward-data-parallel-size", "1",
                "--vllm-engine-args", '{"seed": 4242}',
                "--vllm-reward-engine-args", '{"seed": 4343}']  # fmt: skip
    server = start_server(pair, tmp_path, "--engine", engine, "--reward-engine", reward_engine, *parallel)
    try:
        first = complete(server, seed=11, best_of=4, return_candidates=True)
        again = complete(server, seed=11, best_of=4, return_candidates=True)
        chat = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "llama_policy",
                "messages": MESSAGES,
                "max_tokens": 6,
                "best_of": 3,
                "return_candidates": True,
            },  # fmt: skip
            timeout=120,
        ).json()
    finally:
        stop_server(server)
    # vLLM's own account of the engine it built ("Initializing a V1 LLM engine ... with config:").
    configs = [line for line in server.output().splitlines() if "with config:" in line]
    [config] = configs
    assert "tensor_parallel_size=1" in config and "data_parallel_size=1" in config
    assert ("seed=4242" if engine == "vllm" else "seed=4343") in config
    assert texts(first) == texts(again)
    for candidate in first["candidates"]:
        expected = completion_reward(pair.reward_model, "the cat runs", candidate["text"])
        assert candidate["reward"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    for candidate in chat["candidates"]:
        expected = chat_reward(pair.reward_model, pair.policy, MESSAGES, candidate["text"])
        assert candidate["reward"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def vllm_server(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm")
    server = start_server(
        Pair(models["llama_policy"], models["llama_rm"]),
        workdir,
        "--engine", "vllm", "--reward-engine", "vllm", "--admin-key", "admin",
    )  # fmt: skip
    yield server
    stop_server(server)


def test_reload_serves_the_new_weights_and_then_the_old_ones_again(vllm_server, models, tmp_path):
    # Same architecture and tokenizer, other weights: what a RAFT checkpoint is.
    other = build_model(tmp_path / "other_llama", "llama", tokenizer_b(), seed=12)
    original = tmp_path / "llama_again"  # the first weights from a new path, as a publisher would
    shutil.copytree(models["llama_policy"], original)
    before = texts(complete(vllm_server, seed=5, best_of=4, return_candidates=True))

    def reload(path) -> float:
        start = time.monotonic()
        response = httpx.post(
            f"{vllm_server.url}/admin/reload", json={"policy": str(path)}, headers=ADMIN, timeout=300
        )
        assert response.status_code == 200, response.text
        return time.monotonic() - start

    reload(other)
    changed = texts(complete(vllm_server, seed=5, best_of=4, return_candidates=True))
    reload(original)
    restored = texts(complete(vllm_server, seed=5, best_of=4, return_candidates=True))
    assert changed != before and restored == before
    # The engine of each replaced checkpoint is shut down once its requests are done.
    deadline = time.monotonic() + 60
    while len(engine_cores(vllm_server)) != 2:
        assert time.monotonic() < deadline, f"{len(engine_cores(vllm_server))} engines still running"
        time.sleep(0.5)


def test_prefix_caching_shares_a_long_prompt(vllm_server):
    prompt = " ".join(["the quick slow fish sees the dark river"] * 12)  # well over one KV block
    hits_before = vllm_metric(vllm_server, "vllm:prefix_cache_hits_total")
    complete(vllm_server, prompt=prompt, best_of=8, max_tokens=4)
    complete(vllm_server, prompt=prompt, best_of=8, max_tokens=4)
    assert vllm_metric(vllm_server, "vllm:prefix_cache_hits_total") > hits_before


def test_a_client_that_goes_away_aborts_its_vllm_request(vllm_server):
    body = {"model": "llama_policy", "prompt": "the cat", "max_tokens": 240, "best_of": 16, "seed": 3}

    def generated_by(send) -> tuple[float, float]:
        """Tokens vLLM generated while `send` ran and settled, and how long `send` took."""
        before = vllm_metric(vllm_server, "vllm:generation_tokens_total")
        start = time.monotonic()
        send()
        took = time.monotonic() - start
        deadline = time.monotonic() + 30
        while vllm_metric(vllm_server, "vllm:num_requests_running") > 0:
            assert time.monotonic() < deadline, "a request is still running"
            time.sleep(0.1)
        time.sleep(0.5)
        return vllm_metric(vllm_server, "vllm:generation_tokens_total") - before, took

    whole, took = generated_by(lambda: complete(vllm_server, **body))  # the seed replays this work

    async def give_up():
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(f"{vllm_server.url}/v1/completions", json=body, timeout=took / 4)

    dropped_before = vllm_metric(vllm_server, "bon_dropped_jobs_total", stage="sampling")
    cut, _ = generated_by(lambda: asyncio.run(give_up()))
    assert 0 < cut < whole * 0.75, (cut, whole, took)
    assert vllm_metric(vllm_server, "bon_dropped_jobs_total", stage="sampling") == dropped_before + 1


def engine_cores(server) -> list[psutil.Process]:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return [p for p in children if p.name().startswith("VLLM::EngineCore")]


def test_a_dead_engine_fails_ready_and_requests_with_503(models, tmp_path):
    server = start_server(
        Pair(models["llama_policy"], models["llama_rm"]),
        tmp_path,
        "--engine",
        "vllm",
        "--reward-engine",
        "transformers",
    )
    try:
        complete(server)
        [core] = engine_cores(server)  # the transformers scorer has no engine process
        core.kill()
        deadline = time.monotonic() + 60
        while (ready := httpx.get(f"{server.url}/ready")).status_code == 200:
            assert time.monotonic() < deadline, "/ready still 200 with a dead engine"
            time.sleep(0.2)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "engine_dead"
        response = httpx.post(
            f"{server.url}/v1/completions", json={"model": "llama_policy", "prompt": "x"}, timeout=60
        )
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
    finally:
        stop_server(server)
    assert "vLLM sampling engine died" in server.output()


def test_engines_do_not_outlive_a_killed_server(models, tmp_path):
    pair = Pair(models["llama_policy"], models["llama_rm"])
    server = start_server(pair, tmp_path, "--engine", "vllm", "--reward-engine", "vllm")
    engines = engine_cores(server)
    assert len(engines) == 2
    workers = [child for engine in engines for child in engine.children(recursive=True)]
    stop_server(server, signal.SIGKILL)  # no shutdown runs: what the OOM killer does
    gone, alive = psutil.wait_procs(engines + workers, timeout=60)
    assert alive == [], f"orphaned vLLM processes: {alive}"


def test_bon_score_and_bon_generate_run_on_vllm(models, tmp_path):
    """The batch jobs on the vLLM engines: `bon score` with two reward models (each its own pooling
    engine) gives each the transformers engine's rewards, and `bon generate` logs rewards equal to
    an independent forward."""
    import json
    import subprocess
    import sys

    from server.log.sources import read_records

    rm, policy = models["llama_rm"], models["llama_policy"]
    rows = [{"prompt": f"item {i}:", "responses": [" one", " two two" * i]} for i in range(20)]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = {}
    for engine in ("transformers", "vllm"):
        out = tmp_path / f"{engine}.jsonl"
        command = [sys.executable, "-m", "bon", "score", str(source), "-o", str(out), "--engine", engine,
                   "--reward-model", f"a={rm}", "--reward-model", f"b={models['gpt2_rm_plain']}"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout)["engine"] == engine
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        scored[engine] = [(row["rewards"], row["rewards_members"]) for row in lines]
    for (combined, members), (combined_v, members_v) in zip(
        scored["transformers"], scored["vllm"], strict=True
    ):
        assert combined == pytest.approx(combined_v, rel=1e-4, abs=1e-5)
        for one, other in zip(members, members_v, strict=True):
            assert one == pytest.approx(other, rel=1e-4, abs=1e-5)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"count {i}:"}) + "\n" for i in range(6)))
    log = tmp_path / "samples.db"
    command = [sys.executable, "-m", "bon", "generate", "--policy", str(policy), "--reward-model", str(rm),
               "--prompts", str(prompts), "--best-of", "3", "--max-tokens", "4", "--sample-log", str(log),
               "--engine", "vllm", "--reward-engine", "vllm"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(log)
    assert len(records) == 18
    for record in records[:6]:
        expected = completion_reward(rm, record["prompt"], record["completion"])
        assert record["reward"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_parallel_sizes_and_engine_arguments_are_handed_to_vllm(tmp_path):
    from server.engines.vllm import VLLMOptions, engine_args

    options = VLLMOptions("auto", 0.4, 1.0, True, 8, tensor_parallel_size=4, data_parallel_size=2,
                          engine_args={"max_num_seqs": 64, "enable_prefix_caching": False})  # fmt: skip
    args = engine_args(tmp_path, "float32", 128, False, options)
    assert (args.tensor_parallel_size, args.data_parallel_size, args.max_num_seqs) == (4, 2, 64)
    assert args.enable_prefix_caching is False  # the user's word wins over bon's default
    assert options.unknown_engine_args() == []
    assert VLLMOptions(
        "auto", 0.4, None, True, 8, engine_args={"max_num_sequences": 1}
    ).unknown_engine_args() == ["max_num_sequences"]


def test_an_unknown_vllm_engine_argument_stops_bon_serve_naming_it(models, tmp_path):
    pair = Pair(models["llama_policy"], models["llama_rm"])
    command = [*serve_command(pair, "--engine", "vllm", "--vllm-engine-args", '{"max_num_sequences": 1}')]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "--vllm-engine-args: max_num_sequences is not an argument" in done.stderr
