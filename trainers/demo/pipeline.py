"""`bon demo`: the lecture's pipeline from scratch on CPU, measured on held-out prompts.

train a tokenizer -> SFT a tiny policy -> sample K per prompt -> rank by the gold scorer -> train
the Bradley-Terry RM (initialised from the SFT policy) -> serve best-of-N -> send training-split
prompts through the HTTP API -> RAFT on the candidate log -> reload -> repeat.

    bon demo --output DIR [--rounds 3] [--seed 0]

Prints a table and writes DIR/demo.json, with the checkpoints (sft, reward_model, raft-1, ...)
and the held-out prompts (held_out.jsonl) beside it. Every figure is measured on held-out
prompts, which never reach a trainer.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import httpx
import torch

from bon.tiny_models import build_model, train_tokenizer
from server.engines.contract import SamplingParams
from server.engines.hf.models import load_policy, load_reward_model
from server.prompts import make_prompt, reward_input
from server.seeds import prompt_seed
from trainers.arguments import DemoConfig, TrainArgs, demo_parser
from trainers.data import PreferenceGroup, SFTExample
from trainers.demo.tasks import (
    Item,
    demonstration,
    distinct_2,
    first_line,
    gold_score,
    is_correct,
    suite,
)
from trainers.raft import Selection, raft_from_log, sample_candidates
from trainers.reward import train_reward_model
from trainers.sft import finetune

ADMIN_KEY = "demo-admin-key"


def sample(policy_dir: Path, items: list[Item], k: int, cfg: DemoConfig, seed: int) -> list[list[str]]:
    """k candidates per item at temperature 1, with the server's decoding code."""
    params = SamplingParams(max_tokens=cfg.max_new_tokens, seed=seed)
    pairs = sample_candidates(
        load_policy(policy_dir, "cpu", "auto"), [i.prompt for i in items], k, params, 64
    )
    return [[c.text for c in cands] for _, cands in pairs]


def ranked_groups(items: list, samples: list[list[str]], grade=gold_score) -> list[PreferenceGroup]:
    """Rankings by `grade(item, text)` (the suite's gold scorer): higher, better rank; equal
    grades are ties."""
    return [
        PreferenceGroup(i.prompt, texts, [-grade(i, t) for t in texts])
        for i, texts in zip(items, samples, strict=True)
    ]


def rewards(rm_dir: Path, items: list[Item], samples: list[list[str]]) -> list[list[float]]:
    rm = load_reward_model(rm_dir, "cpu", "auto")
    prompts = {i.prompt: make_prompt(rm.tokenizer, i.prompt) for i in items}  # text prompts: same text
    return [
        rm.score([reward_input(rm.info, prompts[i.prompt], t).token_ids for t in texts])
        for i, texts in zip(items, samples, strict=True)
    ]


def pairwise_accuracy(groups: list[PreferenceGroup], scores: list[list[float]]) -> float:
    right = total = 0
    for group, r in zip(groups, scores, strict=True):
        for w, lo in group.pairs():
            right += r[w] > r[lo]
            total += 1
    return right / max(total, 1)


def evaluate(policy_dir: Path, rm_dir: Path, items: list[Item], cfg: DemoConfig) -> dict:
    """pass@1 (expected, over N samples), best-of-N by the RM and by the gold scorer, diversity."""
    samples = sample(policy_dir, items, cfg.n, cfg, seed=10_000)
    scores = rewards(rm_dir, items, samples)
    correct = [[is_correct(i, t) for t in texts] for i, texts in zip(items, samples, strict=True)]
    answers = [[first_line(t) for t in texts] for texts in samples]
    return {
        "pass_at_1": statistics.fmean(statistics.fmean(c) for c in correct),
        "bon_pass": statistics.fmean(
            c[max(range(len(r)), key=r.__getitem__)] for c, r in zip(correct, scores, strict=True)
        ),
        "oracle_bon_pass": statistics.fmean(any(c) for c in correct),
        "mean_gold": statistics.fmean(
            gold_score(i, t) for i, texts in zip(items, samples, strict=True) for t in texts
        ),
        "distinct_2": distinct_2([a for group in answers for a in group]),
        "distinct_2_per_input": statistics.fmean(distinct_2(group) for group in answers),
        "by_task": {
            task: statistics.fmean(
                statistics.fmean(c) for i, c in zip(items, correct, strict=True) if i.task == task
            )
            for task in sorted({i.task for i in items})
        },
    }


