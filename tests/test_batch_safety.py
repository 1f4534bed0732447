"""What an attacker did to `bon score` (issue 15, items 4-6, 11, 14): two runs on one output, a
journal or part file that lies, an output that is the input, Parquet output whose fields change,
and inputs that used to end in a traceback."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_batch_score import BON, bon_score, read_jsonl, summary_of, write_jsonl

from server.batch.journal import Journal


def rows(count: int, **extra) -> list[dict]:
    return [{"id": i, "prompt": f"count {i}:", "response": f" {i + 1}", **extra} for i in range(count)]


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(tmp_path, pair_gpt2_llama):
    source = write_jsonl(tmp_path / "in.jsonl", rows(12000))
    out = tmp_path / "out.jsonl"
    flags = [
        "-o",
        out,
        "--reward-model",
        pair_gpt2_llama.reward_model,
        "--window-rows",
        4,
        "--torch-threads",
        1,
    ]
    first = subprocess.Popen(
        [*BON, "score", source, *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        lock = tmp_path / ".out.jsonl.lock0"
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = bon_score(source, *flags, "--resume")
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert "is being written by pid" in line and str(first.pid) in line
    finally:
        first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    written = read_jsonl(out)
    assert [r["id"] for r in written] == list(range(12000))
    assert not lock.exists()


def test_the_input_is_never_the_output(tmp_path, pair_gpt2_llama):
    source = write_jsonl(tmp_path / "in.jsonl", rows(3))
    before = source.read_bytes()
    for extra in ([], ["--resume"]):
        result = bon_score(source, "-o", source, "--reward-model", pair_gpt2_llama.reward_model, *extra)
        assert result.returncode == 2 and "is the input file" in result.stderr
    assert source.read_bytes() == before


def journal_with(tmp_path, windows: int) -> Journal:
    journal = Journal(tmp_path / "out.jsonl", 0, 1, {"job": 1})
    journal.open(resume=False)
    for index in range(windows):
        journal.append(index, [{"row": 2 * index}, {"row": 2 * index + 1}], skipped=0)
    journal._lock_handle.close()  # as if killed
    return journal


def test_resume_does_again_every_window_the_part_file_does_not_hold(tmp_path):
    journal = journal_with(tmp_path, 3)
    lines = journal.journal.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["window"]["lines"] = 1  # an edited count: a row would silently go
    journal.journal.write_text("\n".join([*lines[:2], json.dumps(entry), lines[3]]) + "\n")
    resumed = Journal(tmp_path / "out.jsonl", 0, 1, {"job": 1})
    assert resumed.open(resume=True) == 0  # window 1 and everything after it are done again
    assert resumed.part.stat().st_size == journal.windows[0].end


def test_resume_never_pads_a_short_part_file(tmp_path):
    journal = journal_with(tmp_path, 3)
    with journal.part.open("r+b") as f:
        f.truncate(journal.windows[1].end - 3)  # window 1 cut short
    resumed = Journal(tmp_path / "out.jsonl", 0, 1, {"job": 1})
    assert resumed.open(resume=True) == 0
    assert b"\0" not in resumed.part.read_bytes()
    resumed.append(1, [{"row": 2}, {"row": 3}], skipped=0)
    resumed.append(2, [{"row": 4}, {"row": 5}], skipped=0)
    resumed.finish(3)
    assert resumed.merge(3, lambda record: None) == 6
    assert read_jsonl(tmp_path / "out.jsonl") == [{"row": i} for i in range(6)]


def test_an_empty_journal_starts_the_job_again(tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.journal0").write_bytes(b"")  # kill -9 before its first line
    (tmp_path / "out.jsonl.part0").write_bytes(b"")
    journal = Journal(out, 0, 1, {"job": 1})
    assert journal.open(resume=True) == -1
    assert json.loads(journal.journal.read_text()) == {"job": {"job": 1}}


def test_parquet_output_keeps_a_field_only_later_rows_have(tmp_path, pair_gpt2_llama):
    source = write_jsonl(tmp_path / "in.jsonl", rows(10) + [{**r, "extra": "x"} for r in rows(10)])
    out = tmp_path / "out.parquet"
    summary_of(
        bon_score(source, "-o", out, "--reward-model", pair_gpt2_llama.reward_model, "--window-rows", 4)
    )
    table = pq.read_table(out).to_pylist()
    assert [r["extra"] for r in table] == [None] * 10 + ["x"] * 10
    assert all(math.isfinite(r["reward"]) for r in table)


def test_a_field_that_changes_type_fails_before_any_scoring(tmp_path, pair_gpt2_llama):
    source = write_jsonl(tmp_path / "in.jsonl", rows(5, tag=1) + rows(5, tag="one"))
    out = tmp_path / "out.parquet"
    result = bon_score(source, "-o", out, "--reward-model", pair_gpt2_llama.reward_model)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tag" in result.stderr and "write .jsonl" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no part, journal or .merging


def test_hostile_rows_are_bad_rows_and_leave_nothing_behind(tmp_path, pair_gpt2_llama):
    deep = '{"prompt": "a", "response": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    nan = '{"prompt": "a", "response": "b", "x": NaN}'
    good = json.dumps({"prompt": "a", "response": "b"})
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([good, deep, nan, good]) + "\n")
    out = tmp_path / "out.jsonl"
    failed = bon_score(source, "-o", out, "--reward-model", pair_gpt2_llama.reward_model)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and "in.jsonl:2" in failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # the next run needs no --resume
    skipped = summary_of(bon_score(source, "-o", out, "--reward-model", pair_gpt2_llama.reward_model,
                                   "--skip-bad-rows"))  # fmt: skip
    assert skipped["skipped_bad_rows"] == 2 and skipped["rows"] == 2
    assert "NaN" not in out.read_text()


@pytest.mark.parametrize("content", [b"PAR1 not really", b""])
def test_a_damaged_parquet_file_is_one_line(tmp_path, pair_gpt2_llama, content):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(rows(50)), good)
    source = tmp_path / "in.parquet"
    source.write_bytes(content or good.read_bytes()[: good.stat().st_size // 2])
    result = bon_score(source, "-o", tmp_path / "out.jsonl", "--reward-model", pair_gpt2_llama.reward_model)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "in.parquet" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.parquet", "in.parquet"]


def test_a_parquet_file_with_both_response_columns_scores_each_row(tmp_path, pair_gpt2_llama):
    source = tmp_path / "in.parquet"
    both = [
        {"prompt": "a", "response": " b", "responses": None},
        {"prompt": "a", "response": None, "responses": [" c", " d"]},
    ]
    pq.write_table(pa.Table.from_pylist(both), source)
    out = tmp_path / "out.jsonl"
    summary_of(bon_score(source, "-o", out, "--reward-model", pair_gpt2_llama.reward_model))
    scored = read_jsonl(out)
    assert isinstance(scored[0]["reward"], float) and len(scored[1]["rewards"]) == 2


def test_a_file_that_is_not_a_candidate_log_is_one_line(tmp_path, pair_gpt2_llama):
    not_a_log = tmp_path / "notes.db"
    not_a_log.write_text("these are my notes, not SQLite\n" * 20)
    prompts = tmp_path / "prompts.jsonl"
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    prompts.write_text(json.dumps({"prompt": "count 1:"}) + "\n" + deep + "\n")
    models = ["--policy", pair_gpt2_llama.policy, "--reward-model", pair_gpt2_llama.reward_model]
    commands = [
        ["generate", *models, "--prompts", prompts, "--best-of", 2, "--sample-log", not_a_log],
        ["export-samples", "--sample-log", not_a_log, "-o", tmp_path / "out.jsonl"],
        ["serve", *models, "--sample-log", not_a_log, "--port", "1"],
    ]
    for command in commands:
        result = subprocess.run([*BON, *map(str, command)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (
            command[0],
            result.stderr[-2000:],
        )
        assert "notes.db: not a candidate log" in result.stderr.strip().splitlines()[-1], result.stderr[
            -2000:
        ]
    assert not_a_log.read_text().startswith("these are my notes")
    deep_row = subprocess.run(
        [
            *BON,
            *map(
                str,
                [
                    "generate",
                    *models,
                    "--prompts",
                    prompts,
                    "--best-of",
                    2,
                    "--sample-log",
                    tmp_path / "g.db",
                ],
            ),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deep_row.returncode == 2 and "Traceback" not in deep_row.stderr
    assert "prompts.jsonl:2: nested too deeply" in deep_row.stderr


def test_the_bar_counts_rows_once_scored_and_the_summary_says_where_the_output_is(tmp_path, pair_gpt2_llama):
    source = write_jsonl(tmp_path / "in.jsonl", rows(12))
    result = subprocess.run(
        [*BON, "score", "in.jsonl", "-o", "out.jsonl", "--reward-model", str(pair_gpt2_llama.reward_model),
         "--window-rows", "4"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["output"] == str((tmp_path / "out.jsonl").resolve())
    # Every count the bar shows past 0 comes with the tokens scored for it (it used to show 4/12 at
    # 0 tok/s: rows counted when queued).
    shown = re.findall(r"(\d+)/12 \[[^\]]*?([\d,]+) tok/s", result.stderr)
    assert shown and all(int(tokens.replace(",", "")) > 0 for count, tokens in shown if int(count) > 0)
    assert source.exists()
