"""How long `bon --help`, a command's --help and a usage error take: the answer a new user waits
for. Each command runs `--runs` times in a fresh interpreter; the median is reported.

    python benchmarks/cli_startup.py [--runs 5] [--output bench-results/cli_startup.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [
    ["--help"],
    ["serve", "--help"],
    ["train", "rm", "--help"],
    ["score", "--help"],
    ["eval", "--help"],
    ["train", "raft", "--no-such-flag"],
    ["score"],
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("bench-results/cli_startup.json"))
    args = parser.parse_args()
    results = {}
    for argv in COMMANDS:
        seconds = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "bon", *argv], capture_output=True)
            seconds.append(time.perf_counter() - start)
        results["bon " + " ".join(argv)] = round(statistics.median(seconds), 3)
        print(f"{'bon ' + ' '.join(argv):36} {results['bon ' + ' '.join(argv)]:.2f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
