"""The candidate log in one SQLite file: the embedded default, one file per server.

WAL mode with synchronous=NORMAL: a committed transaction survives the process being killed
(kill -9) and the file is never left corrupt; only an OS crash or power loss can drop the last
transactions. What a request shares is stored once: its sampling parameters and model identities
in `requests`, each prompt in `prompts`, and only what differs per candidate in `completions`. The
view `candidates` joins them back into one row per candidate, the shape readers see.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

from server.failures import SampleLogUnusable
from server.log.records import (
    CANDIDATE_COUNTS,
    FEEDBACK_CANDIDATES,
    FEEDBACK_ROWS,
    FeedbackRecord,
    RequestRecord,
    decoded,
    feedback_entry,
    records_query,
    table_rows,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    params TEXT NOT NULL,             -- JSON sampling parameters
    policy TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    reward_model TEXT NOT NULL,
    reward_model_version TEXT NOT NULL,
    created REAL NOT NULL,            -- unix time, seconds
    replica TEXT NOT NULL DEFAULT ''  -- the server that wrote it (--replica-id)
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
       c.rewards, c.step_rewards, c.generated_tokens, r.replica
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
    reward_model_version, MIN(created), '' FROM candidates_v1 GROUP BY request_id;
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

# A log written before fleets has no replica column; the view is rebuilt to show it.
ADD_REPLICA = """
ALTER TABLE requests ADD COLUMN replica TEXT NOT NULL DEFAULT '';
DROP VIEW IF EXISTS candidates;
"""

# Each later layout adds columns: (the column that says a log has it, its table, the script, why).
ADDED_COLUMNS = (
    ("pruned", "completions", ADD_PRUNED, "a pruned column for early rejection"),
    ("rewards", "completions", ADD_REWARDS, "a rewards column for several reward models"),
    ("step_rewards", "completions", ADD_STEPS, "step reward columns for process reward models"),
    ("replica", "requests", ADD_REPLICA, "a replica column for many servers writing one log"),
)


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
    for column, table, script, why in ADDED_COLUMNS:
        columns = _columns(connection, table)
        if columns and column not in columns:
            log.info("migrating candidate log %s: %s", path, why)
            connection.executescript(f"BEGIN; {script} COMMIT;")
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
    if kind == ("table",) or any(
        column not in _columns(connection, table) for column, table, _, _ in ADDED_COLUMNS
    ):  # an older layout: migrated (once) before it is read
        connection.close()
        connect(path).close()
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    return connection


def _columns(connection: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}


def read_records(path: Path, since: float, until: float, finished_only: bool) -> list[dict[str, Any]]:
    """Candidates created in (since, until], decoded (`server.log.sources.read_records`).

    The window is applied in SQL (the created index), so a RAFT run reads its window, not the
    whole history of the log.
    """
    connection = _read_only(path)
    try:
        rows = connection.execute(records_query(finished_only).replace("%s", "?"), (since, until)).fetchall()
    finally:
        connection.close()
    return [decoded(dict(row)) for row in rows]


def read_feedback(path: Path) -> list[dict[str, Any]]:
    """Every feedback row with its request's candidates (in candidate order) attached."""
    connection = _read_only(path)
    candidates = FEEDBACK_CANDIDATES.replace("%s", "?")
    try:
        feedback = connection.execute(FEEDBACK_ROWS)
        return [
            feedback_entry(request_id, ranks, connection.execute(candidates, (request_id, index)))
            for request_id, index, ranks in feedback.fetchall()
        ]
    finally:
        connection.close()


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


class SQLiteStore:
    """The writer's side of a SQLite candidate log: one connection, held by the writer thread."""

    content_errors: tuple[type[BaseException], ...] = (
        sqlite3.IntegrityError,
        sqlite3.InterfaceError,
        ValueError,
        TypeError,
        OverflowError,
    )
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.where = str(self.path)
        self._connection = connect(self.path)

    def write(self, requests: list[RequestRecord], feedback: list[FeedbackRecord]) -> None:
        with self._connection:
            for table, columns, rows in table_rows(requests, feedback):
                self._connection.executemany(_insert(table, columns), rows)

    def candidate_counts(self, request_id: str) -> dict[int, int]:
        connection = sqlite3.connect(self.path)
        try:
            return dict(connection.execute(CANDIDATE_COUNTS.replace("%s", "?"), (request_id,)).fetchall())
        finally:
            connection.close()

    def close(self) -> None:
        self._connection.close()
