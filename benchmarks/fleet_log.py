"""The numbers that size a fleet (README, Running a fleet): how fast the candidate log commits to
PostgreSQL and to SQLite, side by side in one run; how many rows and bytes a request costs; and
how much memory one replica takes.

    python benchmarks/fleet_log.py [--requests 2000] [--best-of 8] [--chars 400]

It starts a throwaway PostgreSQL (bon/local_postgres.py: Debian's postgresql package) and, for the
memory figure, one `bon serve` on the default models logging to it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bon.local_postgres import PostgresCluster
from server.log.records import CompletionRecord, RequestRecord
from server.log.sample_log import SampleLog

ROOT = Path(__file__).resolve().parent.parent


def requests(count: int, best_of: int, chars: int, prefix: str) -> list[RequestRecord]:
    """`count` requests of one prompt and `best_of` candidates of `chars` characters each."""
    text = ("lorem ipsum dolor sit amet " * (chars // 27 + 1))[:chars]
    return [
        RequestRecord(
            f"{prefix}-{i}",
            {"best_of": best_of, "max_tokens": 128},
            "/models/policy",
            "v1",
            "/models/rm",
            "v1",
            time.time(),
            [(f"question {i}: " + text[:80], 24)],
            [CompletionRecord(0, j, text, float(j), j, "stop", 100, False) for j in range(best_of)],
        )  # fmt: skip
        for i in range(count)
    ]


def commit_rate(locations: list[str], count: int, best_of: int, chars: int) -> dict:
    """Writers (one per location, as replicas) appending `count` requests each, all at once: how
    long until every candidate is committed."""
    batches = [requests(count, best_of, chars, f"w{n}-{time.time_ns()}") for n in range(len(locations))]
    logs = [SampleLog(location, 0.5, replica=f"w{n}") for n, location in enumerate(locations)]
    start = time.perf_counter()
    for log, batch in zip(logs, batches, strict=True):
        for record in batch:
            log.append(record)
    for log in logs:
        log.close()  # returns once everything queued is committed
    seconds = time.perf_counter() - start
    total = count * len(locations)
    return {"writers": len(locations), "requests": total, "seconds": round(seconds, 3),
            "requests_per_second": round(total / seconds, 1),
            "candidates_per_second": round(total * best_of / seconds, 1)}  # fmt: skip


def replica_memory(url: str, workdir: Path, count: int) -> dict:
    """RSS of one `bon serve` on the default models (transformers engine) after `count` requests."""
    port = 18000 + int(time.time()) % 1000
    command = [sys.executable, "-m", "bon", "serve", "--policy", str(ROOT / "default-models/policy"),
               "--reward-model", str(ROOT / "default-models/reward_model"), "--port", str(port),
               "--sample-log", url, "--torch-threads", "1"]  # fmt: skip
    server = subprocess.Popen(command, stdout=(workdir / "serve.log").open("w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        process = psutil.Process(server.pid)
        idle = process.memory_info().rss
        model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "last letter of abcd:", "max_tokens": 4, "best_of": 8}
        for _ in range(count):
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).raise_for_status()
        busy = process.memory_info().rss
    finally:
        server.terminate()
        server.wait(60)
    return {
        "rss_ready_mib": round(idle / 2**20),
        "rss_after_requests_mib": round(busy / 2**20),
        "requests": count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10000, help="per writer")
    parser.add_argument("--best-of", type=int, default=8)
    parser.add_argument("--chars", type=int, default=400, help="characters per completion")
    parser.add_argument("--output", type=Path, default=ROOT / "bench-results/fleet_log.json")
    args = parser.parse_args()
    cluster = PostgresCluster()
    work = Path(tempfile.mkdtemp(prefix="bon-fleet-bench-"))
    try:
        sizes = (args.requests, args.best_of, args.chars)
        results = {
            "sqlite": commit_rate([str(work / "one.db")], *sizes),
            "postgresql": commit_rate([cluster.database()], *sizes),
            "sqlite_two_shards": commit_rate([str(work / "a.db"), str(work / "b.db")], *sizes),
        }
        shared = cluster.database()
        results["postgresql_two_writers"] = commit_rate([shared, shared], *sizes)
        database = shared.rsplit("/", 1)[1]
        rows = {table: int(cluster.sql(f"SELECT count(*) FROM {table}", database))
                for table in ("requests", "prompts", "completions")}  # fmt: skip
        size = int(cluster.sql(  # the log's own tables, indexes and TOAST, not the catalogs
            "SELECT sum(pg_total_relation_size(oid)) FROM pg_class "
            "WHERE relname IN ('requests', 'prompts', 'completions')", database))  # fmt: skip
        results["per_request"] = {
            "rows": {table: count / rows["requests"] for table, count in rows.items()},
            "postgresql_bytes": round(size / rows["requests"]),
            "sqlite_bytes": round((work / "one.db").stat().st_size / args.requests),
        }
        results["replica"] = replica_memory(cluster.database(), work, 64)
        results["setup"] = {"best_of": args.best_of, "completion_chars": args.chars, "machine": "2 cores"}
    finally:
        cluster.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
