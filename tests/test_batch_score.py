"""`bon score`: rewards equal to `/v1/score` and to a plain forward, every row kept in order, bad
rows named, kill -9 then --resume gives every row exactly once, torchrun shards merge in order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from conftest import API_KEYS, ENGINE
from reference import completion_reward

BON = [sys.executable, "-m", "bon"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]


def bon_score(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*BON, "score", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scored_in_one_go(source: Path, rm: Path, window_rows: int) -> list[dict]:
    """The rows `bon score` writes for `source` in one uninterrupted single-process run."""
    out = source.with_name("uninterrupted.jsonl")
    summary_of(bon_score(source, "-o", out, "--reward-model", rm, "--window-rows", window_rows))
    return read_jsonl(out)


def mixed_rows(count: int) -> list[dict]:
    """Text and chat prompts, single responses and lists, of varied lengths, each with an id."""
    rows = []
    for i in range(count):
        if i % 3 == 0:
            rows.append(
                {"id": i, "prompt": "2 + 3 =" * (1 + i % 7), "responses": [" 5", " six" * (i % 4), ""]}
            )
        elif i % 3 == 1:
            rows.append({"id": i, "prompt": MESSAGES, "response": "blue " * (1 + i % 5), "tag": ["x", i]})
        else:
            rows.append({"id": i, "prompt": "colour:" + " red" * (i % 11), "response": " green"})
    return rows


def server_scores(server, key: str | None, row: dict) -> list[float]:
    responses = row["responses"] if "responses" in row else [row["response"]]
    body = httpx.post(
        f"{server.url}/v1/score",
        headers={"Authorization": f"Bearer {key}"} if key else {},
        json={"prompt": row["prompt"], "responses": responses},
        timeout=60,
    ).json()
    return [d["reward"] for d in body["data"]]


@pytest.mark.parametrize("which", ["server", "server_b"])
def test_rewards_equal_the_servers_score_route(which, request, tmp_path, pair_gpt2_llama, pair_qwen2_gpt2):
    """Both RM input rules: a Llama RM with its own chat template, and a GPT-2 RM without one (chat
    prompts rendered by the policy's template, given with --policy as the server has it)."""
    server = request.getfixturevalue(which)
    pair, key = (pair_gpt2_llama, API_KEYS[0]) if which == "server" else (pair_qwen2_gpt2, "env-key")
    rows = mixed_rows(30)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = summary_of(bon_score(source, "-o", out, "--reward-model", pair.reward_model,
                                   "--policy", pair.policy, "--window-rows", 7))  # fmt: skip
    assert summary["rows"] == 30 and summary["reward"]["count"] == 10 * 3 + 20
    scored = read_jsonl(out)
    assert [r["id"] for r in scored] == list(range(30))
    for row, got in zip(rows, scored, strict=True):
        assert {k: v for k, v in got.items() if k not in ("reward", "rewards")} == row
        mine = got["rewards"] if "responses" in row else [got["reward"]]
        assert mine == pytest.approx(server_scores(server, key, row), rel=1e-4, abs=1e-5)
    text_row = rows[2]
    assert scored[2]["reward"] == pytest.approx(
        completion_reward(pair.reward_model, text_row["prompt"], text_row["response"]), rel=1e-4, abs=1e-5
    )


def test_parquet_in_and_out_keeps_every_field_and_the_order(tmp_path, pair_gpt2_llama):
    import pyarrow as pa

    rows = [{"n": i, "prompt": f"item {i}:", "responses": ["a", "bb" * i]} for i in range(20)]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    out = tmp_path / "out.parquet"
    summary_of(
        bon_score(source, "-o", out, "--reward-model", pair_gpt2_llama.reward_model, "--window-rows", 6)
    )
    scored = pq.read_table(out).to_pylist()
    assert [r["n"] for r in scored] == list(range(20))
    for row, got in zip(rows, scored, strict=True):
        assert got["responses"] == row["responses"]
        assert got["rewards"][1] == pytest.approx(
            completion_reward(pair_gpt2_llama.reward_model, row["prompt"], row["responses"][1]),
            rel=1e-4,
            abs=1e-5,
        )


def test_a_bad_row_is_named_by_file_and_line_and_can_be_skipped(tmp_path, pair_gpt2_llama):
    rows = mixed_rows(6)
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"prompt": "no response here"}')
    lines.insert(4, "{not json")
    lines.insert(5, json.dumps({"prompt": "x", "response": "y" * 400_000}))
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    rm = pair_gpt2_llama.reward_model

    stopped = bon_score(source, "-o", tmp_path / "out.jsonl", "--reward-model", rm)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    assert f"{source}:3:" in stopped.stderr and '"response"' in stopped.stderr
    assert not (tmp_path / "out.jsonl").exists()

    out = tmp_path / "skipped.jsonl"
    summary = summary_of(bon_score(source, "-o", out, "--reward-model", rm, "--skip-bad-rows"))
    assert summary["skipped_bad_rows"] == 3 and summary["rows"] == 6
    assert [r["id"] for r in read_jsonl(out)] == list(range(6))


