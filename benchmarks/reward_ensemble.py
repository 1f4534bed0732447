"""Conservative reward-model ensembles against over-optimisation, on the demo suite (issue 16).

Trains the demo's SFT policy, then K Bradley-Terry reward models on noisy preferences (each its
own sample of training prompts, its own seed, a share of its pairs flipped), draws one pool of
candidates per held-out prompt from the SFT policy, and measures the gold score of the candidate
each rule would choose at N = 1, 2, 4 ... pool size (the unbiased best-of-N estimator over every
N-subset of the pool): each member alone, and the members standardised by their
reward_stats.json and combined by bon serve's rules (server/selection.py: mean, min, uwo).

    python benchmarks/reward_ensemble.py --output build/ensemble [--members 4] [--flip 0.25]
        [--rm-prompts 400] [--pool 256] [--held-out 100] [--penalties 1,4] [--shrinks 0.5] [--seed 0]

An OUTPUT that already holds `sft/` (an earlier run's, same seed) reuses it.

Writes OUTPUT/ensemble.json and OUTPUT/ensemble.png (--plot: elsewhere too) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from server.reward import read_stats  # noqa: E402
from server.selection import Combination, combine  # noqa: E402
from trainers.arguments import DemoConfig, TrainArgs  # noqa: E402
from trainers.data import PreferenceGroup  # noqa: E402
from trainers.demo.pipeline import ranked_groups, rewards, sample, sft_policy  # noqa: E402
from trainers.demo.tasks import gold_score, suite  # noqa: E402
from trainers.evaluation.estimators import expected_best_of_n, powers_of_two  # noqa: E402
from trainers.reward import train_reward_model  # noqa: E402


def noisy_pairs(groups: list[PreferenceGroup], flip: float, rng: random.Random) -> list[PreferenceGroup]:
    """Every (winner, loser) pair of the gold rankings as its own group, a share `flip` reversed:
    a careless labeller's preferences."""
    out = []
    for group in groups:
        for w, lo in group.pairs():
            first, second = (lo, w) if rng.random() < flip else (w, lo)
            out.append(
                PreferenceGroup(group.prompt, [group.responses[first], group.responses[second]], [1, 2])
            )
    return out


