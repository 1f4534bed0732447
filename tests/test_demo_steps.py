"""`bon demo --suite steps`: the chain task's step labels and slips, and the whole run at a toy size."""

from __future__ import annotations

import json
import random

from conftest import same_on_every_engine

from trainers.demo.chains import Chain, demonstration, is_correct, step_labels, suite
from trainers.demo.pipeline import main

pytestmark = same_on_every_engine


def test_steps_are_labelled_right_so_far_and_the_checker_reads_the_last_number():
    chain = Chain(17, (5, 9, 3))
    assert chain.prompt == "start 17, add 5, add 9, add 3:" and chain.reference == "34"
    right = " 17 + 5 = 22\n\n22 + 9 = 31\n\n31 + 3 = 34"
    assert step_labels(chain, right) == [1.0, 1.0, 1.0] and is_correct(chain, right)
    slipped = " 17 + 5 = 22\n\n22 + 9 = 41\n\n41 + 3 = 44"  # a dropped carry, carried on
    assert step_labels(chain, slipped) == [1.0, 0.0, 0.0] and not is_correct(chain, slipped)
    assert step_labels(chain, " 17 + 5 = 22\n\n22 + 9 = 31\n\n31 + 3 = 34\n\n34 + 1 = 35") == [1, 1, 1, 0]
    assert step_labels(chain, " 17 + 6 = 23\n\nhm") == [0.0, 0.0]


def test_demonstrations_slip_at_the_rate_asked_in_one_step():
    train, held_out = suite(0, 2000, held_out=100)
    assert len(held_out) == 100 and not {c.prompt for c in train} & {c.prompt for c in held_out}
    rng = random.Random(3)
    written = [(c, demonstration(c, 0.3, rng)) for c in train]
    wrong = [(c, d) for c, d in written if not is_correct(c, d)]
    assert abs(len(wrong) / len(written) - 0.3) < 0.04
    for chain, text in wrong:
        labels = step_labels(chain, text)
        first_bad = labels.index(0.0)
        assert labels == [1.0] * first_bad + [0.0] * (len(labels) - first_bad)
        assert len(labels) == len(chain.addends)


def test_the_steps_demo_runs_the_loop_and_reports(tmp_path):
    out = tmp_path / "demo"
    report = main(
        ["--output", str(out), "--suite", "steps", "--rounds", "1", "--round-prompts", "24",
         "--prompts-per-task", "300", "--label-prompts", "12", "--rollouts", "2", "--rm-samples", "4",
         "--sft-epochs", "2", "--sft-learning-rate", "1e-2", "--prm-epochs", "1", "--rm-epochs", "1",
         "--raft-epochs", "1", "--n", "4", "--serve-best-of", "4", "--hidden", "32", "--layers", "1"]
    )  # fmt: skip
    on_disk = json.loads((out / "demo.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    sft = on_disk["sft"]
    for key in ("pass_at_1", "oracle", "prm_min", "prm_last", "prm_min_vote"):
        assert 0.0 <= sft[key] <= sft["oracle"] if key != "oracle" else 0.0 <= sft[key] <= 1.0
    assert [b["best_of"] for b in on_disk["beam_search"]] == [4, 2]
    assert len(on_disk["raft_rounds"]) == 1 and on_disk["raft_rounds"][0]["kl_to_sft"] >= -0.05
    budget = on_disk["policy_samples_each_reward_model"]
    assert budget["orm"] >= budget["prm"] > budget["orm"] - 4  # as many policy samples each
    assert (out / "prm" / "bon_reward.json").is_file() and (out / "steps.jsonl").is_file()
    assert 0.0 <= sft["prm_step"]["step_accuracy"] <= 1.0 and sft["prm_step"]["steps"] > 0
