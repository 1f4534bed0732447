"""Naming and weighing reward members on a command line (bon serve, bon score). Light on purpose:
`bon serve --help` reads it before torch or transformers are imported."""

from __future__ import annotations

import math
from pathlib import Path


def member_name(value: str) -> tuple[str, Path]:
    """A --reward-model value as (name, directory): NAME=DIR, or DIR named after its last part.
    A directory whose own name holds "=" is given as NAME=DIR."""
    name, equals, directory = value.partition("=")
    if equals and name and "/" not in name:
        return name.strip(), Path(directory.strip())
    path = Path(value)
    return path.resolve().name, path


def parse_weights(text: str | None) -> dict[str, float]:
    """--reward-weights "NAME=W,..." as {name: weight}; ValueError naming a malformed entry."""
    weights: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, equals, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not equals or not name.strip() or not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"--reward-weights {part!r}: expected NAME=W with W a number >= 0")
        weights[name.strip()] = weight
    return weights
