"""Shared fixtures: tiny real models built locally, and real `bon serve` processes on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from transformers import AutoConfig

from bon.local_postgres import PostgresCluster, PostgresMissing
from bon.tiny_models import build_model, tokenizer_a, tokenizer_b

# The engines every server of this run uses: `make test-vllm` sets BON_ENGINE=vllm and
# BON_REWARD_ENGINE=vllm, which `bon serve` reads like any flag, so the same tests run on both.
ENGINE = os.environ.get("BON_ENGINE", "transformers")
# What no engine touches runs once, in `make test`; `make test-vllm` skips it.
same_on_every_engine = pytest.mark.skipif(ENGINE != "transformers", reason="engine-independent: make test")


@dataclass
class Pair:
    policy: Path
    reward_model: Path


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints of three architectures and two tokenizers, plus broken reward models."""
    root = tmp_path_factory.mktemp("models")
    tok_a, tok_b = tokenizer_a(), tokenizer_b()
    built = {
        "gpt2_policy": build_model(root / "gpt2_policy", "gpt2", tok_a, seed=0),
        "qwen2_policy": build_model(root / "qwen2_policy", "qwen2", tok_b, seed=1),
        "llama_policy": build_model(root / "llama_policy", "llama", tok_b, seed=2),
        "llama_rm": build_model(root / "llama_rm", "llama", tok_b, reward_model=True, seed=3),
        # No chat template: chat requests fall back to the completions rule.
        "gpt2_rm_plain": build_model(
            root / "gpt2_rm_plain", "gpt2", tokenizer_a(), reward_model=True, seed=4
        ),
    }
    tok_a_plain = built["gpt2_rm_plain"]
    (tok_a_plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tok_a_plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tok_a_plain / "tokenizer_config.json").write_text(json.dumps(config))

    # Two labels: a classifier, not a Bradley-Terry reward model.
    two = build_model(root / "two_labels", "llama", tok_b, reward_model=True, seed=6)
    config = AutoConfig.from_pretrained(two)
    config.num_labels = 2
    config.save_pretrained(two)
    built["two_labels_rm"] = two
    # A causal LM whose config claims one label: no trained score head in its weights.
    headless = build_model(root / "headless", "gpt2", tok_a, seed=7)
    config = AutoConfig.from_pretrained(headless)
    config.num_labels = 1
    config.save_pretrained(headless)
    built["headless_rm"] = headless
    return built


@pytest.fixture(scope="session")
def pair_gpt2_llama(models) -> Pair:
    """GPT-2 policy, Llama RM: different architectures, vocabularies and chat templates."""
    return Pair(models["gpt2_policy"], models["llama_rm"])


@pytest.fixture(scope="session")
def pair_qwen2_gpt2(models) -> Pair:
    """Qwen2 policy, GPT-2 RM without a chat template (chat falls back to the completions rule)."""
    return Pair(models["qwen2_policy"], models["gpt2_rm_plain"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    sample_log: str | Path  # a SQLite file or a PostgreSQL URL
    log_file: Path
    key: str | None = None  # an API key it accepts (/metrics needs one when it has keys)

    def output(self) -> str:
        return self.log_file.read_text()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        response = httpx.get(f"{self.url}/metrics", headers=headers)
        response.raise_for_status()
        text = response.text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, value = line.rsplit(" ", 1)
            metric_name = series.split("{", 1)[0]
            if metric_name == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total


def serve_command(pair: Pair, *extra: str) -> list[str]:
    """`bon serve` for a model pair, as a user types it."""
    return [sys.executable, "-m", "bon", "serve", "--policy", str(pair.policy),
            "--reward-model", str(pair.reward_model), *extra]  # fmt: skip


def start_server(
    pair: Pair,
    workdir: Path,
    *extra: str,
    env: dict | None = None,
    wait: bool = True,
    sample_log: str | Path | None = None,
) -> Server:
    """`bon serve` on a free port, logging to `sample_log` (a PostgreSQL URL, or by default a
    SQLite file in `workdir`)."""
    port = free_port()
    sample_log = sample_log or default_sample_log(workdir)
    log_file = workdir / "server.log"
    command = serve_command(pair, "--port", str(port), "--sample-log", str(sample_log), *extra)
    process = subprocess.Popen(
        command, stdout=log_file.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    keys = [extra[i + 1] for i, flag in enumerate(extra) if flag == "--api-key"]
    keys += [k for k in (env or {}).get("BON_API_KEY", "").split(",") if k]
    server = Server(f"http://127.0.0.1:{port}", process, sample_log, log_file, keys[0] if keys else None)
    if wait:
        wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.output()}")


def stop_server(server: Server, sig: int = signal.SIGTERM) -> int:
    if server.process.poll() is None:
        server.process.send_signal(sig)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


API_KEYS = ("key-one", "key-two")


_CLUSTER: list[PostgresCluster] = []  # started on first use, stopped when the session ends


def postgres_cluster() -> PostgresCluster:
    """The session's PostgreSQL; absent the binaries its tests skip, unless BON_REQUIRE_TOOLS=1
    (CI) makes that a failure."""
    if not _CLUSTER:
        try:
            _CLUSTER.append(PostgresCluster())
        except PostgresMissing as missing:
            if os.environ.get("BON_REQUIRE_TOOLS") == "1":
                pytest.fail(str(missing))
            pytest.skip(str(missing))
    return _CLUSTER[0]


@pytest.fixture(scope="session", autouse=True)
def _stop_postgres():
    yield
    if _CLUSTER:
        _CLUSTER.pop().close()


@pytest.fixture(scope="session")
def postgres() -> PostgresCluster:
    """A PostgreSQL server of the tests' own (bon/local_postgres.py)."""
    return postgres_cluster()


def default_sample_log(workdir: Path) -> str | Path:
    """Where a test's server logs: a SQLite file, or with BON_TEST_SAMPLE_LOG=postgresql a fresh
    database of the tests' PostgreSQL (`make test-postgres` runs the server suites so)."""
    if os.environ.get("BON_TEST_SAMPLE_LOG") == "postgresql":
        return postgres_cluster().database()
    return workdir / "samples.db"


@pytest.fixture(scope="session")
def server(pair_gpt2_llama, tmp_path_factory):
    """The main server: GPT-2 policy + Llama RM, two API keys, best_of up to 8."""
    workdir = tmp_path_factory.mktemp("server")
    args = ["--api-key", API_KEYS[0], "--api-key", API_KEYS[1], "--max-best-of", "8"]
    s = start_server(pair_gpt2_llama, workdir, *args)
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def server_b(pair_qwen2_gpt2, tmp_path_factory):
    """Second pair: Qwen2 policy + GPT-2 RM without a chat template, keys from the environment,
    /metrics open to a scraper."""
    workdir = tmp_path_factory.mktemp("server_b")
    s = start_server(pair_qwen2_gpt2, workdir, "--public-metrics", env={"BON_API_KEY": "env-key"})
    yield s
    stop_server(s)
