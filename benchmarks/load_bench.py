"""Load benchmark: bon serve under concurrent best-of-N clients vs a naive per-request baseline.

Every side uses the same models, prompts, best_of and max_tokens, in one run on one machine:
- bon: the real server (uvicorn, HTTP) on the transformers engine, `--clients` concurrent clients
  sending `--requests` in all;
- bon (vllm), with `--engine vllm`: the same server with sampling and scoring on vLLM (run it in
  the vLLM venv: `make bench-vllm`);
- baseline: what TRL's deleted BestOfNSampler did, one request at a time in-process:
  `generate(num_return_sequences=N)` on the duplicated prompt, then the RM on each candidate.
Prints requests/s and p50/p99 latency for each and the ratios to the baseline; writes JSON.

    python benchmarks/load_bench.py --policy DIR --reward-model DIR [--clients 16 --best-of 8] [--engine vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import torch
from serving import bon_serve
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from server.threads import apply_torch_threads

PROMPTS = [
    "the cat runs and",
    "one two three",
    "what is 12 + 30",
    "the capital of country",
    "a small red bird",
    "why does the river",
    "seven eight nine ten",
    "the dog sees the",
    "how do you make",
    "blue green light",
    "where is the house",
    "two plus two equals",
    "the quick slow fish",
    "who knows what",
    "happy sad tree",
    "the road to the city",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(latencies: list[float], wall: float) -> dict:
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 0.99),
        "wall_s": wall,
        "latencies_s": latencies,
    }


def merged(*runs: dict) -> dict:
    """One summary of several runs of the same side."""
    return summary([t for r in runs for t in r["latencies_s"]], sum(r["wall_s"] for r in runs))


async def drive(
    url: str, total: int, clients: int, best_of: int, max_tokens: int
) -> tuple[list[float], float]:
    """`clients` workers share `total` requests; returns per-request latencies and wall time."""
    latencies: list[float] = []
    counter = iter(range(total))
    bar = tqdm(total=total, desc="bon serve", unit="req")

    async def worker(client: httpx.AsyncClient):
        for i in counter:
            body = {
                "model": "bench",
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_tokens,
                "best_of": best_of,
                "seed": i,
            }
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            bar.update()

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    bar.close()
    return latencies, wall


def run_server(args, total: int, engine: str) -> dict:
    flags = ["--max-best-of", str(args.best_of), "--torch-threads", str(args.threads)]
    flags += ["--engine", engine, "--reward-engine", engine]
    with bon_serve(args.policy, args.reward_model, *flags) as (url, _):
        asyncio.run(drive(url, args.clients, args.clients, args.best_of, args.max_tokens))  # warm-up
        latencies, wall = asyncio.run(drive(url, total, args.clients, args.best_of, args.max_tokens))
    return summary(latencies, wall)


@torch.inference_mode()
def run_baseline(args, total: int) -> dict:
    policy = AutoModelForCausalLM.from_pretrained(args.policy).eval()
    policy_tok = AutoTokenizer.from_pretrained(args.policy)
    rm = AutoModelForSequenceClassification.from_pretrained(args.reward_model).eval()
    rm_tok = AutoTokenizer.from_pretrained(args.reward_model)
    pad = policy_tok.pad_token_id if policy_tok.pad_token_id is not None else policy_tok.eos_token_id

    def one(i: int) -> str:
        prompt = PROMPTS[i % len(PROMPTS)]
        ids = policy_tok(prompt, return_tensors="pt").input_ids
        torch.manual_seed(i)
        out = policy.generate(
            ids,
            do_sample=True,
            num_return_sequences=args.best_of,
            max_new_tokens=args.max_tokens,
            pad_token_id=pad,
        )
        texts = policy_tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        rewards = [rm(rm_tok(prompt + t, return_tensors="pt").input_ids).logits[0, 0].item() for t in texts]
        return texts[max(range(len(texts)), key=rewards.__getitem__)]

    for i in range(2):  # warm-up
        one(i)
    latencies = []
    start = time.perf_counter()
    for i in tqdm(range(total), desc="baseline", unit="req", leave=False):
        t = time.perf_counter()
        one(i)
        latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per side")
    parser.add_argument("--best-of", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads, the same for the server and the baseline; 0: bon's default "
        "(half the cores)",
    )
    parser.add_argument(
        "--engine",
        choices=["vllm"],
        help="also serve with sampling and scoring on vLLM, beside the transformers engine",
    )
    parser.add_argument("--output", type=Path, default=Path("bench-results/load.json"))
    args = parser.parse_args()
    args.threads = apply_torch_threads(args.threads)

    # The baseline runs before and after the servers, half its requests each time, and counts
    # as one: this machine is shared, and a baseline timed only before or after drifted by 30 %.
    before = run_baseline(args, args.requests // 2)
    sides = {"bon": run_server(args, args.requests, "transformers")}
    if args.engine == "vllm":
        sides["bon_vllm"] = run_server(args, args.requests, "vllm")
    after = run_baseline(args, args.requests - args.requests // 2)
    sides["baseline"] = baseline = merged(before, after)
    result = {"config": {k: str(v) for k, v in vars(args).items()} | {"cpus": os.cpu_count()}, **sides}
    result["baseline_halves_requests_per_s"] = [before["requests_per_s"], after["requests_per_s"]]
    for name in sides.keys() - {"baseline"}:
        result[f"{name}_throughput_ratio"] = sides[name]["requests_per_s"] / baseline["requests_per_s"]
        result[f"{name}_p50_ratio"] = sides[name]["p50_s"] / baseline["p50_s"]
        result[f"{name}_p99_ratio"] = sides[name]["p99_s"] / baseline["p99_s"]
    print(f"{'':10}{'req/s':>10}{'p50 s':>10}{'p99 s':>10}{'x baseline':>12}")
    for name, r in sides.items():
        ratio = r["requests_per_s"] / baseline["requests_per_s"]
        print(f"{name:10}{r['requests_per_s']:>10.2f}{r['p50_s']:>10.3f}{r['p99_s']:>10.3f}{ratio:>11.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