class Server:
    """`bon serve` as a subprocess, as a user runs it."""

    def __init__(
        self, policy: Path, rm: Path, workdir: Path, port: int, best_of: int, extra: tuple[str, ...] = ()
    ):
        self.url = f"http://127.0.0.1:{port}"
        self.log = (workdir / "server.log").open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bon",
                "serve",
                "--policy",
                str(policy),
                "--reward-model",
                str(rm),
                "--port",
                str(port),
                "--sample-log",
                str(workdir / "samples.db"),
                "--admin-key",
                ADMIN_KEY,
                "--max-best-of",
                str(best_of),
                "--served-model-name",
                "demo",
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bon serve exited; see {workdir / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("bon serve did not become ready")

    def send(self, prompts: list[str], max_tokens: int, seed: int, extra: dict) -> list:
        """Prompts through the real API, 16 clients at a time (the server logs everything); the
        responses, in order. `extra` holds bon's fields (best_of, search)."""
        from openai import AsyncOpenAI

        async def run():
            async with AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=2) as client:
                return await asyncio.gather(*(one(client, i, prompt) for i, prompt in enumerate(prompts)))

        limit = asyncio.Semaphore(16)

        async def one(client, index: int, prompt: str):
            async with limit:
                return await client.completions.create(
                    model="demo",
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=1.0,
                    seed=prompt_seed(seed, index),
                    extra_body=extra,
                )

        return asyncio.run(run())

    def reload(self, policy: Path) -> dict:
        response = httpx.post(
            f"{self.url}/admin/reload",
            json={"policy": str(policy)},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=120,
        )
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_sft(
    cfg: DemoConfig,
    out: Path,
    demonstrations: list[SFTExample],
    corpus: list[str],
    held_out: list[dict],
    say,
    context: int = 64,
    max_length: int = 32,
    vocabulary: int = 160,
) -> None:
    """The SFT policy at out/sft, trained on `demonstrations` from a tokenizer (trained on
    `corpus`) and a random model made here; held_out.jsonl lists the held-out rows (`bon eval
    --prompts` reads it, README, Batch jobs and evaluation)."""
    (out / "held_out.jsonl").write_text("".join(json.dumps(row) + "\n" for row in held_out))
    say(f"tokenizer and a random {cfg.arch} ({len(demonstrations)} demonstrations, {len(held_out)} held out)")
    tokenizer = train_tokenizer(
        vocabulary,
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
        corpus=corpus,
        individual_digits=True,
    )
    base = build_model(
        out / "base", cfg.arch, tokenizer, hidden=cfg.hidden, layers=cfg.layers, ctx=context, seed=cfg.seed
    )
    say("SFT")
    sft_args = TrainArgs(
        epochs=cfg.sft_epochs,
        learning_rate=cfg.sft_learning_rate,
        batch_size=64,
        max_length=max_length,
        seed=cfg.seed,
        warmup_ratio=0.05,
    )
    finetune(base, demonstrations, sft_args, out / "sft", "sft")


def sft_policy(cfg: DemoConfig, out: Path, rng: random.Random, say) -> tuple[list[Item], list[Item]]:
    """The character suite's splits, and its SFT policy at out/sft."""
    train, held_out = suite(cfg.seed, cfg.prompts_per_task)
    demonstrations = [SFTExample(i.prompt, " " + demonstration(i, cfg.mistake_rate, rng)) for i in train]
    corpus = [f"{i.prompt} {i.answer}" for i in train]
    train_sft(cfg, out, demonstrations, corpus, [{"prompt": i.prompt} for i in held_out], say)
    return train, held_out


