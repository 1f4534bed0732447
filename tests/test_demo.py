"""`bon demo` end to end at a toy size: the report's shape, and held-out prompts never trained on."""

from __future__ import annotations

import json
import sqlite3

from trainers.demo.pipeline import main
from trainers.demo.tasks import Item, demonstration, distinct_2, gold_score, suite


def test_gold_scores_are_graded_with_ties():
    largest = Item("largest", "largest digit in 5937:", "9")
    assert gold_score(largest, " 9\nmore") == 1.0
    assert gold_score(largest, " 7") > gold_score(largest, " 5") > gold_score(largest, " 3") > 0
    assert (
        gold_score(largest, " 8") == gold_score(largest, " 99") == gold_score(largest, " x") == 0.0
    )  # not in it
    last = Item("last", "last letter of kgho:", "o")
    assert gold_score(last, " o") == 1.0
    assert gold_score(last, " k") == gold_score(last, " g") == 0.5  # two other letters: a tie
    assert gold_score(last, " a") == gold_score(last, " oo") == 0.0
    train, held_out = suite(prompts_per_task=500, held_out_per_task=50)
    assert {i.task for i in held_out} == {"last", "largest"} and len(held_out) == 100
    assert not {i.prompt for i in train} & {i.prompt for i in held_out}
    assert all(i.answer == (i.subject[-1] if i.task == "last" else max(i.subject)) for i in train)


def test_demonstrations_err_at_the_rate_asked_with_characters_of_the_prompt():
    import random

    train, _ = suite(prompts_per_task=1000)
    rng = random.Random(1)
    answers = [(i, demonstration(i, 0.3, rng)) for i in train]
    wrong = [(i, a) for i, a in answers if a != i.answer]
    assert abs(len(wrong) / len(answers) - 0.3) < 0.03
    assert all(len(a) == 1 and a in i.subject for i, a in wrong)
    assert demonstration(Item("last", "last letter of ppp:", "p"), 1.0, rng) == "p"


def test_distinct_2_counts_character_bigrams_across_outputs():
    assert distinct_2([" a", " b", " a"]) == 2 / 3
    assert distinct_2([" ab"]) == 1.0 and distinct_2(["x"]) == 0.0


def test_demo_runs_the_loop_and_reports(tmp_path):
    out = tmp_path / "demo"
    report = main(
        [
            "--output",
            str(out),
            "--rounds",
            "1",
            "--round-prompts",
            "40",
            "--rm-prompts",
            "40",
            "--prompts-per-task",
            "300",
            "--sft-epochs",
            "4",
            "--sft-learning-rate",
            "1e-2",  # enough for one-character answers: the RM needs some right and some wrong
            "--max-new-tokens",
            "3",
            "--rm-epochs",
            "1",
            "--raft-epochs",
            "1",
            "--n",
            "4",
            "--hidden",
            "32",
            "--layers",
            "1",
        ]
    )
    on_disk = json.loads((out / "demo.json").read_text())
    assert on_disk["n"] == 4 and len(on_disk["raft_rounds"]) == 1
    for key in ("policy_pass_at_1", "bon_pass", "oracle_bon_pass", "rm_accuracy"):
        assert 0.0 <= on_disk[key] <= 1.0
    assert (
        on_disk["oracle_bon_pass"] >= on_disk["policy_pass_at_1"]
    )  # oracle picks the best of the same samples
    assert set(on_disk["raft_rounds"][0]) >= {"pass_at_1", "mean_gold", "distinct_2", "distinct_2_per_input"}
    assert report["models"]["policy"].endswith("raft-1")
    # What the server logged (and RAFT trained on) holds training-split prompts only.
    logged = {
        json.loads(p)
        for (p,) in sqlite3.connect(out / "samples.db").execute("SELECT DISTINCT prompt FROM candidates")
    }
    _, held_out = suite(prompts_per_task=300)
    assert logged and not logged & {i.prompt for i in held_out}
