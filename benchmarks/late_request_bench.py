"""A short request sent while a long one decodes, against the same request on an idle server.

A best_of 1, max_tokens 4 request is sent at several points while a best_of 16, max_tokens 48
request runs on one real `bon serve` (transformers engine), and alone on the idle server. With
continuous batching it joins the running decode batch and finishes in its own few steps; a
server that runs one batch at a time makes it wait for the long one. The policy is a 25M-parameter
GPT-2 (the tiny test pair decodes 48 steps in a few milliseconds, too fast for any wait to show).
Prints the ratio of the worst median to the idle median; writes JSON.

    python benchmarks/late_request_bench.py [--hidden 512 --layers 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from serving import bon_serve

from bon.tiny_models import build_model, tokenizer_a

SHORT = {"model": "bench", "prompt": "the cat runs and", "max_tokens": 4, "best_of": 1, "seed": 0}
LONG = {"model": "bench", "prompt": "one two three", "max_tokens": 48, "best_of": 16, "seed": 1}
SHARES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)  # of LONG's own time: when SHORT is sent


async def measure(url: str, repeats: int) -> dict:
    """Median latency of SHORT alone, and of SHORT sent at each share of LONG's time."""

    async def timed(client, body) -> float:
        start = time.perf_counter()
        (await client.post(f"{url}/v1/completions", json=body)).raise_for_status()
        return time.perf_counter() - start

    async with httpx.AsyncClient(timeout=600) as client:
        await timed(client, LONG)  # warm-up
        idle = statistics.median([await timed(client, SHORT) for _ in range(2 * repeats)])
        long_alone = statistics.median([await timed(client, LONG) for _ in range(repeats)])
        during = {}
        for share in SHARES:
            late = []
            for _ in range(repeats):
                long = asyncio.create_task(timed(client, LONG))
                await asyncio.sleep(share * long_alone)
                late.append(await timed(client, SHORT))
                await long
            during[share] = statistics.median(late)
    worst = max(during.values())
    return {
        "idle_s": idle,
        "long_alone_s": long_alone,
        "during_long_s": during,
        "worst_s": worst,
        "ratio": worst / idle,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench-results/late_request.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bon-late-request-"))
    policy = build_model(work / "policy", "gpt2", tokenizer_a(), hidden=args.hidden, layers=args.layers)
    reward_model = build_model(work / "reward_model", "llama", tokenizer_a(), reward_model=True)
    with bon_serve(str(policy), str(reward_model), "--max-best-of", "16") as (url, _):
        result = asyncio.run(measure(url, args.repeats))
    result["policy"] = {"arch": "gpt2", "hidden": args.hidden, "layers": args.layers}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for share, seconds in result["during_long_s"].items():
        print(f"sent {share:.0%} into the long request: {seconds:.3f} s")
    print(
        f"a best_of 1, max_tokens 4 request: {result['idle_s']:.3f} s on an idle server, up to "
        f"{result['worst_s']:.3f} s while a best_of 16, max_tokens 48 one ({result['long_alone_s']:.2f} s "
        f"alone) runs: {result['ratio']:.2f}x"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
