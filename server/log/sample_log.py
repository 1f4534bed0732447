"""The candidate log's writer: every candidate of every request, appended off the request path.

One writer thread drains a queue and commits every half `flush_interval`, so a request queued just
after a commit is committed within `flush_interval` even when the machine is busy and the commit
itself is slow. `close()` (on SIGTERM, via the server's shutdown) writes everything still queued.
The queue is bounded in bytes (`max_pending_bytes`): a server waits for room before it answers
(`append_when_room`), so what it has acknowledged is never more than the writer can commit within
the flush interval, whatever the payload.

Where it commits is a store: a SQLite file (`server/log/sqlite.py`, the default) or a PostgreSQL
database many servers share (`server/log/postgres.py`); `open_store` picks by the location.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from pathlib import Path

from server import metrics
from server.failures import LogBehind
from server.log.records import FeedbackRecord, RequestRecord, Store
from server.log.sources import open_store

log = logging.getLogger(__name__)


class SampleLog:
    """Queue-fed writer; appending never waits on the disk or the database.

    Queue items: a RequestRecord (committed whole, never split), a FeedbackRecord, a
    threading.Event (a flush barrier, set once everything before it is committed), or None (stop).

    A commit that fails for the database's sake (a full disk, an I/O error, a database restarting)
    is never forgotten: its records stay pending and are retried, and while the log cannot commit,
    `failing` says why and servers stop acknowledging (`append_when_room` raises LogBehind, /ready
    answers 503). A record the database refuses for its own content is written alone, so it cannot take its
    neighbours down, and dropped with an error if it fails alone.
    """

    def __init__(
        self,
        location: str | Path,
        flush_interval: float = 0.5,
        max_pending_bytes: int = 64 * 2**20,
        retry_seconds: float = 0.5,
        close_seconds: float = 5.0,
        replica: str = "",
    ):
        self._commit_every = flush_interval / 2  # the other half is the commit's own time
        self._max_pending_bytes = max_pending_bytes
        self._retry_seconds = retry_seconds  # between tries of a commit that failed
        self._close_seconds = close_seconds  # how long `close` keeps retrying before it gives up
        self._pending_bytes = 0  # queued and not yet committed
        self._pending_lock = threading.Lock()
        self.failing: str | None = None  # why the last commit failed; None once one succeeds
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.replica = replica  # stamped on every request it writes
        self._store: Store = open_store(location)
        self.where = self._store.where  # for messages: never a password
        metrics.LOG_HEALTHY.set(1)
        self._thread = threading.Thread(target=self._write_loop, name="bon-sample-log", daemon=True)
        self._thread.start()

    def append(self, request: RequestRecord) -> None:
        """Queue a request's candidates, however full the queue is (offline writers, tests)."""
        request.replica = request.replica or self.replica
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
        return self._store.candidate_counts(request_id)

    def close(self) -> None:
        """Write everything queued, then stop the writer (retrying a failing commit for at most
        `close_seconds`)."""
        self._queue.put(None)
        self._thread.join()
        self._store.close()

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

    def _commit(self, items: list) -> list:
        """Commit `items`; return those still to write (all of them when the database failed)."""
        try:
            self._store.write(
                [i for i in items if isinstance(i, RequestRecord)],
                [i for i in items if isinstance(i, FeedbackRecord)],
            )
        except self._store.content_errors:
            # The content of some record, not the database: each goes alone, so one bad record
            # costs only itself.
            if len(items) == 1:
                self._lose(items, "the database refused its content")
                return []
            return [kept for item in items for kept in self._commit([item])]
        except self._store.errors as error:
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
