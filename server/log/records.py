"""What the candidate log stores, as records and as the rows every store writes and reads.

A store (SQLite, PostgreSQL) is a place for these rows; the records, their encoding into rows and
the decoding of what readers get back are one, so both stores hold and return the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# The columns of one candidate as readers return it (the `candidates` view, less its id).
COLUMNS = (
    "request_id",
    "prompt_index",
    "candidate_index",
    "prompt",
    "completion",
    "reward",
    "rank",
    "finish_reason",
    "policy",
    "policy_version",
    "reward_model",
    "reward_model_version",
    "params",
    "prompt_tokens",
    "completion_tokens",
    "reward_truncated",
    "created",
    "pruned",
    "rewards",
    "step_rewards",
    "generated_tokens",
    "replica",
)

# Columns of the tables as the writers fill them, in order.
REQUEST_COLUMNS = (
    "request_id", "params", "policy", "policy_version", "reward_model", "reward_model_version", "created",
    "replica",
)  # fmt: skip
PROMPT_COLUMNS = ("request_id", "prompt_index", "prompt", "prompt_tokens")
COMPLETION_COLUMNS = (
    "request_id", "prompt_index", "candidate_index", "completion", "reward", "rank", "finish_reason",
    "completion_tokens", "reward_truncated", "created", "pruned", "rewards", "step_rewards",
    "generated_tokens",
)  # fmt: skip
FEEDBACK_COLUMNS = ("request_id", "prompt_index", "ranks", "created")


@dataclass
class CompletionRecord:
    """What differs from one candidate of a prompt to the next."""

    prompt_index: int
    candidate_index: int
    completion: str
    reward: float
    rank: int
    finish_reason: str
    completion_tokens: int
    reward_truncated: bool
    pruned: bool = False
    rewards: dict[str, float] | None = None  # every member's raw reward, by name
    step_rewards: list[float] | None = None  # a process reward model's score of each step
    generated_tokens: int | None = None  # beam search: tokens decoded for this expansion alone


@dataclass
class RequestRecord:
    """One request's candidates, with what they share stored once."""

    request_id: str
    params: dict[str, Any]
    policy: str
    policy_version: str
    reward_model: str
    reward_model_version: str
    created: float
    prompts: list[tuple[str | list[dict[str, Any]], int]]  # (prompt, prompt_tokens) by prompt_index
    completions: list[CompletionRecord]
    replica: str = ""  # which server wrote it, when many write one log
    # Encoded once, when the record is made: its size bounds the queue.
    _params_json: str = field(init=False, repr=False)
    _prompts_json: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        self._params_json = json.dumps(self.params)
        self._prompts_json = [json.dumps(prompt) for prompt, _ in self.prompts]

    @property
    def size(self) -> int:
        """Roughly the bytes it will write."""
        texts = [self._params_json, *self._prompts_json, *(c.completion for c in self.completions)]
        return sum(len(t) for t in texts) + 64 * len(self.completions)

    def request_row(self) -> tuple:
        return (self.request_id, self._params_json, self.policy, self.policy_version, self.reward_model,
                self.reward_model_version, self.created, self.replica)  # fmt: skip

    def prompt_rows(self) -> list[tuple]:
        return [
            (self.request_id, index, text, tokens)
            for index, (text, (_, tokens)) in enumerate(zip(self._prompts_json, self.prompts, strict=True))
        ]

    def completion_rows(self) -> list[tuple]:
        """One row per candidate; booleans as they are (each store adapts them)."""
        return [
            (self.request_id, c.prompt_index, c.candidate_index, c.completion, c.reward, c.rank,
             c.finish_reason, c.completion_tokens, c.reward_truncated, self.created, c.pruned,
             None if c.rewards is None else json.dumps(c.rewards),
             None if c.step_rewards is None else json.dumps(c.step_rewards), c.generated_tokens)
            for c in self.completions
        ]  # fmt: skip