@pytest.mark.parametrize(
    "args, message",
    [
        (["in.csv", "-o", "out.jsonl"], "name the file .jsonl or .parquet"),
        (["missing.jsonl", "-o", "out.jsonl"], "no such file"),
        (["in.jsonl", "-o", "out.txt"], "name the file .jsonl or .parquet"),
    ],
)
def test_user_mistakes_get_one_line(tmp_path, pair_gpt2_llama, args, message):
    write_jsonl(tmp_path / "in.jsonl", mixed_rows(2))
    (tmp_path / "in.csv").write_text("prompt,response\n")
    result = subprocess.run(
        [*BON, "score", *args, "--reward-model", str(pair_gpt2_llama.reward_model)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_an_existing_output_is_kept_and_a_finished_job_resumes_to_nothing(tmp_path, pair_gpt2_llama):
    source = write_jsonl(tmp_path / "in.jsonl", mixed_rows(4))
    out = tmp_path / "out.jsonl"
    rm = pair_gpt2_llama.reward_model
    summary_of(bon_score(source, "-o", out, "--reward-model", rm))
    before = out.read_bytes()
    again = bon_score(source, "-o", out, "--reward-model", rm)
    assert again.returncode == 2 and "exists" in again.stderr
    assert (
        "already complete"
        in summary_of(bon_score(source, "-o", out, "--reward-model", rm, "--resume"))["note"]
    )
    assert out.read_bytes() == before


def test_kill_9_then_resume_gives_every_row_exactly_once_in_order(tmp_path, pair_gpt2_llama):
    rows = mixed_rows(3000)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    rm = pair_gpt2_llama.reward_model
    expected = scored_in_one_go(source, rm, 100)

    out = tmp_path / "out.jsonl"
    command = [*BON, "score", str(source), "-o", str(out), "--reward-model", str(rm), "--window-rows", "100"]
    journal = tmp_path / "out.jsonl.journal0"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count('"window"') >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    windows_done = journal.read_text().count('"window"')
    assert 3 <= windows_done < 30, "the job was not killed half-way"
    assert not out.exists()

    summary = summary_of(bon_score(source, "-o", out, "--reward-model", rm, "--window-rows", 100, "--resume"))
    assert summary["rows_scored"] == 3000 - 100 * windows_done
    assert read_jsonl(out) == expected
    assert not list(tmp_path.glob("out.jsonl.*"))


@pytest.mark.skipif(ENGINE == "vllm", reason="two vLLM engines at once do not fit this machine's cores")
def test_torchrun_shards_merge_into_one_file_in_input_order(tmp_path, pair_gpt2_llama):
    rows = mixed_rows(200)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    rm = pair_gpt2_llama.reward_model
    expected = scored_in_one_go(source, rm, 16)
    out = tmp_path / "sharded.jsonl"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "-m", "bon", "score", str(source), "-o", str(out),
         "--reward-model", str(rm), "--window-rows", "16", "--torch-threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = read_jsonl(out)
    assert [r["id"] for r in sharded] == list(range(200))
    for a, b in zip(sharded, expected, strict=True):
        assert a.get("reward", a.get("rewards")) == pytest.approx(
            b.get("reward", b.get("rewards")), rel=1e-4, abs=1e-5
        )


def test_a_journal_line_cut_off_by_a_crash_does_not_hide_the_windows_written_after_it(tmp_path):
    """kill -9 in the middle of a journal line: the resumed run's lines must follow whole lines."""
    from server.batch.journal import Journal

    out = tmp_path / "out.jsonl"
    first = Journal(out, 0, 1, {"job": 1})
    first.open(resume=False)
    first.append(0, [{"row": 0}], skipped=0)
    with first.journal.open("ab") as f:
        f.write(b'{"window": {"index": 1, "li')  # the crash
    with first.part.open("ab") as f:
        f.write(b'{"row": 1}\n{"ro')
    first._lock_handle.close()  # the process died: the kernel let its lock go
    resumed = Journal(out, 0, 1, {"job": 1})
    assert resumed.open(resume=True) == 0
    resumed.append(1, [{"row": 1}], skipped=0)
    resumed.append(2, [{"row": 2}], skipped=0)
    resumed.finish(3)
    assert resumed.merge(3, lambda record: None) == 3
    assert read_jsonl(out) == [{"row": 0}, {"row": 1}, {"row": 2}]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_several_reward_models_are_combined_and_each_kept_by_name(models, tmp_path, suffix):
    """Two reward models with different tokenizers, one standardised by its reward_stats.json, the
    other raw; --reward-combine min. Each member's reward is a plain forward's, and "reward" is
    the minimum of the standardised values."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(models["llama_rm"], a)
    shutil.copytree(models["gpt2_rm_plain"], b)
    (a / "reward_stats.json").write_text(json.dumps({"mean": 0.2, "std": 3.0}))
    rows = [
        {"prompt": "2 + 3 =", "response": " 5"},
        {"prompt": "colour:", "responses": [" red", " blue green"]},
    ]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / f"scored{suffix}"
    summary_of(bon_score(source, "-o", out, "--reward-model", f"first={a}", "--reward-model", b,
                         "--reward-combine", "min"))  # fmt: skip
    written = read_jsonl(out) if suffix == ".jsonl" else pq.read_table(out).to_pylist()
    single, listed = written
    pairs = [(single, "2 + 3 =", " 5", single["reward_members"], single["reward"])] + [
        (listed, "colour:", r, listed["rewards_members"][i], listed["rewards"][i])
        for i, r in enumerate([" red", " blue green"])
    ]
    for _, prompt, response, members, combined in pairs:
        raw = {"first": completion_reward(a, prompt, response), "b": completion_reward(b, prompt, response)}
        assert members == pytest.approx(raw, rel=1e-4)
        assert combined == pytest.approx(min((members["first"] - 0.2) / 3.0, members["b"]), rel=1e-6)
