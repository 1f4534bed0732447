"""How many intra-op threads torch gets: one rule for the server and the trainers.

torch takes every core by default. On a small machine that is the worst choice beside anything
else: the server's HTTP, tokenizing and log threads, or a server beside a training run (a RAFT
step went from 0.025 s with one thread to 2 s with torch's default). `0` means half the cores.
"""

from __future__ import annotations

import os

import torch


def apply_torch_threads(requested: int) -> int:
    """Set torch's intra-op threads (0: half the cores, at least one); returns the number set."""
    threads = requested or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    return threads
