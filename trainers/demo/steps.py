"""`bon demo --suite steps`: process reward models and step-level search on a multi-step task
(trainers/demo/chains.py), measured on held-out prompts.

SFT a tiny policy on chains of additions with slips -> label the steps of its answers by rollouts
(`bon label-steps`) -> train a PRM on them (`bon train prm`) and an outcome RM on as many policy
samples -> best-of-N by each, weighted vote, and beam search through the server -> RAFT rounds
on PRM-chosen samples through the server, with pass@1 and KL to SFT (`bon eval`) each round.

Writes DIR/demo.json and prints a table; the checkpoints (sft, prm, reward_model, raft-1, ...),
the step labels (steps.jsonl) and the held-out prompts (held_out.jsonl) are beside it.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from server.engines.contract import SamplingParams
from server.engines.hf.models import load_policy
from server.engines.hf.process import load_process_weights
from server.prompts import make_prompt, reward_input
from server.reward import read_reward_model
from server.rules import extract_answer
from server.selection import rank_by_reward, vote_groups
from trainers import label_steps
from trainers.arguments import DemoConfig, TrainArgs
from trainers.data import RecipeError, SFTExample, load_steps
from trainers.demo import chains
from trainers.demo.chains import DELIMITER, Chain, demonstration, is_correct, step_labels
from trainers.demo.pipeline import Server, begin, free_port, ranked_groups, rewards, train_sft
from trainers.evaluation import run as evaluation
from trainers.prm import reward_file, train_prm
from trainers.raft import Selection, raft_from_log, sample_candidates
from trainers.reward import train_reward_model

CONTEXT = 128  # a prompt of up to 21 tokens and an answer of up to 48
MAX_TOKENS = 48  # four steps of "ab + c = de" and their delimiters are 40 tokens
BEAM_STEPS = 4  # chains have three or four steps: the fourth round runs to the end


def draw(policy_dir: Path, items: list[Chain], k: int, seed: int) -> list[list[tuple[str, int]]]:
    """k answers per item at temperature 1 with the server's decoding code: (text, tokens)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, seed=seed)
    drawn = sample_candidates(
        load_policy(policy_dir, "cpu", "auto"), [i.prompt for i in items], k, params, 32
    )
    return [[(c.text, len(c.token_ids)) for c in cands] for _, cands in drawn]


def texts_of(drawn: list[list[tuple[str, int]]]) -> list[list[str]]:
    return [[text for text, _ in answers] for answers in drawn]


def prm_steps(prm_dir: Path, items: list[Chain], texts: list[list[str]]) -> list[list[list[float]]]:
    """The PRM's step scores of every answer, as the server reads them."""
    info = read_reward_model(prm_dir)
    model = load_process_weights(info, "cpu", "auto")
    out = []
    for item, answers in zip(items, texts, strict=True):
        prompt = make_prompt(info.tokenizer, item.prompt)
        out.append(model.score_steps([reward_input(info, prompt, t).token_ids for t in answers]))
    return out


def checked(item: Chain, text: str) -> float:
    """The outcome RM's ranking grade: 1 for an answer the checker accepts, else 0."""
    return float(is_correct(item, text))


def best(values: list[float]) -> int:
    return rank_by_reward(values)[0]


def vote(values: list[float], texts: list[str]) -> int:
    """Weighted vote: the best answer of the group (by final number) with the largest summed reward."""
    order = rank_by_reward(values)
    groups = vote_groups(values, [extract_answer(t) for t in texts], order, "reward")
    return groups[0].members[0] if groups else order[0]


def step_accuracy(items: list[Chain], texts: list[list[str]], scores: list[list[list[float]]]) -> dict:
    """The PRM's step scores against the task's own step labels (right so far or not)."""
    right = total = good = 0
    for item, answers, answer_scores in zip(items, texts, scores, strict=True):
        for text, steps in zip(answers, answer_scores, strict=True):
            labels = step_labels(item, text)
            for label, score in zip(labels[-len(steps) :], steps, strict=True):
                right += (score > 0.5) == (label == 1.0)
                good += label == 1.0
                total += 1
    return {"step_accuracy": right / total, "steps": total, "good_share": good / total}


def best_of_n(sft: Path, orm: Path | None, prm: Path, items: list[Chain], n: int) -> dict:
    """Best-of-n on held-out prompts chosen by the checker, the outcome RM, and the PRM."""
    drawn = draw(sft, items, n, seed=10_000)
    texts = texts_of(drawn)
    correct = [[is_correct(i, t) for t in answers] for i, answers in zip(items, texts, strict=True)]
    steps = prm_steps(prm, items, texts)
    by_rule = {
        "prm_min": [[min(s) for s in answers] for answers in steps],
        "prm_last": [[s[-1] for s in answers] for answers in steps],
    }
    if orm is not None:
        by_rule["orm"] = rewards(orm, items, texts)  # type: ignore[arg-type]  # reads only .prompt

    def picked(choose) -> float:
        return statistics.fmean(c[choose(i)] for i, c in enumerate(correct))

    report = {
        "pass_at_1": statistics.fmean(statistics.fmean(c) for c in correct),
        "oracle": statistics.fmean(any(c) for c in correct),
        **{name: picked(lambda i, v=values: best(v[i])) for name, values in by_rule.items()},
        "prm_min_vote": picked(lambda i: vote(by_rule["prm_min"][i], texts[i])),
        "tokens_per_prompt": statistics.fmean(sum(t for _, t in answers) for answers in drawn),
    }
    report["prm_step"] = step_accuracy(items, [a[:4] for a in texts], [s[:4] for s in steps])
    return report


