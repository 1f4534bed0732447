"""`bon label-steps` and `bon train prm` from the command line, on files written here: what they
write, that it repeats, that the trained PRM loads and reads as the server reads it, and one-line
errors for bad rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import same_on_every_engine
from reference import step_scores
from transformers import AutoTokenizer

from server.engines.hf.process import load_process_weights
from server.reward import read_reward_model

pytestmark = same_on_every_engine  # the trainers run the transformers engine only


def bon(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bon", *args], capture_output=True, text=True, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess, *says: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for text in says:
        assert text in last, result.stderr


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@pytest.fixture(scope="module")
def labelled(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    prompts = root / "prompts.jsonl"
    write_jsonl(
        prompts,
        [{"prompt": "the cat", "reference": "e"}, {"prompt": "a dog runs", "reference": "o"},
         {"prompt": [{"role": "user", "content": "hi"}], "reference": "a"}],
    )  # fmt: skip
    common = ["--policy", str(models["llama_policy"]), "--prompts", str(prompts), "--checker",
              "tests.rule_rewards:contains", "--rollouts", "3", "--answers", "2", "--step-delimiter", " ",
              "--max-tokens", "10", "--temperature", "1.3", "--seed", "7"]  # fmt: skip
    outputs = {}
    for name, extra in [("soft", []), ("again", []), ("hard", ["--labels", "hard"])]:
        out = root / f"{name}.jsonl"
        outputs[name] = (ok(bon("label-steps", *common, *extra, "-o", str(out))), out)
    return outputs


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_label_steps_writes_rollout_shares_that_repeat_and_agree_with_hard_labels(labelled):
    summary, soft_path = labelled["soft"]
    soft, again, hard = rows_of(soft_path), rows_of(labelled["again"][1]), rows_of(labelled["hard"][1])
    assert soft == again  # seeded: the same command writes the same file
    assert summary["answers"] == len(soft) == 6
    assert summary["steps"] == sum(len(r["steps"]) for r in soft)
    assert summary["rollouts"] == sum(3 * (len(r["steps"]) - 1) for r in soft)
    assert any(len(r["steps"]) > 1 for r in soft)
    for row_soft, row_hard in zip(soft, hard, strict=True):
        assert row_soft["steps"] == row_hard["steps"]  # the same answers, the same rollouts
        *inner, last = row_soft["labels"]
        # A soft label is a share of 3 rollouts; the hard label is whether any was right.
        assert all(round(y * 3) == pytest.approx(y * 3) for y in inner)
        assert row_hard["labels"][:-1] == [float(y > 0) for y in inner]
        # The last step's label is the checker's verdict on the answer itself.
        assert last == float(row_soft["reference"] in " ".join(row_soft["steps"]))
    labels = [y for r in soft for y in r["labels"]]
    assert summary["good_share"] == pytest.approx(sum(labels) / len(labels), abs=1e-4)


def test_train_prm_learns_labels_and_its_output_reads_as_the_server_reads_it(labelled, models, tmp_path):
    # Files it did not make: hand-written answers whose label follows a visible feature of the step.
    rows = []
    for i in range(24):
        steps = [f"step {j} {'good' if (i + j) % 3 else 'bad'}" for j in range(3)]
        rows.append(
            {"prompt": f"question {i}:", "steps": steps, "labels": [float("good" in s) for s in steps]}
        )
    data = tmp_path / "steps.jsonl"
    write_jsonl(data, rows)
    out = tmp_path / "prm"
    summary = ok(
        bon("train", "prm", "--base", str(models["llama_policy"]), "--data", str(data), "--output", str(out),
            "--epochs", "6", "--learning-rate", "3e-3", "--batch-size", "4", "--eval-fraction", "0.25")
    )  # fmt: skip
    assert summary["recipe"] == "prm" and summary["data"]["steps"] == 72
    assert summary["result"]["eval_step_accuracy"] >= 0.8, summary
    assert json.loads((out / "bon_reward.json").read_text())["kind"] == "process"

    info = read_reward_model(out)
    assert info.steps is not None and info.steps.layout == "shepherd"
    tok = AutoTokenizer.from_pretrained(out)
    good, bad = tok.convert_tokens_to_ids(["+", "-"])
    step_id = tok.convert_tokens_to_ids("ки")
    answer = "step 0 good\n\nstep 1 bad"
    ids = tok("question 99:" + "".join(s + " ки\n" for s in answer.split("\n\n"))).input_ids
    want = step_scores(out, "shepherd", ids, step_id, (good, bad))
    got = load_process_weights(info, "cpu", "float32").score_steps(
        [info.encode("question 99:", None, answer)]
    )
    assert got[0] == pytest.approx(want, rel=1e-4)
    assert want[0] > 0.5 > want[1]

    # A soft-labelled file from bon label-steps trains too.
    soft = bon("train", "prm", "--base", str(models["llama_policy"]), "--data", str(labelled["soft"][1]),
               "--output", str(tmp_path / "prm_soft"), "--step-delimiter", " ", "--epochs", "1")  # fmt: skip
    assert math.isfinite(ok(soft)["result"]["eval_loss"])


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"prompt": "q", "steps": ["a", "b"], "labels": [1]}, "one label per step"),
        ({"prompt": "q", "steps": ["a"], "labels": [2]}, "labels[0] is 2"),
        (
            {"prompt": "q", "steps": ["a\n\nb"], "labels": [1]},
            "steps[0] is blank or holds the step delimiter",
        ),
        ({"prompt": 3, "steps": ["a"], "labels": [1]}, "'prompt' must be"),
    ],
)
def test_train_prm_bad_rows_are_one_line_naming_the_row(models, tmp_path, row, says):
    data = tmp_path / "steps.jsonl"
    write_jsonl(data, [{"prompt": "q", "steps": ["a"], "labels": [0]}, row])
    result = bon("train", "prm", "--base", str(models["llama_policy"]), "--data", str(data), "--output",
                 str(tmp_path / "out"))  # fmt: skip
    one_line_error(result, f"{data}:2", says)


def test_label_steps_mistakes_are_one_line(models, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "a", "reference": 5}])
    common = [
        "--policy",
        str(models["llama_policy"]),
        "--prompts",
        str(prompts),
        "-o",
        str(tmp_path / "o.jsonl"),
    ]
    one_line_error(
        bon("label-steps", *common, "--checker", "tests.rule_rewards:contains"), ":1", "'reference'"
    )
    one_line_error(bon("label-steps", *common, "--checker", "nowhere:thing"), "--checker", "cannot load")


def test_a_prm_reading_does_not_depend_on_the_batch_it_shares(models):
    """The engine's reading does not depend on the batch it shares (padding is masked out)."""
    from bon.tiny_models import build_prm, tokenizer_b

    directory = build_prm(models["llama_policy"].parent / "prm_batch", "token", tokenizer_b(), seed=9)
    info = read_reward_model(directory)
    model = load_process_weights(info, "cpu", "float32")
    short = info.encode("x", None, "a\n\nb")
    long = info.encode("a much longer prompt than the other one", None, "c\n\nd\n\ne")
    with torch.inference_mode():
        alone = model.score_steps([short])[0]
        together = model.score_steps([short, long])[0]
    assert together == pytest.approx(alone, rel=1e-5)