def begin(cfg: DemoConfig) -> tuple[float, random.Random, Callable[[str], None]]:
    """A demo run's start: its empty output directory made, seeds set; its start time, its
    random source, and what prints a progress line stamped with the seconds since."""
    start = time.time()
    out = cfg.output
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--output {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    def say(message: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {message}", flush=True)

    return start, random.Random(cfg.seed), say


def run(cfg: DemoConfig) -> dict:
    out = cfg.output
    start, rng, say = begin(cfg)
    train, held_out = sft_policy(cfg, out, rng, say)

    say(f"sampling {cfg.rm_samples} per prompt, ranking by the gold scorer")
    rm_items = rng.sample(train, cfg.rm_prompts)
    rm_groups = ranked_groups(rm_items, sample(out / "sft", rm_items, cfg.rm_samples, cfg, seed=1))
    held_groups = ranked_groups(held_out, sample(out / "sft", held_out, cfg.rm_samples, cfg, seed=2))

    say(f"reward model (Bradley-Terry, initialised from SFT, shrink {cfg.rm_shrink})")
    rm_args = TrainArgs(
        epochs=cfg.rm_epochs,
        learning_rate=cfg.rm_learning_rate,
        batch_size=8,
        max_length=32,
        seed=cfg.seed,
        warmup_ratio=0.05,
    )
    train_reward_model(
        out / "sft", rm_groups, rm_args, out / "reward_model", eval_groups=held_groups, shrink=cfg.rm_shrink
    )
    rm_accuracy = pairwise_accuracy(
        held_groups, rewards(out / "reward_model", held_out, [g.responses for g in held_groups])
    )

    say("evaluating the SFT policy on held-out prompts")
    first = evaluate(out / "sft", out / "reward_model", held_out, cfg)
    rounds, policy = [], out / "sft"
    server = Server(policy, out / "reward_model", out, free_port(), cfg.serve_best_of)
    try:
        for round_number in range(1, cfg.rounds + 1):
            items = rng.sample(train, cfg.round_prompts)
            say(
                f"round {round_number}: {len(items)} prompts through the server (best_of {cfg.serve_best_of})"
            )
            server.send(
                [i.prompt for i in items],
                cfg.max_new_tokens,
                seed=round_number * 100_000,
                extra={"best_of": cfg.serve_best_of},
            )
            time.sleep(1.5)  # the log commits at least every second
            raft_args = TrainArgs(
                epochs=cfg.raft_epochs,
                learning_rate=cfg.raft_learning_rate,
                batch_size=32,
                max_length=32,
                seed=cfg.seed + round_number,
                warmup_ratio=0.0,
            )
            target = out / f"raft-{round_number}"
            manifest = raft_from_log(policy, out / "samples.db", target, raft_args, Selection(top_k=1))
            server.reload(target)
            policy = target
            result = evaluate(policy, out / "reward_model", held_out, cfg)
            say(f"round {round_number}: pass@1 {result['pass_at_1']:.3f}")
            rounds.append(
                {k: result[k] for k in ("pass_at_1", "mean_gold", "distinct_2", "distinct_2_per_input")}
                | {"by_task": result["by_task"], "samples_kept": manifest["samples_kept"]}
            )
    finally:
        server.stop()

    report = {
        "n": cfg.n,
        "policy_pass_at_1": first["pass_at_1"],
        "bon_pass": first["bon_pass"],
        "oracle_bon_pass": first["oracle_bon_pass"],
        "rm_accuracy": rm_accuracy,
        "sft": {k: first[k] for k in ("mean_gold", "distinct_2", "distinct_2_per_input", "by_task")},
        "raft_rounds": rounds,
        "models": {"sft": str(out / "sft"), "reward_model": str(out / "reward_model"), "policy": str(policy)},
        "held_out_prompts": len(held_out),
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "seconds": time.time() - start,
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


def print_table(report: dict) -> None:
    gain = report["oracle_bon_pass"] - report["policy_pass_at_1"]
    rows = [
        ("policy pass@1 (SFT)", report["policy_pass_at_1"]),
        (f"best-of-{report['n']}, learned RM", report["bon_pass"]),
        (f"best-of-{report['n']}, oracle", report["oracle_bon_pass"]),
        ("RM held-out pairwise accuracy", report["rm_accuracy"]),
    ]
    rows += [(f"RAFT round {i} pass@1", r["pass_at_1"]) for i, r in enumerate(report["raft_rounds"], 1)]
    for name, value in rows:
        print(f"{name:34} {value:.3f}")
    if gain > 0:
        share = (report["bon_pass"] - report["policy_pass_at_1"]) / gain
        print(f"{'RM share of the oracle gain':34} {share:.2f}")
        if report["raft_rounds"]:
            closed = (report["raft_rounds"][-1]["pass_at_1"] - report["policy_pass_at_1"]) / gain
            print(f"{'gap closed by RAFT':34} {closed:.2f}")
    print(f"wrote {report['models']} and demo.json in {report['seconds']:.0f}s")


def main(argv: list[str] | None = None) -> dict:
    cfg = DemoConfig(**vars(demo_parser().parse_args(argv)))
    if cfg.suite == "steps":
        from trainers.demo import steps

        return steps.run(cfg)
    return run(cfg)
