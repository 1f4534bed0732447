"""`bon serve` start-up checks and configuration, and `bon export-samples`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import API_KEYS, Pair, same_on_every_engine, serve_command

from server.log.sources import read_records


def serve_fails(pair: Pair, *extra: str) -> str:
    """Run `bon serve` expecting it to refuse to start; returns what it printed."""
    result = subprocess.run(
        serve_command(pair, "--port", "0", *extra), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    return result.stderr


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bon", "export-samples", *args], capture_output=True, text=True, timeout=120
    )


def test_refuses_a_reward_model_with_two_labels(models):
    message = serve_fails(Pair(models["gpt2_policy"], models["two_labels_rm"]))
    assert "num_labels=2" in message and "exactly one label" in message


def test_refuses_a_reward_model_without_a_score_head(models):
    message = serve_fails(Pair(models["gpt2_policy"], models["headless_rm"]))
    assert "no trained score head" in message and "score.weight" in message


def test_refuses_a_directory_that_is_not_a_model(models, tmp_path):
    message = serve_fails(Pair(tmp_path, models["llama_rm"]))
    assert "not a Hugging Face model directory" in message and "--policy" in message


def test_bad_flag_value_names_the_flag(models):
    message = serve_fails(Pair(models["gpt2_policy"], models["llama_rm"]), "--max-best-of", "zero")
    assert "--max-best-of" in message


@pytest.mark.parametrize(
    ("value", "says"),
    [("{not json", "not JSON"), ("[1, 2]", "a JSON object"), ('{"model": "x"}', "model is bon's to set")],
)
def test_a_bad_vllm_engine_args_value_names_the_flag(models, value, says):
    message = serve_fails(Pair(models["gpt2_policy"], models["llama_rm"]), "--vllm-engine-args", value)
    assert "--vllm-engine-args" in message and says in message


def test_config_is_logged_with_secrets_redacted(server, server_b):
    for s, keys in ((server, API_KEYS), (server_b, ("env-key",))):
        output = s.output()
        assert "configuration:" in output and "'api_key': ['***'" in output
        for key in keys:
            assert key not in output


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_samples(server, tmp_path, fmt):
    import httpx

    httpx.post(
        f"{server.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEYS[0]}"},
        json={
            "model": "gpt2_policy",
            "messages": [{"role": "user", "content": "hi"}],
            "best_of": 2,
            "max_tokens": 3,
        },
    ).raise_for_status()
    out = tmp_path / f"samples.{fmt}"
    import time

    time.sleep(1.0)  # let the writer commit
    result = export("--sample-log", str(server.sample_log), "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = read_records(server.sample_log)
    if fmt == "jsonl":
        exported = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        exported = pq.read_table(out).to_pylist()
        for record in exported:
            record["prompt"] = json.loads(record["prompt"])
            record["params"] = json.loads(record["params"])
    assert len(exported) >= len(rows) > 0
    required = {
        "request_id",
        "prompt",
        "completion",
        "reward",
        "rank",
        "policy",
        "reward_model",
        "params",
        "prompt_tokens",
        "completion_tokens",
        "created",
    }
    for record, row in zip(exported, rows, strict=False):
        assert required <= set(record)
        assert record["request_id"] == row["request_id"] and record["reward"] == row["reward"]
        assert record["policy"] == {"path": row["policy"], "version": row["policy_version"]}
    chat = [r for r in exported if r["request_id"].startswith("chatcmpl-")]
    assert chat and chat[-1]["prompt"] == [{"role": "user", "content": "hi"}]


def test_export_pairs_best_against_worst_per_prompt(server, tmp_path):
    import time

    import httpx

    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    for prompt in ("pairs one", "pairs two"):
        body = {"model": "gpt2_policy", "prompt": prompt, "best_of": 6, "max_tokens": 4, "seed": 5}
        httpx.post(f"{server.url}/v1/completions", headers=headers, json=body).raise_for_status()
    messages = [{"role": "user", "content": "pairs chat"}]
    body = {"model": "gpt2_policy", "messages": messages, "best_of": 6, "max_tokens": 4}
    httpx.post(f"{server.url}/v1/chat/completions", headers=headers, json=body).raise_for_status()
    time.sleep(1.0)  # let the writer commit
    out = tmp_path / "pairs.jsonl"
    result = export("--sample-log", str(server.sample_log), "--format", "pairs", "-o", str(out))
    assert result.returncode == 0, result.stderr
    pairs = {json.dumps(p["prompt"]): p for p in map(json.loads, out.read_text().splitlines())}
    by_prompt: dict[str, list[dict]] = {}
    for row in read_records(server.sample_log):
        by_prompt.setdefault(json.dumps(row["prompt"]), []).append(row)
    for prompt in ('"pairs one"', '"pairs two"', json.dumps(messages)):
        rewards = {r["completion"]: r["reward"] for r in by_prompt[prompt]}
        pair = pairs[prompt]
        chosen, rejected = pair["chosen"], pair["rejected"]
        if prompt.startswith("["):  # chat: TRL's conversational form
            chosen, rejected = chosen[0]["content"], rejected[0]["content"]
            assert pair["chosen"][0]["role"] == "assistant"
        assert rewards[chosen] == pair["chosen_reward"] == max(rewards.values())
        assert rewards[rejected] == pair["rejected_reward"] == min(rewards.values())
    margins = sorted(p["chosen_reward"] - p["rejected_reward"] for p in pairs.values())
    cut = (margins[0] + margins[1]) / 2
    result = export("--sample-log", str(server.sample_log), "--format", "pairs", "--min-margin", str(cut),
                    "-o", str(tmp_path / "wide.jsonl"))  # fmt: skip
    kept = [json.loads(line) for line in (tmp_path / "wide.jsonl").read_text().splitlines()]
    assert len(kept) == sum(m >= cut for m in margins) < len(pairs)
    assert all(p["chosen_reward"] - p["rejected_reward"] >= cut for p in kept)


def test_export_of_a_missing_log_is_a_clear_error(tmp_path):
    result = export("--sample-log", str(tmp_path / "none.db"), "-o", str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and "no candidate log" in result.stderr


def test_the_committed_default_pair_serves(tmp_path):
    from pathlib import Path

    import httpx
    from conftest import start_server, stop_server

    root = Path(__file__).resolve().parents[1] / "default-models"
    server = start_server(Pair(root / "policy", root / "reward_model"), tmp_path)
    try:
        body = {
            "model": "policy",
            "prompt": "largest digit in 5937:",
            "max_tokens": 4,
            "best_of": 4,
            "temperature": 0,
        }
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    finally:
        stop_server(server)
    # Greedy decoding of the trained policy: its first choice is a digit, not random bytes.
    assert response["choices"][0]["text"].strip().isdigit(), response


def bon(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bon", *args], capture_output=True, text=True, timeout=timeout
    )


def fails_cleanly(result: subprocess.CompletedProcess, *says: str) -> None:
    """Exit 2, one line naming the problem, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in says:
        assert text in result.stderr, result.stderr


