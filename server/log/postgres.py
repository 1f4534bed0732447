"""The candidate log in PostgreSQL: one database that every replica of a fleet writes.

The same tables and view as the SQLite log (`server/log/sqlite.py`), with two differences a reader
never sees: a completion is stored as its UTF-8 bytes (`bytea`), because PostgreSQL's `text`
refuses the NUL character a policy can write and the log keeps every candidate exactly; and the
flags are booleans. Ad-hoc SQL reads a completion with `convert_from(completion, 'UTF8')`.

bon connects as an ordinary role that owns its database, never a superuser, and creates or
migrates the tables at start as that owner; an advisory lock keeps replicas starting together
from migrating at once. Each flush is one transaction of bulk COPYs. A lost connection (the
database restarting) is the writer's to survive: the store reconnects on the next try.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg.rows import dict_row

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
from server.log.sources import redacted

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    params TEXT NOT NULL,                   -- JSON sampling parameters
    policy TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    reward_model TEXT NOT NULL,
    reward_model_version TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,      -- unix time, seconds
    replica TEXT NOT NULL DEFAULT ''        -- the server that wrote it (--replica-id)
);
CREATE TABLE IF NOT EXISTS prompts (
    request_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    prompt TEXT NOT NULL,                   -- JSON: a string, or the chat messages list
    prompt_tokens INTEGER NOT NULL,
    PRIMARY KEY (request_id, prompt_index)
);
CREATE TABLE IF NOT EXISTS completions (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    candidate_index INTEGER NOT NULL,
    completion BYTEA NOT NULL,              -- UTF-8: text cannot hold NUL, a policy can write it
    reward DOUBLE PRECISION NOT NULL,
    rank INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    completion_tokens INTEGER NOT NULL,
    reward_truncated BOOLEAN NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    pruned BOOLEAN NOT NULL DEFAULT FALSE,
    rewards TEXT,                           -- JSON {member: raw reward}
    step_rewards TEXT,                      -- JSON [score per step]
    generated_tokens INTEGER
);
CREATE INDEX IF NOT EXISTS completions_request ON completions (request_id);
CREATE INDEX IF NOT EXISTS completions_created ON completions (created);
CREATE OR REPLACE VIEW candidates AS
SELECT c.id, c.request_id, c.prompt_index, c.candidate_index, p.prompt, c.completion, c.reward,
       c.rank, c.finish_reason, r.policy, r.policy_version, r.reward_model, r.reward_model_version,
       r.params, p.prompt_tokens, c.completion_tokens, c.reward_truncated, c.created, c.pruned,
       c.rewards, c.step_rewards, c.generated_tokens, r.replica
FROM completions c
JOIN prompts p ON p.request_id = c.request_id AND p.prompt_index = c.prompt_index
JOIN requests r ON r.request_id = c.request_id;
CREATE TABLE IF NOT EXISTS feedback (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id TEXT NOT NULL,
    prompt_index INTEGER NOT NULL,
    ranks TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
"""

CONNECTION: dict[str, Any] = {"connect_timeout": 10, "application_name": "bon"}
MIGRATION_LOCK = 0x626F6E  # "bon": replicas starting together take turns at the schema


def _utf8(text: str) -> bytes:
    return text.encode("utf-8")


def _text(data: bytes) -> str:
    return bytes(data).decode("utf-8")


def _connect(url: str, **options: Any) -> psycopg.Connection:
    try:
        return psycopg.connect(url, **CONNECTION, **options)
    except psycopg.Error as error:
        raise SampleLogUnusable(f"{redacted(url)}: cannot connect ({str(error).strip()})") from None


