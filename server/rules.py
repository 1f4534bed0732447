"""Rule rewards: reward members computed by a Python callable, `(prompt, completion, reference) ->
float`, named on the server's own command line (`--reward-function NAME=module:callable`), never
by a request.

A rule runs off the event loop on a small pool of its own, under a time limit. One that raises,
returns something other than a finite number, or runs out of time fails that request with a 500
naming the member (`RuleFailed`); the server goes on. Python cannot stop a thread, so a call that
never returns keeps its worker: past `WORKERS` such calls, every rule call times out until restart.

Two ship with bon: `exact_match` (the answer a pattern extracts, compared with the reference) and
`length` (1 inside a character range, else 0). Keyword arguments follow the spec as JSON:
`--reward-function 'exact=server.rules:exact_match {"pattern": "answer: (\\\\S+)"}'`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from server.failures import RuleFailed

WORKERS = 4  # rule calls at once
RuleFunction = Callable[[str, str, "str | None"], float]


class RuleSpecError(ValueError):
    """A --reward-function that cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class Rule:
    name: str
    spec: str  # as given: module:callable, and any JSON keyword arguments
    function: RuleFunction


def load_rule(name: str, spec: str, flag: str = "--reward-function") -> Rule:
    """`module:callable`, optionally followed by a JSON object of keyword arguments; errors name
    the `flag` that gave it."""
    target, _, arguments = spec.strip().partition(" ")
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise RuleSpecError(f"{flag} {name}={spec}: expected NAME=module:callable")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise RuleSpecError(f"{flag} {name}: cannot load {target} ({error})") from None
    if not callable(function):
        raise RuleSpecError(f"{flag} {name}: {target} is not callable")
    if arguments.strip():
        try:
            keywords = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise RuleSpecError(f"{flag} {name}: its arguments are not JSON ({error})") from None
        if not isinstance(keywords, dict):
            raise RuleSpecError(f"{flag} {name}: its arguments must be a JSON object")
        function = partial(function, **keywords)
    return Rule(name, spec, function)


class RuleRunner:
    """Runs rules on their own threads with a time limit per call."""

    def __init__(self, rules: list[Rule], timeout_seconds: float):
        self.rules = {rule.name: rule for rule in rules}
        self.timeout = timeout_seconds
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="bon-rule")

    def _apply(self, rule: Rule, prompt: str, completions: list[str], reference: str | None) -> list[float]:
        values = []
        for completion in completions:
            value = rule.function(prompt, completion, reference)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise TypeError(f"returned {value!r}, not a finite number")
            values.append(float(value))
        return values

    async def rewards(
        self, name: str, prompt: str, completions: list[str], reference: str | None
    ) -> list[float]:
        """The rule's reward of each completion of `prompt`; RuleFailed naming it otherwise."""
        call = asyncio.get_running_loop().run_in_executor(
            self._pool, self._apply, self.rules[name], prompt, completions, reference
        )
        try:
            return await asyncio.wait_for(call, self.timeout)
        except TimeoutError:
            raise RuleFailed(
                f"the reward function {name!r} did not return within {self.timeout} s "
                "(--reward-function-timeout-seconds); nothing was ranked or logged"
            ) from None
        except Exception as error:
            raise RuleFailed(
                f"the reward function {name!r} failed: {type(error).__name__}: {error}; "
                "nothing was ranked or logged"
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- the rules bon ships ---------------------------------------------------------------------------

LAST_NUMBER = r"(-?\d+(?:\.\d+)?)\D*$"  # the last number in the text


def extract_answer(text: str, pattern: str = LAST_NUMBER) -> str | None:
    """The first group of the last match of `pattern`, stripped; None when nothing matches."""
    matches = list(re.finditer(pattern, text))
    return matches[-1].group(1).strip() if matches else None


def exact_match(prompt: str, completion: str, reference: str | None, pattern: str = LAST_NUMBER) -> float:
    """1.0 when the answer extracted from the completion equals the reference's (the reference as
    a whole when the pattern finds nothing in it), ignoring case; 0.0 otherwise or without one."""
    if reference is None:
        return 0.0
    answer = extract_answer(completion, pattern)
    wanted = extract_answer(reference, pattern) or reference.strip()
    return float(answer is not None and answer.casefold() == wanted.casefold())


def length(
    prompt: str, completion: str, reference: str | None, min_chars: int = 1, max_chars: int = 2000
) -> float:
    """1.0 when the completion has between min_chars and max_chars characters, else 0.0."""
    return float(min_chars <= len(completion) <= max_chars)