def beam_search(server: Server, items: list[Chain], best_of: int, width: int) -> dict:
    """Beam search through the server's API: its answer's pass rate and the tokens it spent."""
    search = {"type": "beam", "beam_width": width, "max_steps": BEAM_STEPS}
    responses = server.send(
        [i.prompt for i in items],
        MAX_TOKENS,
        seed=20_000,
        extra={"best_of": best_of, "search": search, "log": False},
    )
    return {
        "best_of": best_of,
        "beam_width": width,
        "pass": statistics.fmean(
            is_correct(i, r.choices[0].text) for i, r in zip(items, responses, strict=True)
        ),
        "tokens_per_prompt": statistics.fmean(r.usage.completion_tokens for r in responses),
    }


def kl_to_sft(out: Path, policy: Path, round_number: int) -> float:
    """KL(policy || SFT) on the held-out prompts, from `bon eval`."""
    directory = out / f"eval-{round_number}"
    evaluation.main(
        ["--output", str(directory), "--policy", str(policy), "--reference", str(out / "sft"),
         "--reward-model", str(out / "prm"), "--prompts", str(out / "held_out.jsonl"),
         "-k", "4", "--max-tokens", str(MAX_TOKENS)]
    )  # fmt: skip
    report = json.loads((directory / "eval.json").read_text())
    return report["policies"][policy.name]["kl_to_reference"]["mean"]


