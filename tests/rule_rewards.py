"""Reward functions the tests name with --reward-function."""

from __future__ import annotations

import time


def letters(prompt: str, completion: str, reference: str | None) -> float:
    """How many letters: a rule whose value differs between candidates."""
    return float(sum(c.isalpha() for c in completion))


def moody(prompt: str, completion: str, reference: str | None) -> float:
    """0.0, unless the reference asks it to fail: "raise", "sleep" or "nan" (to test each failure)."""
    if reference == "raise":
        raise ZeroDivisionError("a rule with a bug")
    if reference == "sleep":
        time.sleep(30)
    if reference == "nan":
        return float("nan")
    return 0.0


def contains(prompt: str, completion: str, reference: str | None) -> bool:
    """A checker for bon label-steps: the answer contains the reference."""
    return reference is not None and reference in completion