@dataclass
class FeedbackRecord:
    """A client's judgement of one request's candidates (`/v1/feedback`)."""

    request_id: str
    prompt_index: int
    ranks: list[int | None]  # 0 = best, as the candidates' rank
    created: float

    def row(self) -> tuple:
        return (self.request_id, self.prompt_index, json.dumps(self.ranks), self.created)


class Store(Protocol):
    """Where a SampleLog's writer commits: one transaction per `write`, all of it or none."""

    where: str  # for messages: a path, or a URL without its password
    # A record the database refuses for its own content raises one of these; anything else
    # derived from `errors` is the database's own failure (a full disk, a lost connection).
    content_errors: tuple[type[BaseException], ...]
    errors: tuple[type[BaseException], ...]

    def write(self, requests: list[RequestRecord], feedback: list[FeedbackRecord]) -> None: ...

    def candidate_counts(self, request_id: str) -> dict[int, int]: ...

    def close(self) -> None: ...


def decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A `candidates` row as readers get it, from either store: JSON columns decoded, flags bool."""
    record = dict(row)
    record["prompt"] = json.loads(record["prompt"])
    record["params"] = json.loads(record["params"])
    record["reward_truncated"] = bool(record["reward_truncated"])
    record["pruned"] = bool(record["pruned"])
    for column in ("rewards", "step_rewards"):
        record[column] = json.loads(record[column]) if record[column] is not None else None
    return record


def feedback_entry(request_id: str, ranks: str, candidates) -> dict[str, Any]:
    """A feedback row as readers get it: its request's candidates ((prompt, completion) rows, in
    candidate order) attached."""
    candidates = list(candidates)
    return {
        "request_id": request_id,
        "prompt": json.loads(candidates[0][0]) if candidates else None,
        "completions": [completion for _, completion in candidates],
        "ranks": json.loads(ranks),
    }


def table_rows(
    requests: list[RequestRecord], feedback: list[FeedbackRecord], completion: Callable[[str], Any] = str
) -> list[tuple[str, tuple[str, ...], list[tuple]]]:
    """(table, columns, rows) of what one write holds, in the order the tables must be filled;
    `completion` turns a completion's text into what the store keeps (PostgreSQL: its bytes)."""
    at = COMPLETION_COLUMNS.index("completion")
    completions = [row for r in requests for row in r.completion_rows()]
    return [
        ("requests", REQUEST_COLUMNS, [r.request_row() for r in requests]),
        ("prompts", PROMPT_COLUMNS, [row for r in requests for row in r.prompt_rows()]),
        (
            "completions",
            COMPLETION_COLUMNS,
            [(*c[:at], completion(c[at]), *c[at + 1 :]) for c in completions],
        ),
        ("feedback", FEEDBACK_COLUMNS, [f.row() for f in feedback]),
    ]


def records_query(finished_only: bool) -> str:
    """Candidates created in (%s, %s], in the readers' columns; `finished_only` leaves out the
    partial ones (each store its placeholder)."""
    finished = " AND NOT pruned" if finished_only else ""
    return f"SELECT {', '.join(COLUMNS)} FROM candidates WHERE created > %s AND created <= %s{finished}"


FEEDBACK_ROWS = "SELECT request_id, prompt_index, ranks FROM feedback ORDER BY id"

# {prompt_index: candidates} of one request; %s is the request id (each store its placeholder).
CANDIDATE_COUNTS = (
    "SELECT prompt_index, COUNT(*) FROM completions WHERE request_id = %s GROUP BY prompt_index"
)

# The (prompt, completion) rows of one request's prompt, in candidate order.
FEEDBACK_CANDIDATES = (
    "SELECT prompt, completion FROM candidates WHERE request_id = %s AND prompt_index = %s "
    "ORDER BY candidate_index"
)


def canonical_order(record: dict[str, Any]) -> tuple:
    """Records in time order, ties broken by identity: the order every reader returns, so one file,
    a directory of shards and a database holding the same candidates read alike."""
    return (record["created"], record["request_id"], record["prompt_index"], record["candidate_index"])
