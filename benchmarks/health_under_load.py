"""/health latency and server memory under hostile requests, against the same server idle.

The hostile load, sent over and over by a few clients: a prompt of about 7 MB (refused by its
length in characters, never tokenized), a /v1/score of the most inputs allowed, and an
unauthenticated 7 MB body (refused on its headers). Meanwhile /health is polled. Prints p50, p99
and max /health latency idle and under load, and the server's RSS before and after; the target is
a max under 100 ms. Writes bench-results/health_under_load.json.

    python benchmarks/health_under_load.py --policy DIR --reward-model DIR [--seconds 20] [--engine vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import psutil
from serving import bon_serve

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def quantiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "polls": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "max_ms": 1000 * ordered[-1],
    }


def poll_health(url: str, seconds: float, hostile_clients: int) -> list[float]:
    """/health latencies over `seconds`, polled from a thread of its own while `hostile_clients`
    send the hostile requests from another: neither side's client work delays the other's."""
    json_body = {"content-type": "application/json"}
    # Encoded once: encoding 7 MB of JSON per request would load this process, not the server.
    big_prompt = json.dumps({"model": "bench", "prompt": "the cat " * 900_000, "max_tokens": 1}).encode()
    big_score = json.dumps({"prompt": "x", "responses": ["word " * 400] * 256}).encode()
    unauthenticated = b"{" + b" " * (7 * 2**20) + b"}"
    stop = threading.Event()

    def hostile():
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                client.post(f"{url}/v1/completions", content=big_prompt, headers={**AUTH, **json_body})
                client.post(f"{url}/v1/score", content=big_score, headers={**AUTH, **json_body})
                client.post(f"{url}/v1/completions", content=unauthenticated, headers=json_body)

    attackers = [threading.Thread(target=hostile) for _ in range(hostile_clients)]
    for attacker in attackers:
        attacker.start()
    latencies = []
    with httpx.Client(timeout=120) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            client.get(f"{url}/health").raise_for_status()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    stop.set()
    for attacker in attackers:
        attacker.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=3, help="hostile clients")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--output", type=Path, default=Path("bench-results/health_under_load.json"))
    args = parser.parse_args()
    flags = ["--api-key", KEY, "--engine", args.engine, "--reward-engine", args.engine]
    with bon_serve(args.policy, args.reward_model, *flags) as (url, server):
        process = psutil.Process(server.pid)
        idle = quantiles(poll_health(url, args.seconds / 2, 0))
        rss_before = process.memory_info().rss / 2**20
        loaded = quantiles(poll_health(url, args.seconds, args.clients))
        rss_after = process.memory_info().rss / 2**20
    result = {
        "config": {k: str(v) for k, v in vars(args).items()} | {"cpus": os.cpu_count()},
        "idle": idle,
        "hostile": loaded,
        "rss_mib": {"before": rss_before, "after": rss_after},
    }
    print(f"{'/health':10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name in ("idle", "hostile"):
        r = result[name]
        print(f"{name:10}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['max_ms']:>10.1f}")
    print(f"server RSS: {rss_before:.0f} MiB before the hostile load, {rss_after:.0f} MiB after")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
