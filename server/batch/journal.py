"""Crash-safe, resumable output of a windowed batch job, for one process or many.

Process `rank` of `world` takes windows rank, rank + world, ... of the input. It appends each
finished window's rows to its part file (`OUTPUT.part<rank>`, JSONL), fsyncs it, then appends one
line to its journal (`OUTPUT.journal<rank>`) saying which window ended where. Whatever the part
file holds past the journal's last entry is a window cut off by a crash: `--resume` truncates it
and does that window again. When every process has finished, rank 0 merges the parts window by
window, in input order, into a temporary file that is renamed to OUTPUT: the output appears
whole or not at all.

The journal's first line records what the job is (input, its size and mtime, window size,
processes, model): resuming with anything else would mix two jobs' rows, and is refused. Each
window's line carries the byte length and SHA-256 of its rows: `--resume` checks the part file
against them and does again every window from the first one that does not match (a part file cut
short, or edited). A lock held for the job's life keeps a second run off the same files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from server.batch.tables import BadInput, TableWriter

log = logging.getLogger(__name__)


@dataclass
class Window:
    index: int
    lines: int  # rows written for it (skipped bad rows are not)
    end: int  # byte offset in the part file just past its rows
    skipped: int
    sha256: str = ""  # of its rows' bytes in the part file

    def matches(self, data: bytes) -> bool:
        return data.count(b"\n") == self.lines and hashlib.sha256(data).hexdigest() == self.sha256


def job_identity(input_path: Path, **settings: Any) -> dict[str, Any]:
    stat = input_path.stat()
    return {"input": str(input_path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime, **settings}


def _line(entry: dict[str, Any]) -> str:
    """One journal line."""
    return json.dumps(entry) + "\n"


def _fsync_append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Journal:
    def __init__(self, output: Path, rank: int, world: int, identity: dict[str, Any]):
        self.output, self.rank, self.world, self.identity = output, rank, world, identity
        self.part = self._part(rank)
        self.journal = self._journal(rank)
        self.windows: list[Window] = []
        self.started_here = False  # whether this run created the files (its failure removes them)
        self._lock_file: Path | None = None
        self._lock_handle: IO[str] | None = None  # the open lock file, held until `unlock`

    def _part(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.part{rank}")

    def _journal(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.journal{rank}")

    def leftovers(self) -> list[Path]:
        """Files an unfinished run of a job writing OUTPUT left behind (any process count)."""
        return sorted(self.output.parent.glob(f"{self.output.name}.part*")) + sorted(
            self.output.parent.glob(f"{self.output.name}.journal*")
        )

    def _lock(self) -> None:
        """Hold this process's lock on OUTPUT until it exits; BadInput naming the holder if another
        run has it (two runs on one output wrote 4,000 lines with 2,200 unique ids)."""
        path = self.output.with_name(f".{self.output.name}.lock{self.rank}")
        while True:
            handle = path.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise BadInput(
                    f"{self.output} is being written by {holder}; wait for that run to end or stop it"
                ) from None
            if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()  # the previous holder removed the file as we opened it: lock the new one
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        handle.flush()
        self._lock_file, self._lock_handle = path, handle

    def unlock(self) -> None:
        if self._lock_file is not None and self._lock_handle is not None:
            self._lock_file.unlink(missing_ok=True)
            self._lock_handle.close()
            self._lock_handle = None

    def open(self, resume: bool) -> int:
        """Start, or pick up where the journal ends; returns the last finished window (-1: none)."""
        self._lock()
        if not resume:
            if self.output.exists():
                raise BadInput(f"{self.output} exists; remove it or write elsewhere")
            # This process's own files only: the other processes of this run are creating theirs.
            if self.journal.exists():
                raise BadInput(
                    f"an unfinished job left {self.journal} and {self.part}: pass --resume to "
                    "finish it, or delete OUTPUT.part*/journal* to start again"
                )
        if self.journal.exists():
            self._drop_torn_line()
        entries = self._entries(self.rank) if self.journal.exists() else []
        if not entries:  # nothing yet, or killed before the journal's first line
            self.started_here = not resume
            self.part.write_bytes(b"")
            self.journal.unlink(missing_ok=True)
            _fsync_append(self.journal, _line({"job": self.identity}).encode())
            return -1
        if entries[0].get("job") != self.identity:
            raise BadInput(
                f"{self.journal} belongs to another job ({entries[0].get('job')}); resume with the same "
                "input, flags and process count, or delete the OUTPUT.part*/journal* files"
            )
        self.windows = self._verified(self._finished(self.rank))
        end = self.windows[-1].end if self.windows else 0
        with self.part.open("r+b") as f:  # drop a window cut off by the crash
            f.truncate(end)
        return self.windows[-1].index if self.windows else -1

    def _verified(self, windows: list[Window]) -> list[Window]:
        """The windows whose rows the part file holds as the journal describes them; from the first
        that does not match, the windows are done again (the journal is rewritten without them)."""
        good: list[Window] = []
        with self.part.open("rb") as f:
            for window in windows:
                start = good[-1].end if good else 0
                f.seek(start)
                if window.end < start or not window.matches(f.read(window.end - start)):
                    log.warning(
                        "%s does not hold window %d as %s records it (cut short or changed): doing "
                        "it and the %d windows after it again",
                        self.part, window.index, self.journal, len(windows) - len(good) - 1,
                    )  # fmt: skip
                    break
                good.append(window)
        if len(good) < len(windows):
            lines = [{"job": self.identity}, *({"window": w.__dict__} for w in good)]
            staging = self.journal.with_name(self.journal.name + ".rewrite")
            staging.write_text("".join(map(_line, lines)))
            os.replace(staging, self.journal)
        return good

    def _drop_torn_line(self) -> None:
        """Cut this process's journal after its last whole line. A crash mid-write leaves part of
        a line, and lines appended after it would join it and be unreadable."""
        whole = 0
        for line in self.journal.read_bytes().splitlines(keepends=True):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                break
            whole += len(line)
        with self.journal.open("r+b") as f:
            f.truncate(whole)

    def _entries(self, rank: int) -> list[dict[str, Any]]:
        entries = []
        for line in self._journal(rank).read_bytes().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut off by the crash: its window is not done
        return entries

    def _finished(self, rank: int) -> list[Window]:
        """The windows process `rank` has written, in order."""
        return [Window(**e["window"]) for e in self._entries(rank) if "window" in e]

    def append(self, index: int, records: list[dict[str, Any]], skipped: int) -> None:
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        _fsync_append(self.part, data)
        end = (self.windows[-1].end if self.windows else 0) + len(data)
        window = Window(index, len(records), end, skipped, hashlib.sha256(data).hexdigest())
        _fsync_append(self.journal, _line({"window": window.__dict__}).encode())
        self.windows.append(window)

    def finish(self, total_windows: int) -> None:
        _fsync_append(self.journal, _line({"done": total_windows}).encode())

    def _done(self, rank: int) -> int | None:
        path = self._journal(rank)
        if not path.exists():
            return None
        return next((e["done"] for e in self._entries(rank) if "done" in e), None)

    def wait_for_all(self, poll_seconds: float = 1.0) -> int:
        """Rank 0: block until every process has finished its windows; returns the window count."""
        while True:
            done = [self._done(rank) for rank in range(self.world)]
            if done[0] is not None and all(d is not None for d in done):
                return done[0]
            time.sleep(poll_seconds)

    def merged_records(self, total_windows: int) -> Iterator[list[dict[str, Any]]]:
        """Every process's rows, window by window in input order, each window checked against its
        journal line."""
        parts = [self._part(rank).open("rb") for rank in range(self.world)]
        finished = {rank: iter(self._finished(rank)) for rank in range(self.world)}
        try:
            for index in range(total_windows):
                rank = index % self.world
                window = next(finished[rank])
                data = parts[rank].read(window.end - parts[rank].tell())
                if not window.matches(data):
                    raise BadInput(
                        f"{self._part(rank)} no longer holds window {window.index} as its journal "
                        "records it; run the same command with --resume to do it again"
                    )
                yield [json.loads(line) for line in data.splitlines()]
        finally:
            for f in parts:
                f.close()

    def skipped(self) -> int:
        return sum(window.skipped for rank in range(self.world) for window in self._finished(rank))

    def merge(self, total_windows: int, each: Callable[[dict[str, Any]], None], schema=None) -> int:
        """Write OUTPUT from the parts (calling `each` on every row; Parquet with `schema`), then
        remove the parts; returns the rows written."""
        temporary = self.output.with_name(f".{self.output.name}.merging{self.output.suffix}")
        writer = TableWriter(temporary, schema)
        rows = 0
        try:
            for records in self.merged_records(total_windows):
                for record in records:
                    each(record)
                writer.write(records)
                rows += len(records)
            writer.close()
        except BaseException:
            writer.close()
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, self.output)
        self.remove_leftovers()
        return rows

    def remove_leftovers(self) -> None:
        for path in self.leftovers():
            path.unlink()
