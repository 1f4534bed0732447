"""RAFT recipe: fine-tune the policy on its own best samples (reward-ranked fine-tuning).

From the server's candidate log (the closed loop: serve -> log -> RAFT -> reload):

    bon train raft --policy DIR --sample-log PATH --output DIR [--since T] [--top-k 1 | --top-fraction F]

reads the candidates logged in a window, groups them by prompt, keeps the top k per prompt
(local ranking) or the top fraction overall (global), after filters (minimum reward, minimum
candidates per prompt, duplicates removed), and fine-tunes with the SFT loss. When --policy is
itself a RAFT output, the window starts where its manifest's window ended.

Self-sampling (the paper's loop):

    bon train raft --policy DIR --prompts FILE --reward-model DIR --output DIR [--iterations I -k K]

samples K per prompt, scores with the RM, keeps the best, fine-tunes, and repeats I times.

Every run publishes a new checkpoint atomically at --output (which must not exist): the HF
directory plus raft_manifest.json (parent, window, counts, reward statistics of kept vs all,
hyperparameters) and the training curves.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from server.checkpoints import MANIFEST, checkpoint_dir, model_version, raft_manifest
from server.engines.contract import Candidate, SampleRequest, SamplingParams
from server.engines.hf.decoding import generate
from server.engines.hf.models import HFPolicy, load_policy, load_reward_model
from server.log.sources import Locations, listed, read_records, shown
from server.prompts import Prompt as ServedPrompt
from server.prompts import make_prompt, reward_input
from server.reward import read_reward_model
from server.seeds import prompt_seed
from trainers.arguments import TrainArgs, raft_parser, train_args
from trainers.data import Prompt, RecipeError, SFTExample, load_prompts
from trainers.engine import check_new_output, summary
from trainers.sft import finetune

log = logging.getLogger(__name__)


@dataclass
class Sample:
    prompt: Prompt
    completion: str
    reward: float


@dataclass
class Selection:
    top_k: int = 1  # local ranking: the best k of each prompt
    top_fraction: float | None = None  # global ranking instead: the best fraction of all samples
    min_reward: float | None = None
    min_candidates: int = 1  # prompts with fewer candidates are skipped (too little to rank)


def prompt_key(prompt: Prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def group_by_prompt(samples: list[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(prompt_key(sample.prompt), []).append(sample)
    return groups


def select(samples: list[Sample], rule: Selection) -> list[Sample]:
    """The samples to fine-tune on, best first within each prompt (local) or overall (global).

    Duplicates (same prompt and completion) count once, keeping the higher reward.
    """
    kept_groups = []
    for group in group_by_prompt(samples).values():
        if len(group) < rule.min_candidates:
            continue
        unique: dict[str, Sample] = {}
        for sample in sorted(group, key=lambda s: -s.reward):
            unique.setdefault(sample.completion, sample)
        kept_groups.append(list(unique.values()))
    if rule.top_fraction is not None:
        pool = sorted((s for g in kept_groups for s in g), key=lambda s: -s.reward)
        kept = pool[: math.ceil(rule.top_fraction * len(pool))]
    else:
        kept = [s for g in kept_groups for s in g[: rule.top_k]]
    if rule.min_reward is not None:
        kept = [s for s in kept if s.reward >= rule.min_reward]
    return kept


def reward_stats(samples: list[Sample]) -> dict[str, float]:
    rewards = [s.reward for s in samples]
    if not rewards:
        return {"count": 0}
    return {
        "count": len(rewards),
        "mean": statistics.fmean(rewards),
        "std": statistics.pstdev(rewards),
        "min": min(rewards),
        "max": max(rewards),
    }


def report(all_samples: list[Sample], kept: list[Sample], rule: Selection, source: str) -> None:
    """Say what was read and kept; warn when the best of a prompt is kept however bad it is.

    Rewards are Bradley-Terry logits with no absolute zero, so "bad" is measured against the rest:
    a kept sample below the median reward of everything read was its prompt's best only because
    nothing better was sampled for it.
    """
    prompts = len(group_by_prompt(all_samples))
    log.info(
        "%s: %d candidates of %d prompts; keeping %d samples of %d prompts",
        source, len(all_samples), prompts, len(kept), len(group_by_prompt(kept)),
    )  # fmt: skip
    if rule.min_reward is None and all_samples:
        median = statistics.median(s.reward for s in all_samples)
        weak = sum(s.reward < median for s in kept)
        if weak:
            log.warning(
                "%d of the %d kept samples score below the median reward of all candidates (%.3g): "
                "they were their prompt's best only because nothing better was sampled; set "
                "--min-reward to leave them out",
                weak, len(kept), median,
            )  # fmt: skip


def readable_window(since: float, until: float) -> str:
    """(since, until] in local time, to the second: "(start of the log, 2026-12-06 05:20:39]"."""

    def moment(seconds: float) -> str:
        if seconds <= 0:
            return "start of the log"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))

    return f"({moment(since)}, {moment(until)}]"


def parent_window_end(policy: Path) -> float:
    """Where the previous RAFT run's window ended, so periodic runs need no bookkeeping."""
    return float(raft_manifest(policy).get("window", {}).get("until", 0.0))


