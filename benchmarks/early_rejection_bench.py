"""Early rejection against plain best-of-N at the same N, on a task whose reward depends on the
whole completion (benchmarks/mood_task.py: the share of bright words in 48 tokens).

Every configuration serves the same prompts with the same seeds through one real `bon serve`
(transformers engine, HTTP), so each early-rejection request sees the same first tokens as its
plain best-of-N twin. For each: generated tokens (the server's usage count), wall time, and the
mean gold score of the returned answer; for early rejection also the share of plain best-of-N's
gain over N=1 that it keeps, and its tokens as a share of plain best-of-N's. Writes JSON and a
PNG of tokens against gold score.

    python benchmarks/early_rejection_bench.py [--prompts 48] [--best-of 16] [--max-tokens 48] [--stay 0.95]

`--stay` is how long the policy's moods last (the chance it keeps one for another word): the
longer they last, the more a candidate's first tokens tell of its end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib
from mood_task import build, gold
from serving import bon_serve
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETTINGS = [(after, keep) for after in (4, 8, 16) for keep in (0.125, 0.1875, 0.25, 0.5)]


async def serve_all(
    url: str, prompts: list[str], extra: dict, max_tokens: int, concurrency: int, bright: set[str]
) -> dict:
    """Every prompt once (seed = its index); mean gold, generated tokens, wall seconds."""
    scores, tokens = [], 0
    limit = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, index: int, prompt: str) -> None:
        nonlocal tokens
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "seed": index, **extra}
        async with limit:
            response = await client.post(f"{url}/v1/completions", json=body)
        response.raise_for_status()
        answer = response.json()
        scores.append(gold(answer["choices"][0]["text"], bright))
        tokens += answer["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - start
    return {"gold": sum(scores) / len(scores), "tokens": tokens, "seconds": wall}


def plot(result: dict, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    plain = result["plain"]
    ns = sorted(plain, key=int)
    axes.plot([plain[n]["tokens"] for n in ns], [plain[n]["gold"] for n in ns], "o-", color="black",
              label="plain best-of-N (N = " + ", ".join(ns) + ")")  # fmt: skip
    for after in sorted({r["after_tokens"] for r in result["early_rejection"]}):
        runs = sorted(
            (r for r in result["early_rejection"] if r["after_tokens"] == after), key=lambda r: r["keep"]
        )
        axes.plot([r["tokens"] for r in runs], [r["gold"] for r in runs], "s--",
                  label=f"early rejection, N={result['best_of']}, after {after} tokens (keep " +
                  ", ".join(f"{r['keep']:g}" for r in runs) + ")")  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("generated tokens (all candidates, all prompts)")
    axes.set_ylabel("mean gold score of the answer")
    axes.set_title(f"Early rejection, {result['task']}, {result['max_tokens']}-token completions", fontsize=9)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--best-of", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stay", type=float, default=0.95, help="the policy's chance of keeping its mood")
    parser.add_argument("--output", type=Path, default=Path("bench-results/early_rejection.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/early-rejection.png"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bon-early-rejection-"))
    policy, reward_model = build(work, args.stay)
    bright = set(json.loads((work / "bright_words.json").read_text()))
    rng = random.Random(0)
    words = sorted(bright) + sorted(json.loads((work / "dark_words.json").read_text()))
    prompts = [
        " " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(args.prompts)
    ]

    plain_ns = [n for n in (1, 2, 4, 8, 16, 32) if n <= args.best_of]
    result = {
        "task": f"mood (benchmarks/mood_task.py), stay {args.stay}",
        "prompts": args.prompts,
        "best_of": args.best_of,
        "max_tokens": args.max_tokens,
        "plain": {},
        "early_rejection": [],
    }
    flags = [
        "--max-best-of",
        str(args.best_of),
        "--max-batch-tokens",
        str(64 * args.best_of * args.max_tokens),
    ]
    with bon_serve(str(policy), str(reward_model), *flags) as (url, _):

        def run(extra: dict) -> dict:
            return asyncio.run(serve_all(url, prompts, extra, args.max_tokens, args.concurrency, bright))

        run({"best_of": 2})  # warm-up
        for n in tqdm(plain_ns, desc="plain best-of-N"):
            result["plain"][str(n)] = run({"best_of": n})
        for after, keep in tqdm(SETTINGS, desc="early rejection"):
            rejection = {"after_tokens": after, "keep": keep}
            result["early_rejection"].append(
                rejection | run({"best_of": args.best_of, "early_rejection": rejection})
            )

    one, full = result["plain"]["1"], result["plain"][str(args.best_of)]
    gain = full["gold"] - one["gold"]
    for r in result["early_rejection"]:
        r["gain_kept"] = (r["gold"] - one["gold"]) / gain if gain else float("nan")
        r["token_share"] = r["tokens"] / full["tokens"]
        r["time_share"] = r["seconds"] / full["seconds"]
    goal = [r for r in result["early_rejection"] if r["token_share"] <= 1 / 3 and r["gain_kept"] >= 0.95]
    result["meets_goal"] = [{"after_tokens": r["after_tokens"], "keep": r["keep"]} for r in goal]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    plot(result, args.plot)

    print(f"{'':26}{'gold':>7}{'tokens':>9}{'seconds':>9}{'tokens x':>10}{'time x':>8}{'gain kept':>11}")
    for n in plain_ns:
        r = result["plain"][str(n)]
        print(f"{f'plain best-of-{n}':26}{r['gold']:7.3f}{r['tokens']:9d}{r['seconds']:9.1f}")
    for r in result["early_rejection"]:
        name = f"N={args.best_of} after {r['after_tokens']} keep {r['keep']:g}"
        print(f"{name:26}{r['gold']:7.3f}{r['tokens']:9d}{r['seconds']:9.1f}{r['token_share']:10.2f}"
              f"{r['time_share']:8.2f}{r['gain_kept']:11.2f}")  # fmt: skip
    print(f"goal (<= 1/3 of the tokens at >= 95 % of the gain) met by: {result['meets_goal'] or 'none'}")
    print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