def test_bon_score_writes_step_rewards_of_a_prm(models, tmp_path):
    """A PRM beside an outcome model: each row's step scores (an independent forward) and its
    reward, the chosen aggregate, as the PRM's member value. (Chat prompts take /v1/score's input
    rule, which test_process_reward.py checks.)"""
    from bon.tiny_models import build_prm, tokenizer_b

    prm = build_prm(tmp_path / "prm", "token", tokenizer_b(), seed=4)
    source = tmp_path / "rows.jsonl"
    write_jsonl(
        source,
        [{"prompt": "add 2 and 3:", "response": "2 + 3 = 5\n\nso 5"},
         {"prompt": "say hi:", "responses": ["a\n\nb\n\nc", "one"]}],
    )  # fmt: skip
    out = tmp_path / "scored.parquet"  # the typed columns; JSONL writes the same records
    ok(bon("score", str(source), "-o", str(out), "--reward-model", f"prm={prm}", "--reward-model",
           f"orm={models['llama_rm']}", "--step-aggregate", "last"))  # fmt: skip
    rows = pq.read_table(out).to_pylist()
    tok = AutoTokenizer.from_pretrained(prm)
    step_id = tok.convert_tokens_to_ids("<step>")

    def expected(prompt, response):
        marked = "".join(s + "<step>" for s in response.split("\n\n"))
        return step_scores(prm, "token", tok(prompt + marked).input_ids, step_id, None)

    want = expected(rows[0]["prompt"], rows[0]["response"])
    assert rows[0]["step_rewards"] == pytest.approx(want, rel=1e-4)
    assert rows[0]["reward_members"]["prm"] == pytest.approx(want[-1], rel=1e-4)
    for response, steps, members in zip(
        rows[1]["responses"], rows[1]["rewards_steps"], rows[1]["rewards_members"], strict=True
    ):
        want = expected(rows[1]["prompt"], response)
        assert steps == pytest.approx(want, rel=1e-4) and members["prm"] == pytest.approx(want[-1], rel=1e-4)
