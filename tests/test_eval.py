"""`bon eval`: the best-of-N estimator against brute force and closed forms, KL and win rates on
real tiny models, and the report a user gets from samples exported by a real server."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import API_KEYS

from trainers.evaluation.estimators import (
    distinct_n,
    expected_best_of_n,
    kl_bound_at_n,
    win_rate_at_n,
)

BON = [sys.executable, "-m", "bon"]


def bon_eval(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*BON, "eval", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("k", [1, 4, 7])
def test_best_of_n_equals_the_mean_over_every_subset(k):
    rng = random.Random(k)
    proxy = [rng.gauss(0, 1) for _ in range(k)]
    gold = [rng.random() for _ in range(k)]
    for n in range(1, k + 1):
        subsets = list(itertools.combinations(range(k), n))
        best = [max(s, key=proxy.__getitem__) for s in subsets]
        assert expected_best_of_n(proxy, n) == pytest.approx(sum(proxy[i] for i in best) / len(subsets))
        assert expected_best_of_n(proxy, n, gold) == pytest.approx(sum(gold[i] for i in best) / len(subsets))


def test_win_rate_at_n_equals_brute_force_with_ties():
    proxy, reference = [0.0, 1.0, 1.0, 2.0, 3.0], [1.0, 2.0, -1.0]
    for n in range(1, 6):
        wins = []
        for subset in itertools.combinations(proxy, n):
            best = max(subset)
            wins += [(best > r) + 0.5 * (best == r) for r in reference]
        assert win_rate_at_n(proxy, reference, n) == pytest.approx(sum(wins) / len(wins))


def test_expected_maxima_match_closed_forms():
    """Uniform(0, 1): E[max of N] = N / (N + 1). Standard normal: E[max of 2] = 1/sqrt(pi),
    E[max of 4] = 1.0294 (tables)."""
    rng = np.random.default_rng(0)
    uniform = rng.random((3000, 32))
    for n in (1, 2, 4, 8, 16, 32):
        estimate = np.mean([expected_best_of_n(row, n) for row in uniform])
        assert estimate == pytest.approx(n / (n + 1), abs=0.01)
    normal = rng.standard_normal((3000, 16))
    assert np.mean([expected_best_of_n(row, 2) for row in normal]) == pytest.approx(
        1 / math.sqrt(math.pi), abs=0.02
    )
    assert np.mean([expected_best_of_n(row, 4) for row in normal]) == pytest.approx(1.0294, abs=0.02)


def test_best_of_n_against_an_independent_sample_of_the_same_policy_wins_n_over_n_plus_1():
    rng = np.random.default_rng(1)
    pools, references = rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16))
    for n in (1, 2, 4, 8, 16):
        rate = np.mean([win_rate_at_n(p, r, n) for p, r in zip(pools, references, strict=True)])
        assert rate == pytest.approx(n / (n + 1), abs=0.015)


def test_kl_bound_and_distinct_n():
    assert kl_bound_at_n(1) == 0.0
    assert kl_bound_at_n(2) == pytest.approx(math.log(2) - 0.5)
    # "a b a b": unigrams a, b, a, b (2 distinct of 4); bigrams ab, ba, ab (2 of 3).
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "c"], 2) == 1.0 and distinct_n(["a"], 2) == 0.0


def test_eval_from_synthetic_samples_reproduces_the_known_maxima(tmp_path):
    rng = np.random.default_rng(2)
    rows = [
        {"prompt": f"p{p}", "completion": f"c{p} {i}", "reward": float(rng.random()), "gold": 1.0}
        for p in range(1500)
        for i in range(16)
    ]
    source = tmp_path / "samples.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = bon_eval("--samples", source, "--output", tmp_path / "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    [policy] = report["policies"].values()
    assert policy["prompts"] == 1500 and list(policy["reward_at_n"]) == ["1", "2", "4", "8", "16"]
    for n, cell in policy["reward_at_n"].items():
        assert cell["low"] <= cell["mean"] <= cell["high"]
        assert cell["mean"] == pytest.approx(int(n) / (int(n) + 1), abs=0.01)
        assert cell["low"] < int(n) / (int(n) + 1) + 0.01 and cell["high"] > int(n) / (int(n) + 1) - 0.01
    for name in ("report.md", "reward_vs_n.png", "reward_vs_kl.png", "diversity.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_eval_reads_what_export_samples_writes_and_names_bad_rows(server, tmp_path):
    import httpx

    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    for prompt in ("eval a", "eval b"):
        body = {"model": "gpt2_policy", "prompt": prompt, "best_of": 4, "max_tokens": 4}
        httpx.post(f"{server.url}/v1/completions", headers=headers, json=body).raise_for_status()
    time.sleep(1.0)
    exported = tmp_path / "samples.jsonl"
    subprocess.run([*BON, "export-samples", "--sample-log", server.sample_log, "-o", exported], check=True)
    result = bon_eval("--samples", exported, "--output", tmp_path / "report")
    assert result.returncode == 0, result.stderr[-3000:]
    [policy] = json.loads((tmp_path / "report" / "eval.json").read_text())["policies"].values()
    assert policy["prompts"] >= 2 and "1" in policy["reward_at_n"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y", "reward": 1}\n{"prompt": "x", "completion": "z"}\n')
    result = bon_eval("--samples", bad, "--output", tmp_path / "bad")
    assert result.returncode == 2 and f"{bad}:2" in result.stderr and "reward" in result.stderr
    assert "Traceback" not in result.stderr


def test_kl_and_win_rates_from_models(models, tmp_path):
    """A tiny policy and a sharpened copy of it (random tiny models are near uniform and barely
    differ): KL of the reference to itself is exactly 0 and its win rate about 1/2; the sharpened
    policy's KL is large, and each completion's log-probability is what a plain forward of that
    one sequence gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engines.hf.models import load_policy
    from trainers.evaluation.run import sequence_logprobs

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}:"}) + "\n" for i in range(6)))
    reference, other = models["llama_policy"], tmp_path / "sharp_policy"
    sharp = AutoModelForCausalLM.from_pretrained(reference)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(40.0)  # (V, H): logits 40x, a far more peaked distribution
    sharp.save_pretrained(other)
    AutoTokenizer.from_pretrained(reference).save_pretrained(other)
    flags = ["--reward-model", models["llama_rm"], "--prompts", prompts, "-k", 4, "--max-tokens", 5]
    result = bon_eval("--reference", reference, "--policy", other, *flags, "--output", tmp_path / "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "eval.json").read_text())["policies"]
    own, theirs = report["llama_policy (reference)"], report["sharp_policy"]
    assert own["kl_to_reference"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert own["win_rate_vs_reference"]["mean"] == pytest.approx(0.5, abs=0.2)
    assert theirs["kl_to_reference"]["mean"] > 1.0
    assert list(theirs["reward_at_n"]) == ["1", "2", "4"] and "win_rate_at_n_vs_reference" in theirs

    policy = load_policy(other, "cpu", "float32")
    plain = AutoModelForCausalLM.from_pretrained(other).eval()
    sequences = [([5, 9, 12], [7, 3]), ([4], [8, 8, 8, 2]), ([1, 2, 3, 4, 5], [6])]
    for (prompt, completion), got in zip(sequences, sequence_logprobs(policy, sequences), strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(plain(torch.tensor([prompt + completion])).logits[0].float(), -1)
        expected = sum(logp[len(prompt) - 1 + j, token].item() for j, token in enumerate(completion))
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_eval_refuses_half_given_modes(tmp_path):
    result = bon_eval("--output", tmp_path / "x")
    assert result.returncode == 2 and "--samples" in result.stderr and "Traceback" not in result.stderr


def test_eval_keeps_versions_whole_leaves_pruned_out_and_names_short_prompts(tmp_path):
    """Two RAFT checkpoints in same-named directories whose versions share 20 characters stay two
    entries; pruned (partial) candidates are no samples; one prompt with one sample no longer
    pulls every prompt down to N = 1."""
    rng = np.random.default_rng(3)
    rows = []
    for version in ("raft-20261206T050000-aaaaaa", "raft-20261206T050000-bbbbbb"):
        policy = {"path": "/runs/a/published", "version": version}
        for p in range(8):
            rows += [
                {"prompt": f"p{p}", "completion": f"c{i}", "reward": float(rng.random()), "policy": policy}
                for i in range(8)
            ]
            rows.append(
                {"prompt": f"p{p}", "completion": "cut", "reward": 9.0, "policy": policy, "pruned": True}
            )
        rows.append({"prompt": "lonely", "completion": "c", "reward": 0.1, "policy": policy})
    source = tmp_path / "samples.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = bon_eval("--samples", source, "--output", tmp_path / "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert sorted(report["policies"]) == [
        "published@raft-20261206T050000-aaaaaa",
        "published@raft-20261206T050000-bbbbbb",
    ]
    for policy in report["policies"].values():
        assert policy["samples_per_prompt"] == 8 and policy["prompts"] == 8
        assert list(policy["reward_at_n"]) == ["1", "2", "4", "8"]
        assert policy["left_out"]["prompts"] == 1 and policy["left_out"]["examples"] == ["lonely"]
        assert policy["reward_at_n"]["8"]["mean"] < 1.0  # the pruned 9.0s are not samples
    assert "1 prompt(s) left out with fewer than 8 samples" in result.stderr
    assert "left out 16 candidates that early rejection pruned" in result.stderr


def test_selection_rules_compared_offline_match_their_formulas_on_the_whole_pool(tmp_path):
    """At N = K each rule's choice is one computation: max by reward, each member by its own, soft
    as the softmax-weighted gold, vote as the best of the heaviest answer group."""
    rng = random.Random(3)
    rows, expected = [], {"max": [], "a alone": [], "soft (temperature 0.5)": [], "vote (count)": []}
    for p in range(12):
        answers = [rng.choice("1234") for _ in range(8)]
        rewards = [rng.gauss(0, 1) for _ in range(8)]
        a = [rng.gauss(0, 1) for _ in range(8)]
        gold = [float(x == "2") for x in answers]
        rows += [
            {
                "prompt": f"p{p}",
                "completion": f"so it is {x}",
                "reward": r,
                "gold": g,
                "rewards": {"a": m, "b": r},
            }
            for x, r, m, g in zip(answers, rewards, a, gold, strict=True)
        ]
        expected["max"].append(gold[max(range(8), key=lambda i: rewards[i])])
        expected["a alone"].append(gold[max(range(8), key=lambda i: a[i])])
        weights = [math.exp((r - max(rewards)) / 0.5) for r in rewards]
        expected["soft (temperature 0.5)"].append(
            sum(w * g for w, g in zip(weights, gold, strict=True)) / sum(weights)
        )
        counts = {x: answers.count(x) for x in answers}
        top = max(counts.values())
        # Ties between groups go to the one holding the better candidate; within it, the best.
        best = max((i for i in range(8) if counts[answers[i]] == top), key=lambda i: rewards[i])
        expected["vote (count)"].append(gold[best])
    source = tmp_path / "pool.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = bon_eval("--samples", source, "--output", tmp_path / "report", "--soft-temperatures", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    [policy] = json.loads((tmp_path / "report" / "eval.json").read_text())["policies"].values()
    assert policy["rules_measured_by"] == "gold"
    rules = policy["rules_at_n"]
    assert set(rules) == {
        "max",
        "a alone",
        "b alone",
        "soft (temperature 0.5)",
        "vote (summed reward)",
        "vote (count)",
    }
    for rule, per_prompt in expected.items():
        assert rules[rule]["8"]["mean"] == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-9), rule
    assert rules["b alone"] == rules["max"]  # b is the combined reward here
    assert (tmp_path / "report" / "rules_vs_n.png").stat().st_size > 0
    bad = bon_eval("--samples", source, "--output", tmp_path / "r2", "--answer-pattern", "(a)(b)")
    assert bad.returncode == 2 and "exactly one group" in bad.stderr
