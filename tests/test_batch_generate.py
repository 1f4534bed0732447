"""`bon generate`: offline best-of-N into the server's candidate log, read back by export-samples
and RAFT; killed and resumed, every prompt is logged exactly once with the same candidates."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from reference import chat_reward, completion_reward

from server.log.sources import read_records

BON = [sys.executable, "-m", "bon"]


def bon(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*BON, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def prompts_file(path, count: int, chat_every: int = 0):
    rows = [
        {"prompt": [{"role": "user", "content": f"say {i}"}]}
        if chat_every and i % chat_every == 0
        else {"prompt": f"count {i}:"}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generate_command(pair, prompts, log, *extra) -> list[str]:
    flags = ["--policy", pair.policy, "--reward-model", pair.reward_model, "--prompts", prompts,
             "--best-of", 4, "--max-tokens", 5, "--sample-log", log, *extra]  # fmt: skip
    return [*BON, "generate", *map(str, flags)]


def generate(pair, prompts, log, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        generate_command(pair, prompts, log, *extra), capture_output=True, text=True, timeout=600
    )


def by_request(log) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in read_records(log):
        grouped.setdefault(record["request_id"], []).append(record)
    return grouped


def test_generate_logs_what_the_server_would_and_raft_trains_on_it(pair_gpt2_llama, tmp_path):
    prompts = prompts_file(tmp_path / "prompts.jsonl", 12, chat_every=4)
    log = tmp_path / "samples.db"
    result = generate(pair_gpt2_llama, prompts, log)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["prompts_generated"] == 12 and summary["candidates"] == 48
    grouped = by_request(log)
    assert len(grouped) == 12 and all(len(c) == 4 for c in grouped.values())
    for records in grouped.values():
        assert sorted(r["rank"] for r in records) == [0, 1, 2, 3]
        record = records[0]
        if isinstance(record["prompt"], str):
            expected = completion_reward(pair_gpt2_llama.reward_model, record["prompt"], record["completion"])
        else:
            expected = chat_reward(
                pair_gpt2_llama.reward_model, pair_gpt2_llama.policy, record["prompt"], record["completion"]
            )
        assert record["reward"] == pytest.approx(expected, rel=1e-4, abs=1e-5)

    exported = bon("export-samples", "--sample-log", log, "-o", tmp_path / "samples.jsonl")
    assert exported.returncode == 0 and len((tmp_path / "samples.jsonl").read_text().splitlines()) == 48
    training = ["--epochs", 1, "--batch-size", 4, "--max-length", 32, "--torch-threads", 1]
    raft = bon("train", "raft", "--policy", pair_gpt2_llama.policy, "--sample-log", log,
               "--output", tmp_path / "raft", *training)  # fmt: skip
    assert raft.returncode == 0, raft.stderr[-3000:]
    assert json.loads((tmp_path / "raft" / "raft_manifest.json").read_text())["samples_kept"] == 12


def test_kill_9_then_resume_logs_every_prompt_once_with_the_same_candidates(pair_gpt2_llama, tmp_path):
    prompts = prompts_file(tmp_path / "prompts.jsonl", 120)
    whole = tmp_path / "whole.db"
    assert generate(pair_gpt2_llama, prompts, whole, "--window", 4).returncode == 0

    log = tmp_path / "killed.db"
    process = subprocess.Popen(
        generate_command(pair_gpt2_llama, prompts, log, "--window", 4),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    committed = 0
    while time.monotonic() < deadline and committed < 12:
        time.sleep(0.02)
        if log.exists():
            try:
                committed = sqlite3.connect(log).execute("SELECT COUNT(*) FROM requests").fetchone()[0]
            except sqlite3.Error:
                pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 12 <= len(by_request(log)) < 120, "the job was not killed half-way"

    again = generate(pair_gpt2_llama, prompts, log, "--window", 4)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = generate(pair_gpt2_llama, prompts, log, "--window", 4, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, expected = by_request(log), by_request(whole)
    assert set(got) == set(expected) and len(got) == 120
    for request_id, records in expected.items():
        assert [r["completion"] for r in got[request_id]] == [r["completion"] for r in records]


def test_a_prompt_the_policy_cannot_take_is_named_or_skipped(pair_qwen2_gpt2, models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine:"}\n{"prompt": 7}\n{"prompt": "also fine:"}\n')
    log = tmp_path / "samples.db"
    stopped = generate(pair_qwen2_gpt2, prompts, log)
    assert stopped.returncode == 2 and f"{prompts}:2" in stopped.stderr and "Traceback" not in stopped.stderr
    skipped = generate(pair_qwen2_gpt2, prompts, log, "--skip-bad-rows", "--resume")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert json.loads(skipped.stdout)["skipped_bad_rows"] == 1
    assert len(by_request(log)) == 2


def test_readme_raft_example_trains_the_weights_it_publishes(tmp_path):
    """README's offline RAFT example as written: six prompts, every default. It used to publish the
    parent's weights bit for bit (its one update ran at a warm-up learning rate of 0)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from trainers.engine import learning_rate_factor

    models = Path(__file__).resolve().parent.parent / "default-models"
    prompts = ["largest digit in 5937:", "last letter of kgho:", "largest digit in 40213:",
               "last letter of mnbpaj:", "largest digit in 867:", "last letter of pod:"]  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    log = tmp_path / "generated.db"
    generated = bon("generate", "--policy", models / "policy", "--reward-model", models / "reward_model",
                    "--prompts", tmp_path / "prompts.jsonl", "--best-of", 8, "--max-tokens", 4,
                    "--temperature", 1.5, "--sample-log", log)  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-3000:]
    output = tmp_path / "raft-offline"
    raft = bon("train", "raft", "--policy", models / "policy", "--sample-log", log, "--output", output)
    assert raft.returncode == 0, raft.stderr[-3000:]
    parent, trained = (
        load_file(models / "policy" / "model.safetensors"),
        load_file(output / "model.safetensors"),
    )
    assert any(not (parent[name] == trained[name]).all() for name in parent), "RAFT published its parent"
    history = json.loads((output / "training_history.json").read_text())
    total = len(history)
    assert [row["lr"] for row in history] == pytest.approx(
        [1e-5 * learning_rate_factor(u, total, 0.03) for u in range(total)]
    )
    assert all(row["lr"] > 0 for row in history)
