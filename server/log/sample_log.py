"""The candidate log: every candidate of every request, appended to SQLite off the request path.

SQLite in WAL mode with synchronous=NORMAL: a committed transaction survives the process being
killed (kill -9) and the file is never left corrupt; only an OS crash or power loss can drop the
last transactions. One writer thread drains a queue and commits every half `flush_interval`, so a
request queued just after a commit is committed within `flush_interval` even when the machine is
busy and the commit itself is slow. `close()` (on SIGTERM, via the server's shutdown) writes
everything still queued.

What a request shares is stored once: its sampling parameters and model identities in
`requests`, each prompt in `prompts`, and only what differs per candidate in `completions`. The
view `candidates` joins them back into one row per candidate, the shape readers (RAFT, export,
ad-hoc SQL) see. The queue is bounded in bytes (`max_pending_bytes`): a server waits for room
before it answers (`append_when_room`), so what it has acknowledged is never more than the writer
can commit within the flush interval, whatever the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import metrics
from server.failures import LogBehind, SampleLogUnusable

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    params TEXT NOT NULL,             -- JSON sampling parameters
    policy TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    reward_model TEXT NOT NULL,
    reward_model_version TEXT NOT NULL,
    created REAL NOT NULL             -- unix time, seconds
);
CREATE TABLE IF NOT EXISTS prompts (
    request_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,    -- which prompt of a multi-prompt request
    prompt TEXT NOT NULL,             -- JSON: a string, or the chat messages list
    prompt_tokens INTEGER NOT NULL,
    PRIMARY KEY (request_id, prompt_index)
);
CREATE TABLE IF NOT EXISTS completions (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    candidate_index INTEGER NOT NULL, -- sampling order within its prompt
    completion TEXT NOT NULL,
    reward REAL NOT NULL,
    rank INTEGER NOT NULL,            -- 0 = best of its prompt
    finish_reason TEXT NOT NULL,
    completion_tokens INTEGER NOT NULL,
    reward_truncated INTEGER NOT NULL,
    created REAL NOT NULL,            -- the request's, repeated for the time-window index
    pruned INTEGER NOT NULL DEFAULT 0, -- a partial answer (early rejection, beam search)
    rewards TEXT,                     -- JSON {member: raw reward}; reward is their combination
    step_rewards TEXT,                -- JSON [score per step] from a process reward model
    generated_tokens INTEGER          -- beam search: tokens decoded for this expansion alone
);
CREATE INDEX IF NOT EXISTS completions_request ON completions (request_id);
CREATE INDEX IF NOT EXISTS completions_created ON completions (created);
CREATE VIEW IF NOT EXISTS candidates AS
SELECT c.id, c.request_id, c.prompt_index, c.candidate_index, p.prompt, c.completion, c.reward,
       c.rank, c.finish_reason, r.policy, r.policy_version, r.reward_model, r.reward_model_version,
       r.params, p.prompt_tokens, c.completion_tokens, c.reward_truncated, c.created, c.pruned,
       c.rewards, c.step_rewards, c.generated_tokens
FROM completions c
JOIN prompts p ON p.request_id = c.request_id AND p.prompt_index = c.prompt_index
JOIN requests r ON r.request_id = c.request_id;
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    ranks TEXT NOT NULL,              -- JSON: one rank per candidate index, 0 = best, null = unranked
    created REAL NOT NULL
);
"""

# A log written before prompts and parameters were stored once had `candidates` as a table.
MIGRATION = """
ALTER TABLE candidates RENAME TO candidates_v1;
{schema}
INSERT INTO requests SELECT request_id, params, policy, policy_version, reward_model,
    reward_model_version, MIN(created) FROM candidates_v1 GROUP BY request_id;
INSERT INTO prompts SELECT request_id, prompt_index, prompt, prompt_tokens
    FROM candidates_v1 GROUP BY request_id, prompt_index;
INSERT INTO completions (request_id, prompt_index, candidate_index, completion, reward, rank,
    finish_reason, completion_tokens, reward_truncated, created)
    SELECT request_id, prompt_index, candidate_index, completion, reward, rank, finish_reason,
    completion_tokens, reward_truncated, created FROM candidates_v1 ORDER BY id;
DROP TABLE candidates_v1;
"""

# A log written before early rejection has no pruned column; the view is rebuilt to show it.
ADD_PRUNED = """
ALTER TABLE completions ADD COLUMN pruned INTEGER NOT NULL DEFAULT 0;
DROP VIEW candidates;
"""

# A log written before several reward models has no rewards column; the view is rebuilt to show it.
ADD_REWARDS = """
ALTER TABLE completions ADD COLUMN rewards TEXT;
DROP VIEW IF EXISTS candidates;
"""

