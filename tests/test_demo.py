"""`bon demo` end to end at a toy size: the report's shape, and held-out prompts never trained on."""

from __future__ import annotations

import json
import sqlite3

from trainers.demo.pipeline import main
from trainers.demo.tasks import Item, gold_score, suite


def test_gold_scores_are_graded_with_ties():
    item = Item("add", "12+30=", "42")
    assert gold_score(item, " 42") == 1.0
    assert gold_score(item, " 41") == gold_score(item, " 43") < 1.0  # equally far: a tie
    assert gold_score(item, " 41") > gold_score(item, " 50") > gold_score(item, " cat") == 0.0
    capital = Item("capital", "capital of peru:", "lima")
    assert (
        gold_score(capital, " lima\n") == 1.0
        and 0 < gold_score(capital, " paris") < 1
        and gold_score(capital, " x") == 0
    )
    train, held_out = suite()
    assert {i.task for i in held_out} == {"add", "capital", "reverse"}
    assert not {i.prompt for i in train} & {i.prompt for i in held_out}


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
            "--sft-epochs",
            "1",
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
    _, held_out = suite()
    assert logged and not logged & {i.prompt for i in held_out}
