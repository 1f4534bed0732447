"""The container's health check: is the `bon serve` of this container ready?

    python -m bon.healthcheck [--pid 1]

The port is read from the server's own command line (`--port N` or `--port=N`), else BON_PORT,
else 8000, so a `--port` given after the image name is the port checked (a check of ${BON_PORT}
alone marked such a container unhealthy). Exit 0 when /ready answers 200, 1 otherwise. Standard
library only: it runs every few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path


def served_port(pid: int) -> str:
    arguments = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    for index, argument in enumerate(arguments):
        if argument == "--port" and index + 1 < len(arguments):
            return arguments[index + 1]
        if argument.startswith("--port="):
            return argument.removeprefix("--port=")
    return os.environ.get("BON_PORT", "8000")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bon.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pid", type=int, default=1, help="the bon serve process (default: 1, the container's)"
    )
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for /ready")
    args = parser.parse_args()
    url = f"http://127.0.0.1:{served_port(args.pid)}/ready"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:  # refused, timed out, or a 503 (HTTPError)
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