# A log written before process reward models has neither step column; the view is rebuilt.
ADD_STEPS = """
ALTER TABLE completions ADD COLUMN step_rewards TEXT;
ALTER TABLE completions ADD COLUMN generated_tokens INTEGER;
DROP VIEW IF EXISTS candidates;
"""

# The columns of one candidate as `read_records` returns it (the `candidates` view, less its id).
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
)


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

    def write(self, connection: sqlite3.Connection) -> None:
        connection.execute(
            "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self.request_id, self._params_json, self.policy, self.policy_version, self.reward_model,
             self.reward_model_version, self.created),
        )  # fmt: skip
        connection.executemany(
            "INSERT INTO prompts VALUES (?, ?, ?, ?)",
            [
                (self.request_id, index, text, tokens)
                for index, (text, (_, tokens)) in enumerate(
                    zip(self._prompts_json, self.prompts, strict=True)
                )
            ],
        )
        connection.executemany(
            "INSERT INTO completions (request_id, prompt_index, candidate_index, completion, reward, "
            "rank, finish_reason, completion_tokens, reward_truncated, created, pruned, rewards, "
            "step_rewards, generated_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (self.request_id, c.prompt_index, c.candidate_index, c.completion, c.reward, c.rank,
                 c.finish_reason, c.completion_tokens, int(c.reward_truncated), self.created,
                 int(c.pruned), None if c.rewards is None else json.dumps(c.rewards),
                 None if c.step_rewards is None else json.dumps(c.step_rewards), c.generated_tokens)
                for c in self.completions
            ],
        )  # fmt: skip


@dataclass
class FeedbackRecord:
    """A client's judgement of one request's candidates (`/v1/feedback`)."""

    request_id: str
    prompt_index: int
    ranks: list[int | None]  # 0 = best, as the candidates' rank
    created: float


@contextlib.contextmanager
def sqlite_file(path: Path):
    """SQLite's errors on opening `path` as one line naming it (SampleLogUnusable)."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        raise SampleLogUnusable(f"{path}: not a candidate log bon can use ({error})") from None


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating, or migrating from the first layout, if needed) a candidate log in WAL mode."""
    with sqlite_file(path):
        return _connect(path)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    kind = connection.execute("SELECT type FROM sqlite_master WHERE name = 'candidates'").fetchone()
    if kind == ("table",):
        log.info("migrating candidate log %s: prompts and parameters stored once per request", path)
        connection.executescript(f"BEGIN; {MIGRATION.format(schema=SCHEMA)} COMMIT;")
    columns = {row[1] for row in connection.execute("PRAGMA table_info(completions)")}
    if columns and "pruned" not in columns:
        log.info("migrating candidate log %s: a pruned column for early rejection", path)
        connection.executescript(f"BEGIN; {ADD_PRUNED} COMMIT;")
        columns.add("pruned")
    if columns and "rewards" not in columns:
        log.info("migrating candidate log %s: a rewards column for several reward models", path)
        connection.executescript(f"BEGIN; {ADD_REWARDS} COMMIT;")
    if columns and "step_rewards" not in columns:
        log.info("migrating candidate log %s: step reward columns for process reward models", path)
        connection.executescript(f"BEGIN; {ADD_STEPS} COMMIT;")
    connection.executescript(SCHEMA)
    return connection


def _read_only(path: Path) -> sqlite3.Connection:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no candidate log at {path}")
    with sqlite_file(path):
        return _open_read_only(path)


