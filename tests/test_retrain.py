"""`bon retrain`'s other answers (tests/test_fleet.py has the publishing round and a failed gate):
too few new samples is a clean no-op, a held lock does nothing, a user's mistake is one line, and
`--notify reload` moves a replica through /admin/reload and names one that does not follow."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
from conftest import Pair, start_server, stop_server

from server.log.records import CompletionRecord, RequestRecord
from server.log.sample_log import SampleLog

PROMPTS = ["the cat", "a dog runs", "hello there", "one two three"]


def retrain(published, sample_log, models, tmp_path, *extra: str, env=None) -> subprocess.CompletedProcess:
    eval_prompts = tmp_path / "eval.jsonl"
    eval_prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    command = [
        sys.executable, "-m", "bon", "retrain", "--published", str(published),
        "--sample-log", str(sample_log), "--reward-model", str(models["llama_rm"]),
        "--eval-prompts", str(eval_prompts), "-k", "4", "--max-tokens", "4", "--min-samples", "8",
        "--learning-rate", "1e-3", "--batch-size", "4", *extra,
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


def log_requests(path, count: int) -> None:
    log = SampleLog(path, 0.05)
    for i in range(count):
        completions = [
            CompletionRecord(0, j, f" word{j}", float(j), 3 - j, "stop", 2, False) for j in range(4)
        ]
        log.append(
            RequestRecord(f"r{i}", {}, "p", "v", "rm", "v", time.time(), [(PROMPTS[i % 4], 2)], completions)
        )
    log.close()


def published_with(models, tmp_path):
    published = tmp_path / "published"
    shutil.copytree(models["llama_policy"], published / "sft")
    return published


def test_too_few_samples_a_held_lock_and_a_mistake(models, tmp_path):
    published = published_with(models, tmp_path)
    log_requests(tmp_path / "log.db", 1)  # 4 candidates, fewer than --min-samples 8
    quiet = retrain(published, tmp_path / "log.db", models, tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert json.loads(quiet.stdout)["result"] == {"published": False, "why": "too few new samples"}
    assert sorted(p.name for p in published.iterdir() if not p.name.startswith(".")) == ["sft"]

    with (published / ".retrain.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a round in progress
        locked = retrain(published, tmp_path / "log.db", models, tmp_path)
    assert locked.returncode == 5 and "another round" in locked.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    mistake = retrain(empty, tmp_path / "log.db", models, tmp_path)
    assert mistake.returncode == 2 and "nothing published under" in mistake.stderr
    assert "Traceback" not in mistake.stderr


def test_reload_moves_a_replica_and_one_that_does_not_follow_is_named(models, tmp_path):
    published = published_with(models, tmp_path)
    server = start_server(
        Pair(published / "sft", models["llama_rm"]), tmp_path, "--admin-key", "admin-secret"
    )
    try:
        log_requests(tmp_path / "log.db", 8)
        gone = "http://127.0.0.1:9"  # nothing listens there
        done = retrain(
            published, tmp_path / "log.db", models, tmp_path, "--min-win-rate", "0", "--servers",
            f"{server.url},{gone}", "--wait-seconds", "30", env={"BON_ADMIN_KEY": "admin-secret"},
        )  # fmt: skip
        assert done.returncode == 4, done.stderr
        result = json.loads(done.stdout)["result"]
        assert result["published"] and result["replicas"][server.url] == "serves it"
        assert result["replicas"][gone].startswith("reload failed")
        assert f"replica {gone}" in done.stderr
        served = httpx.get(f"{server.url}/v1/models").json()["data"][0]["policy_version"]
        assert served == result["version"]
    finally:
        stop_server(server)