def gold_at_n(proxy: list[list[float]], gold: list[list[float]], ns: list[int]) -> dict[str, float]:
    """Mean over prompts of the gold score of the best-of-N by `proxy`."""
    return {
        str(n): sum(expected_best_of_n(p, n, g) for p, g in zip(proxy, gold, strict=True)) / len(proxy)
        for n in ns
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--flip", type=float, default=0.25, help="share of each member's pairs reversed")
    parser.add_argument("--rm-prompts", type=int, default=400, help="training prompts per member")
    parser.add_argument("--pool", type=int, default=256, help="candidates per held-out prompt")
    parser.add_argument("--held-out", type=int, default=100, help="held-out prompts measured")
    parser.add_argument("--penalties", default="1,4", help="uwo's lambdas, comma-separated")
    parser.add_argument(
        "--shrinks",
        default="0.5",
        help="each member's --shrink toward a fresh init, cycled (comma-separated)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="also write the figure here")
    args = parser.parse_args()
    start = time.time()
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    say = lambda message: print(f"[{time.time() - start:6.0f}s] {message}", flush=True)  # noqa: E731
    cfg = DemoConfig(output=out, seed=args.seed)
    torch.manual_seed(args.seed)
    if (out / "sft" / "config.json").is_file():  # an earlier run's: the same seed makes the same one
        say("reusing the SFT policy at " + str(out / "sft"))
        train, held_out = suite(cfg.seed, cfg.prompts_per_task)
    else:
        train, held_out = sft_policy(cfg, out, random.Random(args.seed), say)
    rng = random.Random(args.seed)
    held_out = rng.sample(held_out, args.held_out)
    shrinks = [float(x) for x in args.shrinks.split(",")]
    penalties = [float(x) for x in args.penalties.split(",")]

    members = {}
    for m in range(args.members):
        shrink = shrinks[m % len(shrinks)]
        say(f"member {m}: {args.rm_prompts} prompts, {args.flip:.0%} flipped, shrink {shrink}")
        member_rng = random.Random(args.seed * 1000 + m)
        items = member_rng.sample(train, args.rm_prompts)
        groups = ranked_groups(items, sample(out / "sft", items, cfg.rm_samples, cfg, seed=100 + m))
        rm_args = TrainArgs(
            epochs=cfg.rm_epochs, learning_rate=cfg.rm_learning_rate, batch_size=8, max_length=32,
            seed=args.seed + m, warmup_ratio=0.05,
        )  # fmt: skip
        directory = out / f"rm-{m}"
        if directory.exists():
            shutil.rmtree(directory)
        train_reward_model(
            out / "sft", noisy_pairs(groups, args.flip, member_rng), rm_args, directory, eval_fraction=0.0,
            shrink=shrink,
        )  # fmt: skip
        members[f"rm-{m}"] = directory

    say(f"pool: {args.pool} candidates for each of {len(held_out)} held-out prompts")
    pool = sample(out / "sft", held_out, args.pool, cfg, seed=2)
    gold = [[gold_score(i, t) for t in texts] for i, texts in zip(held_out, pool, strict=True)]
    raw = {name: rewards(directory, held_out, pool) for name, directory in members.items()}
    stats = {name: read_stats(directory) for name, directory in members.items()}

    ns = powers_of_two(args.pool)
    curves = {f"{name} alone": gold_at_n(raw[name], gold, ns) for name in members}
    proxies = {f"{name} alone": gold_at_n(raw[name], raw[name], ns) for name in members}
    rules = [("mean", Combination("mean")), ("min", Combination("min"))]
    rules += [(f"uwo (lambda {p:g})", Combination("uwo", {}, p)) for p in penalties]
    for label, combination in rules:
        combined = [
            [r.value for r in combine({name: raw[name][p] for name in members}, stats, combination)]
            for p in range(len(held_out))
        ]
        curves[label] = gold_at_n(combined, gold, ns)
    oracle = gold_at_n(gold, gold, ns)

    largest = str(ns[-1])
    alone = [curves[f"{name} alone"] for name in members]
    best_member = max(c[largest] for c in alone)
    conservative = {k: v for k, v in curves.items() if not k.endswith("alone")}
    report = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "held_out_prompts": len(held_out),
        "gold_at_n": curves,
        "own_proxy_at_n": proxies,
        "oracle_gold_at_n": oracle,
        "members_fall": {
            name: round(max(c.values()) - c[largest], 4) for name, c in zip(members, alone, strict=True)
        },
        "best_member_at_largest_n": best_member,
        "best_rule_at_largest_n": max(conservative, key=lambda k: conservative[k][largest]),
        "seconds": round(time.time() - start, 1),
    }
    (out / "ensemble.json").write_text(json.dumps(report, indent=2))

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for name, curve in curves.items():
        style = {"linestyle": ":", "alpha": 0.7} if name.endswith("alone") else {"linewidth": 2.2}
        ax.plot(ns, [curve[str(n)] for n in ns], marker="o", label=name, **style)
    ax.plot(ns, [oracle[str(n)] for n in ns], color="grey", linestyle="--", label="oracle (gold chooses)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("N (best of N)")
    ax.set_ylabel("gold score of the chosen answer")
    ax.set_title(
        f"{args.members} reward models, {args.flip:.0%} of pairs flipped: alone and combined", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for path in [out / "ensemble.png", *([args.plot] if args.plot else [])]:
        fig.savefig(path, dpi=110)
    print(f"{'gold at N':28}" + "".join(f"{n:>8}" for n in ns))
    for name, curve in [*curves.items(), ("oracle", oracle)]:
        print(f"{name:28}" + "".join(f"{curve[str(n)]:8.3f}" for n in ns))
    print(
        json.dumps(
            {k: report[k] for k in ("members_fall", "best_member_at_largest_n", "best_rule_at_largest_n")}
        )
    )
    print(f"wrote {out / 'ensemble.json'} in {report['seconds']} s")


if __name__ == "__main__":
    main()