def run(cfg: DemoConfig) -> dict:
    out = cfg.output
    start, rng, say = begin(cfg)

    train, held_out = chains.suite(cfg.seed, cfg.prompts_per_task)
    demonstrations = [SFTExample(c.prompt, demonstration(c, cfg.mistake_rate, rng)) for c in train]
    corpus = [c.prompt + demonstration(c, 0.0, random.Random(0)) for c in train]
    rows = [{"prompt": c.prompt, "reference": c.reference} for c in held_out]
    # A vocabulary with merges ("Ġadd", "Ġ+", "ĊĊ"; digits stay single): the longest answer is 40 tokens.
    train_sft(
        cfg, out, demonstrations, corpus, rows, say, context=CONTEXT, max_length=CONTEXT, vocabulary=300
    )

    say(f"step labels: {cfg.rollouts} rollouts off each step of 2 answers to {cfg.label_prompts} prompts")
    labelled = rng.sample(train, cfg.label_prompts)
    (out / "label_prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": c.prompt, "reference": c.reference}) + "\n" for c in labelled)
    )
    labels = label_steps.main(
        ["--policy", str(out / "sft"), "--prompts", str(out / "label_prompts.jsonl"),
         "--checker", "server.rules:exact_match", "--rollouts", str(cfg.rollouts), "--answers", "2",
         "--max-tokens", str(MAX_TOKENS), "--seed", str(cfg.seed), "--batch-size", "256",
         "--labels", "hard", "-o", str(out / "steps.jsonl")]
    )  # fmt: skip
    # Hard labels: soft ones (the share of rollouts that end right) sit near the policy's own
    # success rate on a right prefix, and the PRM trained on them stayed at the majority class
    # (held-out step accuracy 0.538, DEVELOPERS.md).
    prm_args = TrainArgs(
        epochs=cfg.prm_epochs, learning_rate=cfg.prm_learning_rate, batch_size=32,
        max_length=CONTEXT, seed=cfg.seed, warmup_ratio=0.05,
    )  # fmt: skip
    say("process reward model (Math-Shepherd layout, from the SFT policy)")
    train_prm(
        out / "sft", load_steps(out / "steps.jsonl", DELIMITER), prm_args, out / "prm", DELIMITER,
        reward_file("ки", "+", "-"), eval_fraction=0.05,
    )  # fmt: skip

    budget = labels["answers"] + labels["rollouts"]  # policy samples the PRM's labels cost
    orm_items = rng.sample(train, min(len(train), math.ceil(budget / cfg.rm_samples)))
    say(f"outcome reward model on as many samples: {cfg.rm_samples} answers to {len(orm_items)} prompts")
    groups = ranked_groups(orm_items, texts_of(draw(out / "sft", orm_items, cfg.rm_samples, 1)), checked)
    held_groups = ranked_groups(held_out, texts_of(draw(out / "sft", held_out, cfg.rm_samples, 2)), checked)
    rm_args = TrainArgs(
        epochs=cfg.rm_epochs, learning_rate=cfg.rm_learning_rate, batch_size=8, max_length=CONTEXT,
        seed=cfg.seed, warmup_ratio=0.05,
    )  # fmt: skip
    try:
        history = train_reward_model(
            out / "sft", groups, rm_args, out / "reward_model", eval_groups=held_groups, shrink=cfg.rm_shrink
        )
        orm: Path | None = out / "reward_model"
    except RecipeError as error:  # a policy that is never (or always) right gives no pair to learn
        say(f"no outcome reward model: {error}")
        history, orm = [{}], None

    say(f"best-of-{cfg.n} on {len(held_out)} held-out prompts")
    first = best_of_n(out / "sft", orm, out / "prm", held_out, cfg.n)
    server = Server(out / "sft", out / "prm", out, free_port(), max(cfg.n, cfg.serve_best_of))
    rounds = []
    try:
        say("beam search through the server")
        beams = [beam_search(server, held_out, cfg.n, 4), beam_search(server, held_out, cfg.n // 2, 2)]
        policy = out / "sft"
        for round_number in range(1, cfg.rounds + 1):
            items = rng.sample(train, cfg.round_prompts)
            say(f"round {round_number}: {len(items)} prompts through the server, PRM-chosen")
            server.send(
                [i.prompt for i in items], MAX_TOKENS, seed=round_number * 100_000,
                extra={"best_of": cfg.serve_best_of},
            )  # fmt: skip
            time.sleep(1.5)  # the log commits at least every second
            raft_args = TrainArgs(
                epochs=cfg.raft_epochs, learning_rate=cfg.raft_learning_rate, batch_size=32,
                max_length=CONTEXT, seed=cfg.seed + round_number, warmup_ratio=0.0,
            )  # fmt: skip
            target = out / f"raft-{round_number}"
            manifest = raft_from_log(policy, out / "samples.db", target, raft_args, Selection(top_k=1))
            server.reload(target)
            policy = target
            drawn = draw(policy, held_out, cfg.n, seed=10_000)
            passed = statistics.fmean(
                statistics.fmean(is_correct(i, t) for t, _ in answers)
                for i, answers in zip(held_out, drawn, strict=True)
            )
            kl = kl_to_sft(out, policy, round_number)
            say(f"round {round_number}: pass@1 {passed:.3f}, KL to SFT {kl:.3f}")
            rounds.append({"pass_at_1": passed, "kl_to_sft": kl, "samples_kept": manifest["samples_kept"]})
    finally:
        server.stop()

    report = {
        "suite": "steps",
        "n": cfg.n,
        "held_out_prompts": len(held_out),
        "sft": first,
        "beam_search": beams,
        "orm_accuracy": history[-1].get("eval_accuracy"),  # None: no outcome RM could be trained
        "label_steps": labels,
        "policy_samples_each_reward_model": {"prm": budget, "orm": len(orm_items) * cfg.rm_samples},
        "raft_rounds": rounds,
        "models": {
            "sft": str(out / "sft"),
            "prm": str(out / "prm"),
            "reward_model": str(out / "reward_model"),
        },
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "seconds": time.time() - start,
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


def share(gain: float, over: float) -> str:
    return f"{gain / over:.2f}" if over > 0 else "n/a"


def print_table(report: dict) -> None:
    sft, n = report["sft"], report["n"]
    base, oracle = sft["pass_at_1"], sft["oracle"]
    orm = (
        [(f"best-of-{n}, outcome RM", sft["orm"], share(sft["orm"] - base, oracle - base))]
        if "orm" in sft
        else []
    )
    rows = [
        ("policy pass@1 (SFT)", sft["pass_at_1"], ""),
        (f"best-of-{n}, oracle (checker)", oracle, ""),
        *orm,
        (f"best-of-{n}, PRM min", sft["prm_min"], share(sft["prm_min"] - base, oracle - base)),
        (f"best-of-{n}, PRM last", sft["prm_last"], share(sft["prm_last"] - base, oracle - base)),
        (
            f"weighted vote of {n}, PRM min",
            sft["prm_min_vote"],
            share(sft["prm_min_vote"] - base, oracle - base),
        ),
    ]
    for b in report["beam_search"]:
        spent = f"{b['tokens_per_prompt']:.0f} tokens vs {sft['tokens_per_prompt']:.0f}"
        rows.append(
            (
                f"beam {b['best_of']}/{b['beam_width']} ({spent})",
                b["pass"],
                share(b["pass"] - base, oracle - base),
            )
        )
    rows.append(("PRM held-out step accuracy", sft["prm_step"]["step_accuracy"], ""))
    rows += [
        (
            f"RAFT round {i} pass@1 (KL {r['kl_to_sft']:.3f})",
            r["pass_at_1"],
            share(r["pass_at_1"] - base, oracle - base),
        )
        for i, r in enumerate(report["raft_rounds"], 1)
    ]
    print(f"{'':44} {'':>6} share of the oracle's gain")
    for name, value, part in rows:
        print(f"{name:44} {value:6.3f} {part}")
    print(f"wrote {report['models']} and demo.json in {report['seconds']:.0f}s")