def test_trainer_mistakes_are_one_line_not_a_traceback(models, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n{not json\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    base, out = str(models["gpt2_policy"]), str(tmp_path / "out")
    fails_cleanly(
        bon("train", "sft", "--base", base, "--data", str(bad), "--output", out), f"{bad}:2", "not JSON"
    )
    missing = str(tmp_path / "none.jsonl")
    fails_cleanly(bon("train", "sft", "--base", base, "--data", missing, "--output", out), "no such file")
    fails_cleanly(
        bon("train", "sft", "--base", str(tmp_path), "--data", str(good), "--output", out), "--base"
    )
    fails_cleanly(bon("train", "sft", "--base", base, "--data", str(good), "--output", str(tmp_path)),
                  "already exists")  # fmt: skip
    # A policy whose tokenizer has no chat template.
    plain = tmp_path / "plain_policy"
    shutil.copytree(models["gpt2_policy"], plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    plain = str(plain)
    fails_cleanly(
        bon("train", "sft", "--base", plain, "--data", str(chat), "--output", out), "no chat template"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "no prompt field"}) + "\n")
    rm = str(models["llama_rm"])
    raft = bon(
        "train", "raft", "--policy", base, "--prompts", str(prompts), "--reward-model", rm, "--output", out
    )
    fails_cleanly(raft, f"{prompts}:1", "'prompt'")
    assert not (tmp_path / "out").exists()
    # A reward model is no policy, whichever command is given it.
    log = tmp_path / "log.db"
    for command in (["train", "raft", "--policy", rm, "--sample-log", str(log)],
                    ["train", "sft", "--base", rm, "--data", str(good)]):  # fmt: skip
        fails_cleanly(bon(*command, "--output", out), "not a causal LM")
    assert not (tmp_path / "out").exists()


@same_on_every_engine
def test_reward_training_on_a_few_groups_holds_one_out_or_says_it_cannot(models, tmp_path):
    def groups(count: int):
        data = tmp_path / f"prefs{count}.jsonl"
        rows = [{"prompt": f"{i} +1 =", "chosen": f" {i + 1}", "rejected": f" {i}"} for i in range(count)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(data)

    base = str(models["gpt2_policy"])
    flags = ["--batch-size", "2", "--max-length", "16", "--torch-threads", "1"]
    three = bon("train", "rm", "--base", base, "--data", groups(3), "--output", str(tmp_path / "a"), *flags)
    assert three.returncode == 0, three.stderr[-2000:]
    assert "holding out 1 of 3 groups" in three.stderr
    assert "LOAD REPORT" not in three.stderr and "MISSING" not in three.stderr
    assert "with a fresh score head (score.weight)" in three.stderr
    assert "eval_accuracy" in json.loads(three.stdout[three.stdout.index("{") :])["result"]
    one = bon("train", "rm", "--base", base, "--data", groups(1), "--output", str(tmp_path / "b"), *flags)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "too few to hold any out" in one.stderr
    assert "no held-out accuracy" in json.loads(one.stdout[one.stdout.index("{") :])["result"]["note"]


def test_help_version_defaults_and_required_flags():
    assert bon("--version").stdout.startswith("bon ")
    listing = bon("train", "--help")
    assert listing.returncode == 0 and all(m in listing.stdout for m in ("sft", "rm", "raft"))
    sft = bon("train", "sft", "--help").stdout
    assert "required:" in sft and "--base BASE" in sft.split("required:")[1].split("training:")[0]
    assert "(default: 1)" in sft and "--torch-threads" in sft


def test_recipes_report_their_data_and_end_with_one_summary_shape(models, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i} +1 =", "completion": f" {i + 1}"}) + "\n" for i in range(6))
    )
    base, out = str(models["gpt2_policy"]), str(tmp_path / "sft")
    flags = ["--batch-size", "2", "--max-length", "16", "--torch-threads", "1"]
    result = bon("train", "sft", "--base", base, "--data", str(data), "--output", out, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "read 6 examples" in result.stderr
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(summary) == {"recipe", "output", "data", "result"} and summary["data"]["examples"] == 6


def test_raft_warns_when_it_keeps_the_best_of_bad_candidates(models, tmp_path):
    from server.log.records import CompletionRecord, RequestRecord
    from server.log.sample_log import SampleLog

    log = SampleLog(tmp_path / "log.db")
    for i, rewards in enumerate([[5.0, 4.0], [-3.0, -4.0], [6.0, 5.5]]):
        completions = [
            CompletionRecord(0, j, f" c{j}", r, j, "stop", 2, False) for j, r in enumerate(rewards)
        ]
        log.append(
            RequestRecord(f"r{i}", {}, "p", "v", "rm", "v", 10.0 + i, [(f"prompt {i}", 3)], completions)
        )
    log.close()
    source = [
        "train",
        "raft",
        "--policy",
        str(models["gpt2_policy"]),
        "--sample-log",
        str(tmp_path / "log.db"),
    ]
    warned = bon(*source, "--output", str(tmp_path / "raft"), "--max-length", "16", "--batch-size", "2")
    assert warned.returncode == 0, warned.stderr[-2000:]
    assert (
        "1 of the 3 kept samples score below the median" in warned.stderr and "--min-reward" in warned.stderr
    )
    # The window as dates a person reads, not Unix floats.
    assert re.search(r"window \(start of the log, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]", warned.stderr)
    quiet = bon(*source, "--output", str(tmp_path / "raft2"), "--min-reward", "0", "--max-length", "16")
    assert quiet.returncode == 0 and "below the median" not in quiet.stderr
    summary = json.loads(quiet.stdout[quiet.stdout.index("{") :])
    assert summary["data"]["samples_kept"] == 2 and summary["data"]["samples_seen"] == 6


@same_on_every_engine
@pytest.mark.parametrize(
    "argv",
    [["--help"], ["serve", "--help"], ["train", "--help"], ["train", "rm", "--help"],
     ["train", "sft", "--help"], ["train", "raft", "--help"], ["score", "--help"], ["generate", "--help"],
     ["eval", "--help"], ["demo", "--help"], ["train", "raft", "--bogus"], ["score"], ["train", "nope"]],
)  # fmt: skip
def test_help_and_usage_errors_answer_before_torch_is_imported(argv):
    """They took 12-17 s when the command's module (and torch) was imported to build its parser."""
    probe = (
        "import sys\nfrom bon.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "print('EXIT', code, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    *_, code, torch_loaded, transformers_loaded = result.stdout.strip().splitlines()[-1].split()
    assert (torch_loaded, transformers_loaded) == ("False", "False"), result.stdout[-500:]
    expected = "0" if argv[-1] == "--help" else "2"
    assert code == expected, result.stdout[-2000:] + result.stderr[-2000:]


@same_on_every_engine
def test_every_flag_of_every_command_says_what_it_does():
    import importlib

    from bon.cli import COMMANDS, build_parser

    parsers = [getattr(importlib.import_module(module), name)() for module, name, _ in COMMANDS.values()]
    commands = build_parser()._subparsers._group_actions[0].choices
    parsers += [commands["serve"], commands["export-samples"]]
    for parser in parsers:
        for action in parser._actions:
            assert action.help, (parser.prog, action.option_strings)
    serve = bon("serve", "--help").stdout
    assert "default: 8000" in serve and "{transformers,vllm}" in serve and "required" in serve


def test_the_container_health_check_reads_the_port_the_server_was_given(server):
    """The Dockerfile's HEALTHCHECK: `--port` after the image name wins over BON_PORT."""
    import os

    env = {**os.environ, "BON_PORT": "1"}  # what the image sets, and wrong for this server
    check = [sys.executable, "-m", "bon.healthcheck", "--pid"]
    healthy = subprocess.run([*check, str(server.process.pid)], env=env, capture_output=True, text=True)
    assert healthy.returncode == 0, healthy.stderr
    # A process without --port: BON_PORT is checked, and nothing listens there.
    unhealthy = subprocess.run([*check, str(os.getpid())], env=env, capture_output=True, text=True)
    assert unhealthy.returncode == 1 and "127.0.0.1:1/ready" in unhealthy.stderr


@same_on_every_engine
def test_readme_training_examples_run_as_written(tmp_path):
    """The two commands under "Try it on the default pair", read from README and run on the
    shipped samples; each writes a checkpoint the server's loaders accept."""
    import shlex
    from pathlib import Path

    from server.policy import read_policy
    from server.reward import read_reward_model

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("**Try it on the default pair**", 1)[1].split("```", 2)[1]
    commands = [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert [c[:3] for c in commands] == [[".venv/bin/bon", "train", "sft"], [".venv/bin/bon", "train", "rm"]]
    for command in commands:
        argv = [str(root / a) if a.startswith(("default-models/", "examples/")) else a for a in command[1:]]
        result = subprocess.run([sys.executable, "-m", "bon", *argv], capture_output=True, text=True,
                                timeout=600, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    read_policy(tmp_path / "sft-example")
    assert read_reward_model(tmp_path / "rm-example").max_length > 0
