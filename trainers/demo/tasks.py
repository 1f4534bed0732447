"""Synthetic instruction tasks with a programmatic gold scorer that gives graded scores.

Graded scores make rankings with ties (two answers equally far off), which is what the reward
model's ranking loss is for. Three tasks, each prompt with one correct answer:
- add: two-digit addition, scored by distance to the sum;
- capital: capitals from the table shipped beside this file, asked in two phrasings; another
  country's capital earns partial credit;
- reverse: reversing a short letter string, scored by the fraction of positions right.

The split is by prompt: held-out prompts never reach a trainer. For capitals the held-out prompts
use the second phrasing of countries whose first phrasing is trained, so the fact is learnable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

CAPITALS = dict(
    line.split("\t") for line in (Path(__file__).parent / "capitals.tsv").read_text().splitlines() if line
)
LETTERS = "abcdefgh"


@dataclass(frozen=True)
class Item:
    task: str
    prompt: str
    answer: str


def answer_of(completion: str) -> str:
    """What the model answered: the completion up to the first newline, trimmed."""
    return completion.split("\n", 1)[0].strip()


def gold_score(item: Item, completion: str) -> float:
    """1.0 for the right answer; partial credit graded by task; 0 for anything unusable."""
    answer = answer_of(completion)
    if answer == item.answer:
        return 1.0
    if item.task == "add":
        if not answer.isdigit():
            return 0.0
        return 0.8 / (1 + abs(int(answer) - int(item.answer)))
    if item.task == "capital":
        return 0.3 if answer in CAPITALS.values() else 0.0
    right = sum(a == b for a, b in zip(answer, item.answer, strict=False))
    return 0.8 * right / max(len(answer), len(item.answer))


def is_correct(item: Item, completion: str) -> bool:
    return gold_score(item, completion) == 1.0


def _additions(rng: random.Random) -> list[Item]:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    return [Item("add", f"{a}+{b}=", str(a + b)) for a, b in pairs]


def _capitals() -> tuple[list[Item], list[Item]]:
    """Train: every country's first phrasing and half the countries' second; held out: the rest."""
    countries = sorted(CAPITALS)
    first = [Item("capital", f"capital of {c}:", CAPITALS[c]) for c in countries]
    second = [Item("capital", f"the capital of {c}:", CAPITALS[c]) for c in countries]
    return first + second[::2], second[1::2]


def _reversals(rng: random.Random) -> list[Item]:
    words = sorted({"".join(rng.choice(LETTERS) for _ in range(rng.choice((3, 4)))) for _ in range(3000)})
    rng.shuffle(words)
    return [Item("reverse", f"reverse {w}:", w[::-1]) for w in words]


def suite(
    seed: int = 0, train_additions: int = 9000, held_out_per_task: int = 60
) -> tuple[list[Item], list[Item]]:
    """(train, held_out) items; the held-out prompts appear nowhere in train."""
    rng = random.Random(seed)
    additions, reversals = _additions(rng), _reversals(rng)
    capitals_train, capitals_held = _capitals()
    held_out = additions[:held_out_per_task] + reversals[:held_out_per_task] + capitals_held
    train = additions[held_out_per_task : held_out_per_task + train_additions]
    train += reversals[held_out_per_task : held_out_per_task + 1200] + capitals_train
    assert not {i.prompt for i in train} & {i.prompt for i in held_out}
    return train, held_out


def distinct_2(outputs: list[str]) -> float:
    """Distinct character bigrams over all bigrams of `outputs` (1 = no repetition at all)."""
    bigrams = [o[i : i + 2] for o in outputs for i in range(len(o) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0