def _open_read_only(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    kind = connection.execute("SELECT type FROM sqlite_master WHERE name = 'candidates'").fetchone()
    columns = {row[1] for row in connection.execute("PRAGMA table_info(completions)")}
    if (
        kind == ("table",) or not {"pruned", "rewards", "step_rewards"} <= columns
    ):  # an older layout: migrated (once) before it is read
        connection.close()
        connect(path).close()
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    return connection


def read_records(
    path: Path, since: float = float("-inf"), until: float = float("inf"), finished_only: bool = False
) -> list[dict[str, Any]]:
    """Candidates created in (since, until], in insertion order, JSON columns decoded;
    `finished_only` leaves out those early rejection pruned (partial texts).

    The window is applied in SQL (the created index), so a RAFT run reads its window, not the
    whole history of the log.
    """
    connection = _read_only(path)
    finished = " AND pruned = 0" if finished_only else ""
    try:
        rows = connection.execute(
            f"SELECT {', '.join(COLUMNS)} FROM candidates WHERE created > ? AND created <= ?{finished} "
            "ORDER BY id",
            (since, until),
        ).fetchall()
    finally:
        connection.close()
    records = []
    for row in rows:
        record = dict(row)
        record["prompt"] = json.loads(record["prompt"])
        record["params"] = json.loads(record["params"])
        record["reward_truncated"] = bool(record["reward_truncated"])
        record["pruned"] = bool(record["pruned"])
        for column in ("rewards", "step_rewards"):
            record[column] = json.loads(record[column]) if record[column] is not None else None
        records.append(record)
    return records


def read_feedback(path: Path) -> list[dict[str, Any]]:
    """Every feedback row with its request's candidates (in candidate order) attached."""
    connection = _read_only(path)
    try:
        feedback = connection.execute(
            "SELECT request_id, prompt_index, ranks FROM feedback ORDER BY id"
        ).fetchall()
        out = []
        for request_id, prompt_index, ranks in feedback:
            candidates = connection.execute(
                "SELECT prompt, completion FROM candidates WHERE request_id = ? AND prompt_index = ? "
                "ORDER BY candidate_index",
                (request_id, prompt_index),
            ).fetchall()
            out.append(
                {
                    "request_id": request_id,
                    "prompt": json.loads(candidates[0][0]) if candidates else None,
                    "completions": [c[1] for c in candidates],
                    "ranks": json.loads(ranks),
                }
            )
    finally:
        connection.close()
    return out


class SampleLog:
    """Queue-fed SQLite writer; appending never waits on the disk.

    Queue items: a RequestRecord (committed whole, never split), a FeedbackRecord, a
    threading.Event (a flush barrier, set once everything before it is committed), or None (stop).

    A commit that fails for the database's sake (a full disk, an I/O error) is never forgotten:
    its records stay pending and are retried, and while the log cannot commit, `failing` says why
    and servers stop acknowledging (`append_when_room` raises LogBehind, /ready answers 503). A
    record the database refuses for its own content is written alone, so it cannot take its
    neighbours down, and dropped with an error if it fails alone.
    """

    def __init__(
        self,
        path: Path,
        flush_interval: float = 0.5,
        max_pending_bytes: int = 64 * 2**20,
        retry_seconds: float = 0.5,
        close_seconds: float = 5.0,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._commit_every = flush_interval / 2  # the other half is the commit's own time
        self._max_pending_bytes = max_pending_bytes
        self._retry_seconds = retry_seconds  # between tries of a commit that failed
        self._close_seconds = close_seconds  # how long `close` keeps retrying before it gives up
        self._pending_bytes = 0  # queued and not yet committed
        self._pending_lock = threading.Lock()
        self.failing: str | None = None  # why the last commit failed; None once one succeeds
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._connection = connect(self.path)
        metrics.LOG_HEALTHY.set(1)
        self._thread = threading.Thread(target=self._write_loop, name="bon-sample-log", daemon=True)
        self._thread.start()

    def append(self, request: RequestRecord) -> None:
        """Queue a request's candidates, however full the queue is (offline writers, tests)."""
        with self._pending_lock:
            self._pending_bytes += request.size
        self._queue.put(request)
        metrics.LOG_QUEUE.inc(len(request.completions))

    def check(self) -> None:
        """LogBehind while the log cannot commit (a full disk): nothing more may be acknowledged."""
        if self.failing is not None:
            raise LogBehind(
                f"the candidate log cannot commit ({self.failing}); it keeps what it holds and "
                "retries, and takes no new requests until a commit succeeds"
            )

    async def append_when_room(self, request: RequestRecord, wait_seconds: float) -> None:
        """Queue a request's candidates once the queue has room for them; LogBehind if it has none
        within `wait_seconds`, or the log cannot commit at all (the request then fails rather than
        being acknowledged unlogged)."""
        deadline = time.monotonic() + wait_seconds
        self.check()
        while self._pending_bytes and self._pending_bytes + request.size > self._max_pending_bytes:
            if time.monotonic() > deadline:
                raise LogBehind(
                    f"the candidate log is {self._pending_bytes} bytes behind and cannot take this "
                    f"request's {request.size} in time; retry shortly"
                )
            await asyncio.sleep(0.01)
            self.check()
        self.append(request)

    def append_feedback(self, feedback: FeedbackRecord) -> None:
        self.check()
        self._queue.put(feedback)

    def flush(self) -> None:
        """Block until everything appended so far is committed."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def candidate_counts(self, request_id: str) -> dict[int, int]:
        """{prompt_index: number of candidates} of a logged request (after a flush)."""
        self.check()  # a flush would wait for the disk to come back
        self.flush()
        connection = sqlite3.connect(self.path)
        try:
            rows = connection.execute(
                "SELECT prompt_index, COUNT(*) FROM completions WHERE request_id = ? GROUP BY prompt_index",
                (request_id,),
            ).fetchall()
        finally:
            connection.close()
        return dict(rows)

    def close(self) -> None:
        """Write everything queued, then stop the writer (retrying a failing commit for at most
        `close_seconds`)."""
        self._queue.put(None)
        self._thread.join()
        self._connection.close()

    def _write_loop(self) -> None:
        pending: list = []
        pending_bytes = 0
        barriers: list[threading.Event] = []
        deadline = time.monotonic() + self._commit_every
        retry_at = 0.0  # after a failed commit, the next try waits until then
        stop_by: float | None = None  # set on close: the last moment to keep retrying
        while stop_by is None or pending:
            now = time.monotonic()
            wait = max(deadline, retry_at) if pending else deadline
            try:
                item = self._queue.get(timeout=max(0.0, wait - now) if stop_by is None else 0.05)
                if item is None:
                    stop_by = time.monotonic() + self._close_seconds
                elif isinstance(item, threading.Event):
                    barriers.append(item)
                else:
                    pending.append(item)
                    pending_bytes += item.size if isinstance(item, RequestRecord) else 0
            except queue.Empty:
                pass
            now = time.monotonic()
            # Big payloads commit early: a commit never has more than a few MB to write.
            due = stop_by is not None or barriers or now >= deadline or pending_bytes >= 4 * 2**20
            if pending and due and now >= retry_at:
                pending = self._commit(pending)
                pending_bytes = sum(i.size for i in pending if isinstance(i, RequestRecord))
                retry_at = time.monotonic() + self._retry_seconds if pending else 0.0
            if stop_by is not None and pending and time.monotonic() > stop_by:
                self._lose(pending, f"still failing when the server stopped ({self.failing})")
                pending = []
            if not pending:  # a barrier means "everything before me is committed"
                for barrier in barriers:
                    barrier.set()
                barriers = []
            if now >= deadline:
                deadline = time.monotonic() + self._commit_every
        for barrier in barriers:
            barrier.set()

    def _write(self, items: list) -> None:
        """Write `items` in one transaction: all of them or none."""
        requests = [i for i in items if isinstance(i, RequestRecord)]
        feedback = [i for i in items if isinstance(i, FeedbackRecord)]
        with self._connection:
            for request in requests:
                request.write(self._connection)
            self._connection.executemany(
                "INSERT INTO feedback (request_id, prompt_index, ranks, created) VALUES (?, ?, ?, ?)",
                [(f.request_id, f.prompt_index, json.dumps(f.ranks), f.created) for f in feedback],
            )

    def _commit(self, items: list) -> list:
        """Commit `items`; return those still to write (all of them when the database failed)."""
        try:
            self._write(items)
        except (sqlite3.IntegrityError, sqlite3.InterfaceError, ValueError, TypeError, OverflowError):
            # The content of some record, not the database: each goes alone, so one bad record
            # costs only itself.
            if len(items) == 1:
                self._lose(items, "the database refused its content")
                return []
            return [kept for item in items for kept in self._commit([item])]
        except sqlite3.Error as error:
            if self.failing is None:
                log.error(
                    "candidate log commit failed (%s); keeping %d records in memory and retrying every "
                    "%.1f s; new requests get 503 log_behind until a commit succeeds",
                    error, len(items), self._retry_seconds,
                )  # fmt: skip
            self.failing = str(error)
            metrics.LOG_ERRORS.inc()
            metrics.LOG_HEALTHY.set(0)
            return items
        if self.failing is not None:
            log.warning("candidate log commits again (it failed with: %s); nothing was lost", self.failing)
            self.failing = None
            metrics.LOG_HEALTHY.set(1)
        self._done(items, written=True)
        return []

    def _lose(self, items: list, why: str) -> None:
        candidates = sum(len(i.completions) for i in items if isinstance(i, RequestRecord))
        log.error(
            "candidate log: %d records (%d candidates) could not be written and are lost: %s",
            len(items), candidates, why,
        )  # fmt: skip
        metrics.LOG_LOST.inc(candidates)
        self._done(items, written=False)

    def _done(self, items: list, written: bool) -> None:
        requests = [i for i in items if isinstance(i, RequestRecord)]
        candidates = sum(len(r.completions) for r in requests)
        if written:
            metrics.LOG_WRITTEN.inc(candidates)
        metrics.LOG_QUEUE.dec(candidates)
        with self._pending_lock:
            self._pending_bytes -= sum(r.size for r in requests)
