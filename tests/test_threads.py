"""The thread rule bon serve and the trainers share."""

from __future__ import annotations

import os

import torch

from server.threads import apply_torch_threads


def test_zero_means_half_the_cores_and_a_number_is_kept():
    before = torch.get_num_threads()
    try:
        assert apply_torch_threads(0) == max(1, (os.cpu_count() or 2) // 2) == torch.get_num_threads()
        assert apply_torch_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