def samples_from_log(sample_log: Locations, since: float, until: float) -> list[Sample]:
    # Pruned candidates are partial texts: never a target to fine-tune on.
    records = read_records(sample_log, since, until, finished_only=True)
    return [Sample(r["prompt"], r["completion"], r["reward"]) for r in records]


@torch.inference_mode()
def sample_candidates(
    policy: HFPolicy, prompts: list[Prompt], k: int, params: SamplingParams, batch: int
) -> list[tuple[ServedPrompt, list[Candidate]]]:
    """K candidates per prompt with the server's decoding code, `batch` prompts per call.

    A seed per prompt (`prompt_seed` of its index): the same run replays, different prompts differ.
    """
    out = []
    for start in range(0, len(prompts), batch):
        chunk = [make_prompt(policy.tokenizer, p) for p in prompts[start : start + batch]]
        requests = [
            SampleRequest(
                p.token_ids,
                k,
                replace(params, seed=prompt_seed(params.seed, start + j)),
                weights=policy,
            )
            for j, p in enumerate(chunk)
        ]
        out += zip(chunk, generate(policy, requests), strict=True)
    return out


@torch.inference_mode()
def sample_and_score(
    policy_dir: Path,
    reward_model_dir: Path,
    prompts: list[Prompt],
    k: int,
    params: SamplingParams,
    batch: int,
) -> list[Sample]:
    """K candidates per prompt from the policy, each scored by the RM, with the server's own code."""
    policy = load_policy(policy_dir, "cuda" if torch.cuda.is_available() else "cpu", "auto")
    rm = load_reward_model(reward_model_dir, policy.model.device.type, "auto")
    samples = []
    for raw, (prompt, cands) in zip(
        prompts, sample_candidates(policy, prompts, k, params, batch), strict=True
    ):
        rewards = rm.score([reward_input(rm.info, prompt, c.text).token_ids for c in cands])
        samples += [Sample(raw, c.text, r) for c, r in zip(cands, rewards, strict=True)]
    return samples


def _manifest(parent: Path, args: TrainArgs, rule: Selection, all_samples, kept, **extra) -> dict:
    return {
        "version": f"raft-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}",
        "created": time.time(),
        "parent": {"path": str(parent), "version": model_version(parent)},
        "prompts": len(group_by_prompt(all_samples)),
        "prompts_kept": len(group_by_prompt(kept)),
        "samples_seen": len(all_samples),
        "samples_kept": len(kept),
        "reward": {"all": reward_stats(all_samples), "kept": reward_stats(kept)},
        "selection": asdict(rule),
        "hyperparameters": asdict(args),
        **extra,
    }


