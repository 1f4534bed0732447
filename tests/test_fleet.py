"""A fleet on this machine: two replicas writing one PostgreSQL log under round-robin load, a
gated `bon retrain` that reads both replicas' candidates and publishes, both replicas moving to the
new checkpoint through --watch, and a round whose gate cannot be met publishing nothing."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import Pair, start_server, stop_server

from bon.local_postgres import PASSWORD
from server.log.sources import read_records
from trainers.demo.pipeline import main as demo
from trainers.demo.tasks import suite

FIRST = 48  # requests in the first window: what the first round trains on
DEFAULT_MODELS = Path(__file__).resolve().parent.parent / "default-models"


def round_robin(servers, prompts: list[str], seed: int, concurrency: int = 4) -> list[dict]:
    """Each prompt to the next replica in turn, `concurrency` at a time; every answer must be 200."""

    async def run() -> list[dict]:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(index: int, prompt: str) -> dict:
                body = {"model": "demo", "prompt": prompt, "max_tokens": 4, "best_of": 8, "temperature": 1.0,
                        "seed": seed + index}  # fmt: skip
                async with gate:
                    response = await client.post(f"{servers[index % 2].url}/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return asyncio.run(run())


def served_versions(servers) -> list[str]:
    return [httpx.get(f"{s.url}/v1/models").json()["data"][0]["policy_version"] for s in servers]


def retrain(
    published: Path, url: str, eval_prompts: Path, servers, *extra: str
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "bon", "retrain", "--published", str(published), "--sample-log", url,
        "--reward-model", str(DEFAULT_MODELS / "reward_model"), "--eval-prompts", str(eval_prompts),
        "--servers", ",".join(s.url for s in servers), "--notify", "watch", "--wait-seconds", "120",
        "--min-samples", "64", "-k", "16", "--max-tokens", "4", "--epochs", "4", "--learning-rate", "5e-3",
        "--batch-size", "8", "--torch-threads", "1", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def demo_sft_policy(directory: Path) -> Path:
    """The SFT policy of `bon demo` at a toy size (seconds): weak enough for RAFT to improve on,
    which the committed default policy (already three RAFT rounds in) hardly is."""
    demo(["--output", str(directory), "--rounds", "0", "--rm-prompts", "8", "--prompts-per-task", "300",
          "--sft-epochs", "4", "--sft-learning-rate", "1e-2", "--max-new-tokens", "3", "--rm-epochs", "1",
          "--n", "4", "--hidden", "32", "--layers", "1"])  # fmt: skip
    return directory / "sft"


def test_two_replicas_one_log_a_gated_retrain_and_a_refused_one(postgres, tmp_path):
    url = postgres.database()
    published = tmp_path / "published"
    shutil.copytree(demo_sft_policy(tmp_path / "demo"), published / "sft")
    train, held_out = suite(seed=5, prompts_per_task=200, held_out_per_task=24)
    eval_prompts = tmp_path / "eval.jsonl"
    eval_prompts.write_text("".join(json.dumps({"prompt": item.prompt}) + "\n" for item in held_out))
    pair = Pair(published / "sft", DEFAULT_MODELS / "reward_model")

    def replica(name: str):
        (tmp_path / name).mkdir()
        return start_server(
            pair, tmp_path / name, "--replica-id", name, "--watch", str(published),
            "--watch-interval-seconds", "0.5", "--torch-threads", "1", "--served-model-name", "demo",
            sample_log=url,
        )  # fmt: skip

    servers = [replica("replica-a"), replica("replica-b")]
    try:
        first = round_robin(servers, [item.prompt for item in train[:FIRST]], seed=0)
        time.sleep(1.2)  # past the flush interval: everything acknowledged is committed
        records = read_records(url)
        assert {r["replica"] for r in records} == {"replica-a", "replica-b"}
        assert len(records) == FIRST * 8 and len({r["request_id"] for r in records}) == FIRST
        assert {r["request_id"] for r in records} == {answer["id"] for answer in first}
        before = served_versions(servers)

        done = retrain(published, url, eval_prompts, servers, "--max-kl", "5")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        result = summary["result"]
        assert result["published"] and summary["data"]["samples"] == FIRST * 8
        assert set(result["replicas"].values()) == {"serves it"}
        version = result["version"]
        assert served_versions(servers) == [version, version] != before
        assert PASSWORD not in done.stdout + done.stderr
        manifest = json.loads((published / version / "raft_manifest.json").read_text())
        assert manifest["retrain"]["evaluation"]["win_rate_vs_current"]["mean"] >= 0.5
        assert all(gate["passed"] for gate in manifest["retrain"]["gates"])

        # The next window: served by the new checkpoint, on both replicas.
        round_robin(servers, [item.prompt for item in train[FIRST : FIRST + 48]], seed=1000)
        time.sleep(1.2)
        newer = [r for r in read_records(url) if r["created"] > manifest["window"]["until"]]
        assert len(newer) == 48 * 8 and {r["policy_version"] for r in newer} == {version}

        refused = retrain(published, url, eval_prompts, servers, "--min-win-rate", "0.99")
        assert refused.returncode == 3, refused.stderr
        assert "gate min_win_rate failed" in refused.stderr
        assert sorted(p.name for p in published.iterdir() if not p.name.startswith(".")) == sorted(
            ["sft", version]
        )
        assert len(list((published / ".rounds").iterdir())) == 2  # each round's evaluation is kept
        assert served_versions(servers) == [version, version]
    finally:
        for server in servers:
            stop_server(server)
