"""What the benchmarks share: a real `bon serve` on a free port, for the length of a `with`."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def bon_serve(policy: str, reward_model: str, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `bon serve` (served as "bench", its log in a temporary directory), wait for /ready,
    yield (url, process), and stop it afterwards."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "bon", "serve", "--policy", policy, "--reward-model", reward_model,
            "--port", str(port), "--served-model-name", "bench", "--sample-log", f"{tmp}/samples.db",
            "--log-level", "warning", *flags,
        ]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600  # two vLLM engines start in under a minute here
            while True:
                if server.poll() is not None:
                    raise RuntimeError(server.stderr.read().decode())
                try:
                    if httpx.get(f"{url}/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready")
                time.sleep(0.2)
            yield url, server
        finally:
            server.terminate()
            server.wait()
