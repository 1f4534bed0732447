"""A recipe under torchrun with two CPU processes (gloo): what `accelerate launch` does on GPUs."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import free_port
from transformers import AutoModelForCausalLM


def test_sft_on_two_processes(models, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"{i} plus one is", "completion": f" {i + 1}"}) + "\n" for i in range(16)
        )
    )
    output = tmp_path / "sft"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "bon",
        "train",
        "sft",
        "--base",
        str(models["gpt2_policy"]),
        "--data",
        str(data),
        "--output",
        str(output),
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--learning-rate",
        "1e-3",
        "--max-length",
        "32",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((output / "training_history.json").read_text())
    # 16 examples, 2 per process per step, 2 processes: 4 steps an epoch (one process would take 8).
    assert len(history) == 8
    assert history[-1]["loss"] < history[0]["loss"]
    AutoModelForCausalLM.from_pretrained(output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft", "sft.jsonl"]  # published once, no leftovers