def prepare(url: str) -> psycopg.Connection:
    """A connection for the writer: refused to a superuser, with the tables made or migrated."""
    connection = _connect(url, autocommit=True)
    row = connection.execute(
        "SELECT rolsuper, pg_get_userbyid(datdba) = current_user, current_database() "
        "FROM pg_roles, pg_database WHERE rolname = current_user AND datname = current_database()"
    ).fetchone()
    superuser, owner, database = row if row is not None else (False, False, "?")
    role = connection.info.user
    if superuser:
        connection.close()
        raise SampleLogUnusable(
            f"{redacted(url)}: role {role} is a superuser; bon writes as an ordinary role that owns "
            f"its database (CREATE ROLE bon LOGIN PASSWORD '...'; CREATE DATABASE bon OWNER bon)"
        )
    if not owner:
        connection.close()
        raise SampleLogUnusable(
            f"{redacted(url)}: role {role} does not own database {database}; bon creates and migrates "
            f"its tables as the owner (ALTER DATABASE {database} OWNER TO {role})"
        )
    try:
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            connection.execute(SCHEMA)  # no parameters: several statements in one go
    except psycopg.Error as error:
        connection.close()
        raise SampleLogUnusable(f"{redacted(url)}: cannot create the log's tables ({error})") from None
    return connection


class PostgresStore:
    """The writer's side of a PostgreSQL candidate log: one connection, remade after a loss."""

    # Refused for its content (a NUL in a text column, a duplicate id, a value out of range);
    # every other error is the database's (a restart, a full disk) and the records are retried.
    content_errors: tuple[type[BaseException], ...] = (
        psycopg.DataError,
        psycopg.IntegrityError,
        ValueError,
        TypeError,
        OverflowError,
    )
    errors: tuple[type[BaseException], ...] = (psycopg.Error,)

    def __init__(self, url: str):
        self.url = url
        self.where = redacted(url)
        self._connection: psycopg.Connection | None = prepare(url)

    def _live(self) -> psycopg.Connection:
        if self._connection is None or self._connection.closed or self._connection.broken:
            # psycopg's own errors here: a database still down is the writer's to retry.
            self._connection = psycopg.connect(self.url, **CONNECTION)
        return self._connection

    def write(self, requests: list[RequestRecord], feedback: list[FeedbackRecord]) -> None:
        tables = table_rows(requests, feedback, completion=_utf8)
        try:
            connection = self._live()
            with connection.transaction(), connection.cursor() as cursor:
                for table, columns, rows in tables:
                    if rows:
                        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                            for row in rows:
                                copy.write_row(row)
        except psycopg.OperationalError:
            self._drop()
            raise

    def candidate_counts(self, request_id: str) -> dict[int, int]:
        if "\x00" in request_id:  # text cannot hold it, so no logged request has it
            return {}
        with _connect(self.url) as connection:
            return dict(connection.execute(CANDIDATE_COUNTS, (request_id,)).fetchall())

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None

    def close(self) -> None:
        self._drop()


def _read_connection(url: str) -> psycopg.Connection[dict[str, Any]]:
    connection = _connect(url)
    [exists] = connection.execute("SELECT to_regclass('candidates') IS NOT NULL").fetchone() or [False]
    if not exists:
        connection.close()
        raise FileNotFoundError(f"no candidate log in {redacted(url)} (it has no candidates view)")
    connection.row_factory = dict_row  # type: ignore[assignment]
    return connection  # type: ignore[return-value]


def read_records(url: str, since: float, until: float, finished_only: bool) -> list[dict[str, Any]]:
    """Candidates created in (since, until], decoded as the SQLite log's are."""
    with _read_connection(url) as connection:
        rows = connection.execute(records_query(finished_only), (since, until)).fetchall()
    return [decoded({**row, "completion": _text(row["completion"])}) for row in rows]


def read_feedback(url: str) -> list[dict[str, Any]]:
    """Every feedback row with its request's candidates (in candidate order) attached."""
    with _read_connection(url) as connection:
        feedback = connection.execute(FEEDBACK_ROWS)
        out = []
        for row in feedback.fetchall():
            candidates = connection.execute(
                FEEDBACK_CANDIDATES, (row["request_id"], row["prompt_index"])
            ).fetchall()
            pairs = [(c["prompt"], _text(c["completion"])) for c in candidates]
            out.append(feedback_entry(row["request_id"], row["ranks"], pairs))
    return out
