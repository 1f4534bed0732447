"""Synthetic instruction tasks with a programmatic gold scorer that gives graded scores.

Two tasks over characters, each answered by one character:
- last: "last letter of kgho:" -> "o"; another letter of the word earns 0.5;
- largest: "largest digit in 9836:" -> "9"; another digit of the number earns
  0.8 / (1 + its distance), a digit not in it nothing.
Graded scores make rankings with ties (two other letters, two digits equally far), which is what
the reward model's ranking loss is for.

Why one-character answers: the Bradley-Terry RM reads one hidden state, at the answer's last
token. Checking a one-token answer against the prompt is one attention hop from that token. With
multi-token answers (sums, reversals, sorted strings) the RM initialised from the SFT policy was
measured to score by answer length and last token only, and best-of-N fell below one sample
(DEVELOPERS.md, "How the demo suite was chosen").

Demonstrations are noisy: a share of them answer with another character of the prompt, the slip a
careless labeller makes. The SFT policy learns the slips too, so its samples give best-of-N
something to choose from and RAFT something to fix. The split is by prompt: held-out prompts never
reach a trainer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LETTERS = "abcdefghijklmnop"
DIGITS = "0123456789"


@dataclass(frozen=True)
class Item:
    task: str
    prompt: str
    answer: str

    @property
    def subject(self) -> str:
        """The characters the question is about: the prompt's last word, without its colon."""
        return self.prompt.rsplit(" ", 1)[1].rstrip(":")


def first_line(completion: str) -> str:
    """The completion up to the first newline, leading space kept (what distinct_2 counts)."""
    return completion.split("\n", 1)[0]


def answer_of(completion: str) -> str:
    """What the model answered: the first line, trimmed."""
    return first_line(completion).strip()


def gold_score(item: Item, completion: str) -> float:
    """1.0 for the right answer; partial credit graded by task; 0 for anything unusable."""
    answer = answer_of(completion)
    if answer == item.answer:
        return 1.0
    if len(answer) != 1 or answer not in item.subject:
        return 0.0
    if item.task == "last":
        return 0.5
    return 0.8 / (1 + abs(int(answer) - int(item.answer)))


def is_correct(item: Item, completion: str) -> bool:
    return gold_score(item, completion) == 1.0


def _last_letters(rng: random.Random, count: int) -> list[Item]:
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(LETTERS) for _ in range(rng.choice((3, 4, 5, 6)))))
    return [Item("last", f"last letter of {w}:", w[-1]) for w in _shuffled(words, rng)]


def _largest_digits(rng: random.Random, count: int) -> list[Item]:
    numbers: set[str] = set()
    while len(numbers) < count:
        numbers.add("".join(rng.sample(DIGITS, rng.choice((3, 4, 5)))))
    return [Item("largest", f"largest digit in {n}:", max(n)) for n in _shuffled(numbers, rng)]


def _shuffled(values: set[str], rng: random.Random) -> list[str]:
    ordered = sorted(values)  # sets iterate in hash order; sort first so a seed replays
    rng.shuffle(ordered)
    return ordered


def suite(
    seed: int = 0, prompts_per_task: int = 8000, held_out_per_task: int = 100
) -> tuple[list[Item], list[Item]]:
    """(train, held_out) items; the held-out prompts appear nowhere in train."""
    rng = random.Random(seed)
    train, held_out = [], []
    for task in (_last_letters(rng, prompts_per_task), _largest_digits(rng, prompts_per_task)):
        held_out += task[:held_out_per_task]
        train += task[held_out_per_task:]
    assert not {i.prompt for i in train} & {i.prompt for i in held_out}
    return train, held_out


def item_of(prompt: str) -> Item | None:
    """The suite's item a prompt asks about, so its gold score can be computed; None for a prompt
    of no task here."""
    for task, lead, answer in (
        ("last", "last letter of ", lambda w: w[-1]),
        ("largest", "largest digit in ", max),
    ):
        if prompt.startswith(lead) and prompt.endswith(":") and len(prompt) > len(lead) + 1:
            return Item(task, prompt, answer(prompt[len(lead) : -1]))
    return None


def demonstration(item: Item, mistake_rate: float, rng: random.Random) -> str:
    """The answer a careless labeller writes: now and then another character of the prompt."""
    others = [c for c in item.subject if c != item.answer]  # none in "ppp": no slip to make
    if others and rng.random() < mistake_rate:
        return rng.choice(others)
    return item.answer


def distinct_2(outputs: list[str]) -> float:
    """Distinct character bigrams over all bigrams of `outputs` (1 = no repetition at all).

    Pass completions with their leading space: a one-character answer then counts as one bigram.
    """
    bigrams = [o[i : i + 2] for o in outputs for i in range(len(o) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0
