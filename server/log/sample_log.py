"""The candidate log: every candidate of every request, appended to SQLite off the request path.

SQLite in WAL mode with synchronous=NORMAL: a committed transaction survives the process being
killed (kill -9) and the file is never left corrupt; only an OS crash or power loss can drop the
last transactions. One writer thread drains a queue and commits at least every `flush_interval`
seconds, so a crash loses at most that much. `close()` (on SIGTERM, via the server's shutdown)
writes everything still queued before returning.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from server import metrics

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,    -- which prompt of a multi-prompt request
    candidate_index INTEGER NOT NULL, -- sampling order within its prompt
    prompt TEXT NOT NULL,             -- JSON: a string, or the chat messages list
    completion TEXT NOT NULL,
    reward REAL NOT NULL,
    rank INTEGER NOT NULL,            -- 0 = best of its prompt
    finish_reason TEXT NOT NULL,
    policy TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    reward_model TEXT NOT NULL,
    reward_model_version TEXT NOT NULL,
    params TEXT NOT NULL,             -- JSON sampling parameters
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    reward_truncated INTEGER NOT NULL,
    created REAL NOT NULL             -- unix time, seconds
);
CREATE INDEX IF NOT EXISTS candidates_request ON candidates (request_id);
CREATE INDEX IF NOT EXISTS candidates_created ON candidates (created);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    ranks TEXT NOT NULL,              -- JSON: one rank per candidate index, 1 = best, null = unranked
    created REAL NOT NULL
);
"""


@dataclass
class CandidateRecord:
    request_id: str
    prompt_index: int
    candidate_index: int
    prompt: str | list[dict[str, Any]]
    completion: str
    reward: float
    rank: int
    finish_reason: str
    policy: str
    policy_version: str
    reward_model: str
    reward_model_version: str
    params: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    reward_truncated: bool
    created: float

    def row(self) -> tuple:
        values = asdict(self)
        values["prompt"] = json.dumps(self.prompt)
        values["params"] = json.dumps(self.params)
        values["reward_truncated"] = int(self.reward_truncated)
        return tuple(values[name] for name in COLUMNS)


COLUMNS = tuple(CandidateRecord.__dataclass_fields__)


@dataclass
class FeedbackRecord:
    """A client's judgement of one request's candidates (`/v1/feedback`)."""

    request_id: str
    prompt_index: int
    ranks: list[float | None]
    created: float


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a candidate log in WAL mode."""
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA)
    return connection


def read_records(
    path: Path, since: float = float("-inf"), until: float = float("inf")
) -> list[dict[str, Any]]:
    """Candidates created in (since, until], in insertion order, JSON columns decoded.

    The window is applied in SQL (the created index), so a RAFT run reads its window, not the
    whole history of the log.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no candidate log at {path}")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        rows = connection.execute(
            f"SELECT {', '.join(COLUMNS)} FROM candidates WHERE created > ? AND created <= ? ORDER BY id",
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
        records.append(record)
    return records


def read_feedback(path: Path) -> list[dict[str, Any]]:
    """Every feedback row with its request's candidates (in candidate order) attached."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
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
    """Queue-fed SQLite writer; `append` never blocks the request path on disk.

    Queue items: a list of one request's records (committed together, never split), a
    FeedbackRecord, a threading.Event (a flush barrier, set once everything before it is
    committed), or None (stop).
    """

    def __init__(self, path: Path, flush_interval: float = 0.5):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._flush_interval = flush_interval
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._connection = connect(self.path)
        self._thread = threading.Thread(target=self._write_loop, name="bon-sample-log", daemon=True)
        self._thread.start()

    def append(self, records: list[CandidateRecord]) -> None:
        self._queue.put(records)
        metrics.LOG_QUEUE.inc(len(records))

    def append_feedback(self, feedback: FeedbackRecord) -> None:
        self._queue.put(feedback)

    def flush(self) -> None:
        """Block until everything appended so far is committed."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def candidate_counts(self, request_id: str) -> dict[int, int]:
        """{prompt_index: number of candidates} of a logged request (after a flush)."""
        self.flush()
        connection = sqlite3.connect(self.path)
        try:
            rows = connection.execute(
                "SELECT prompt_index, COUNT(*) FROM candidates WHERE request_id = ? GROUP BY prompt_index",
                (request_id,),
            ).fetchall()
        finally:
            connection.close()
        return dict(rows)

    def close(self) -> None:
        """Write everything queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join()
        self._connection.close()

    def _write_loop(self) -> None:
        pending: list = []
        barriers: list[threading.Event] = []
        deadline = time.monotonic() + self._flush_interval
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                if item is None:
                    stopping = True
                elif isinstance(item, threading.Event):
                    barriers.append(item)
                else:
                    pending.append(item)
            except queue.Empty:
                pass
            due = stopping or barriers or time.monotonic() >= deadline or len(pending) >= 1024
            if pending and due:
                self._commit(pending)
                pending = []
            for barrier in barriers:
                barrier.set()
            barriers = []
            if time.monotonic() >= deadline:
                deadline = time.monotonic() + self._flush_interval

    def _commit(self, items: list) -> None:
        requests = [i for i in items if isinstance(i, list)]
        feedback = [i for i in items if isinstance(i, FeedbackRecord)]
        records = [r.row() for request in requests for r in request]
        placeholders = ", ".join("?" for _ in COLUMNS)
        try:
            with self._connection:  # one transaction: all of these or none
                self._connection.executemany(
                    f"INSERT INTO candidates ({', '.join(COLUMNS)}) VALUES ({placeholders})", records
                )
                self._connection.executemany(
                    "INSERT INTO feedback (request_id, prompt_index, ranks, created) VALUES (?, ?, ?, ?)",
                    [(f.request_id, f.prompt_index, json.dumps(f.ranks), f.created) for f in feedback],
                )
            metrics.LOG_WRITTEN.inc(len(records))
        except sqlite3.Error:
            log.exception("candidate log write failed; %d records lost", len(records))
            metrics.LOG_ERRORS.inc()
        finally:
            metrics.LOG_QUEUE.dec(len(records))
