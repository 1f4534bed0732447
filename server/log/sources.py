"""Where a candidate log is: a SQLite file, a directory of SQLite shards, or a PostgreSQL URL.

Writers take one location (`open_store`); readers (RAFT, the RM trainer, export, eval) take any
number (`--sample-log` repeated), each a file, a directory of `*.db` shards or a database, and
read them as one log in one order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server.log import sqlite
from server.log.records import Store, canonical_order

# psycopg is imported only where a database is used: importing it costs every `bon` command,
# `--help` included, a third of a second.


def is_postgres(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """A database URL without its password (in the authority or as ?password=)."""
    password = urlsplit(url).password  # as written in the URL (urlsplit does not unquote)
    if password is not None:
        url = url.replace(f":{password}@", ":***@", 1)
    return re.sub(r"([?&])password=[^&]*", r"\1password=***", url)


def shown(location: str | Path) -> str:
    """A location as messages and manifests show it: a database URL without its password."""
    return redacted(str(location)) if is_postgres(location) else str(location)


def is_log(location: str | Path) -> bool:
    """Whether a reader's input names a candidate log (rather than a table of samples)."""
    return is_postgres(location) or Path(location).is_dir() or Path(location).suffix in (".db", ".sqlite")


def open_store(location: str | Path) -> Store:
    """The writer's store at `location`, created or migrated (SampleLogUnusable when it cannot be)."""
    if is_postgres(location):
        from server.log.postgres import PostgresStore

        return PostgresStore(str(location))
    return sqlite.SQLiteStore(Path(location))


Locations = Sequence[str | Path] | str | Path  # one location, or several read as one log


def listed(locations: Locations) -> list[str | Path]:
    return [locations] if isinstance(locations, str | Path) else list(locations)


def expand(locations: Locations) -> list[str | Path]:
    """Each location as the logs it names: a directory gives its `*.db` shards, sorted."""
    out: list[str | Path] = []
    for location in listed(locations):
        if is_postgres(location):
            out.append(str(location))
            continue
        path = Path(location)
        if path.is_dir():
            shards = sorted(path.glob("*.db"))
            if not shards:
                raise FileNotFoundError(f"no candidate log shards (*.db) in directory {path}")
            out += shards
        else:
            out.append(path)
    if not out:
        raise FileNotFoundError("no candidate log given")
    return out


def read_records(
    locations: Locations,
    since: float = float("-inf"),
    until: float = float("inf"),
    finished_only: bool = False,
) -> list[dict[str, Any]]:
    """Candidates created in (since, until], from every log at `locations`, in time order (ties by
    request, prompt and candidate index), JSON columns decoded; `finished_only` leaves out those
    early rejection or beam search pruned (partial texts)."""
    records = []
    for log in expand(locations):
        if is_postgres(log):
            from server.log import postgres

            records += postgres.read_records(str(log), since, until, finished_only)
        else:
            records += sqlite.read_records(Path(log), since, until, finished_only)
    return sorted(records, key=canonical_order)


def read_feedback(locations: Locations) -> list[dict[str, Any]]:
    """Every feedback row of every log, its request's candidates attached."""
    out = []
    for log in expand(locations):
        if is_postgres(log):
            from server.log import postgres

            out += postgres.read_feedback(str(log))
        else:
            out += sqlite.read_feedback(Path(log))
    return out