def raft_from_log(
    policy: Path,
    sample_log: Locations,
    output: Path,
    args: TrainArgs,
    rule: Selection,
    since: float | None = None,
) -> dict:
    """One RAFT step on the logged window; returns the manifest written beside the checkpoint."""
    check_new_output(output)
    window = (parent_window_end(policy) if since is None else since, time.time())
    return raft_on_window(
        policy, samples_from_log(sample_log, *window), sample_log, window, output, args, rule
    )


def raft_on_window(
    policy: Path,
    all_samples: list[Sample],
    sample_log: Locations,
    window: tuple[float, float],
    output: Path,
    args: TrainArgs,
    rule: Selection,
) -> dict:
    """Fine-tune `policy` on the best of `all_samples`, read from `sample_log` over `window`."""
    since, until = window
    kept = select(all_samples, rule)
    if not kept:
        raise RecipeError(
            f"nothing to train on: {len(all_samples)} logged candidates in the window after {since}"
        )
    report(all_samples, kept, rule, f"the log's window {readable_window(since, until)}")
    manifest = _manifest(
        policy,
        args,
        rule,
        all_samples,
        kept,
        mode="log",
        sample_log=[shown(location) for location in listed(sample_log)],
        window={"since": since, "until": until},
    )
    examples = [SFTExample(s.prompt, s.completion) for s in kept]
    finetune(policy, examples, args, output, "raft", extra_files=lambda: {MANIFEST: manifest})
    return manifest


def raft_self_sampling(
    policy: Path,
    prompts: list[Prompt],
    reward_model: Path,
    output: Path,
    args: TrainArgs,
    rule: Selection,
    iterations: int,
    k: int,
    params: SamplingParams,
) -> dict:
    """The RAFT paper's loop; intermediate policies live in a hidden sibling directory."""
    check_new_output(output)
    work = output.parent / f".{output.name}.iterations-{uuid.uuid4().hex[:6]}"
    current, rounds = policy, []
    try:
        for i in range(iterations):
            samples = sample_and_score(current, reward_model, prompts, k, params, batch=8)
            kept = select(samples, rule)
            report(samples, kept, rule, f"iteration {i + 1}")
            rounds.append({"iteration": i + 1, "all": reward_stats(samples), "kept": reward_stats(kept)})
            target = output if i == iterations - 1 else work / f"iteration-{i + 1}"
            manifest = _manifest(
                policy,
                args,
                rule,
                samples,
                kept,
                mode="self-sampling",
                reward_model=str(reward_model),
                iterations=rounds,
                samples_per_prompt=k,
            )
            examples = [SFTExample(s.prompt, s.completion) for s in kept]
            finetune(
                current,
                examples,
                args,
                target,
                f"raft iteration {i + 1}",
                extra_files=lambda m=manifest: {MANIFEST: m},
            )
            current = target
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = raft_parser()
    args = parser.parse_args(argv)
    checkpoint_dir(args.policy, "policy", "--policy", generates=True)
    check_new_output(args.output)
    rule = Selection(args.top_k, args.top_fraction, args.min_reward, args.min_candidates)
    if args.sample_log and not args.prompts:
        manifest = raft_from_log(
            args.policy, args.sample_log, args.output, train_args(args), rule, args.since
        )
    elif args.prompts and args.reward_model and not args.sample_log:
        read_reward_model(args.reward_model)
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        manifest = raft_self_sampling(
            args.policy,
            load_prompts(args.prompts),
            args.reward_model,
            args.output,
            train_args(args),
            rule,
            args.iterations,
            args.samples_per_prompt,
            params,
        )
    else:
        parser.error("give --sample-log PATH, or --prompts FILE with --reward-model DIR")
    data = {k: manifest[k] for k in ("prompts", "samples_seen", "prompts_kept", "samples_kept")}
    return summary("raft", args.output, data, {"version": manifest["version"], "reward": manifest["reward"]})
