"""The multi-step suite: a chain of additions, written one step at a time.

    "start 17, add 5, add 9, add 3:" -> " 17 + 5 = 22\\n\\n22 + 9 = 31\\n\\n31 + 3 = 34"

Each step adds the next number to the running total; steps are separated by a blank line, the
server's default step delimiter, and the answer is the last step's result. A checker grades the
answer (`server.rules:exact_match`: its last number against the reference), and every step can
be checked locally: it must start from the running total so far, add the prompt's next number,
and add it right. A step is good when it and every step before it are right: from a bad step on,
no continuation reaches the answer (what Math-Shepherd's rollout labels estimate).

Demonstrations slip now and then, the way a careless labeller does: one step's sum is off by one
or by ten (a dropped carry), and the steps after it carry on from the wrong total. The SFT policy
learns the slips too, which gives best-of-N and search something to choose among.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from server.rules import exact_match

DELIMITER = "\n\n"
STEP = re.compile(r"^\s*(\d+) \+ (\d+) = (\d+)\s*$")


@dataclass(frozen=True)
class Chain:
    start: int
    addends: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return f"start {self.start}, " + ", ".join(f"add {a}" for a in self.addends) + ":"

    @property
    def answer(self) -> int:
        return self.start + sum(self.addends)

    @property
    def reference(self) -> str:
        return str(self.answer)


def chains(rng: random.Random, count: int) -> list[Chain]:
    """`count` distinct chains of three or four additions of 2..9 to a start of 10..59."""
    made: set[Chain] = set()
    while len(made) < count:
        addends = tuple(rng.randint(2, 9) for _ in range(rng.choice((3, 4))))
        made.add(Chain(rng.randint(10, 59), addends))
    ordered = sorted(made, key=lambda c: (c.start, c.addends))  # sets iterate in hash order
    rng.shuffle(ordered)
    return ordered


def suite(seed: int, count: int, held_out: int = 200) -> tuple[list[Chain], list[Chain]]:
    """(train, held_out); the held-out prompts appear nowhere in train."""
    items = chains(random.Random(seed), count + held_out)
    return items[held_out:], items[:held_out]


def demonstration(chain: Chain, mistake_rate: float, rng: random.Random) -> str:
    """The steps, with one sum slipped (by 1 or 10) in a `mistake_rate` share of them."""
    slip = rng.randrange(len(chain.addends)) if rng.random() < mistake_rate else None
    total, steps = chain.start, []
    for i, addend in enumerate(chain.addends):
        result = total + addend
        if i == slip:
            result = max(0, result + rng.choice((-10, -1, 1, 10)))
        steps.append(f"{total} + {addend} = {result}")
        total = result
    return " " + DELIMITER.join(steps)


def step_labels(chain: Chain, completion: str) -> list[float]:
    """Each step of `completion` (split as the server splits it): 1 while it and all before it are
    right, 0 from the first wrong one on; a step that is not "a + b = c", or one too many, is wrong."""
    steps = [s for s in completion.split(DELIMITER) if s.strip()] or [completion]
    labels, total, good = [], chain.start, True
    for i, step in enumerate(steps):
        match = STEP.match(step)
        if match is None or i >= len(chain.addends):
            good = False
        else:
            a, b, c = map(int, match.groups())
            good = good and a == total and b == chain.addends[i] and c == a + b
            total = c
        labels.append(float(good))
    return labels


def is_correct(chain: Chain, completion: str) -> bool:
    """The checker's verdict: the last number written is the answer."""
    return exact_match(chain.prompt, completion, chain.reference) == 1.0
