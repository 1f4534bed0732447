"""`make install`: torch from PyTorch's CPU index on a machine without a GPU, and a new
TORCH_SPEC installs again (the stamp used to depend on pyproject.toml alone)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


def test_a_new_torch_spec_installs_again(tmp_path):
    venv = f"VENV={tmp_path / 'venv'}"
    plan = make("-n", "install", venv)
    [stamp] = re.findall(r"^touch (\S+)$", plan.stdout, re.M)
    assert make("-q", "install", venv).returncode == 1  # nothing installed yet
    Path(stamp).parent.mkdir(parents=True)
    Path(stamp).touch()  # as the install's last step does
    assert make("-q", "install", venv).returncode == 0
    assert make("-q", "install", venv, "TORCH_SPEC=torch==2.14.1").returncode == 1
    again = make("-n", "install", venv, "TORCH_SPEC=torch==2.14.1").stdout
    assert "'torch==2.14.1'" in again


def test_without_a_gpu_torch_comes_from_the_cpu_index_first(tmp_path):
    plan = make("-n", "install", f"VENV={tmp_path / 'venv'}").stdout
    line = next(line for line in plan.splitlines() if "torch==" in line)
    # Where nvidia-smi is missing, the CPU index is tried first, then the configured indexes.
    assert "command -v nvidia-smi" in line
    cpu_index, fallback = (
        line.index("--index-url 'https://download.pytorch.org/whl/cpu'"),
        line.rindex("then"),
    )
    assert cpu_index < fallback
