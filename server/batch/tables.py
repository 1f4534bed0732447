"""Row files of the batch jobs: JSONL or Parquet, chosen by extension, read as a stream of windows.

A window is a list of `Row`s: the record as read, and where it came from (`file:line` for JSONL,
`file:row N` for Parquet), so that every message about a bad row names its place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

# Every file bon reads or writes rows in (score, generate, eval, export-samples): by extension.
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}

T = TypeVar("T")


class BadInput(ValueError):
    """A file or row a job cannot use; the message names it (file, line or row, field) and the fix."""


@dataclass
class Row:
    record: dict[str, Any]
    place: str  # "file:line" or "file:row N"

    def prompt(self) -> str | list[dict[str, str]]:
        """The row's "prompt": a string, or chat messages reduced to role and content (what
        `/v1/score` and the chat route pass on); BadInput naming the row otherwise."""
        prompt = self.record.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        ):
            return [{"role": m["role"], "content": m["content"]} for m in prompt]
        raise BadInput(f'{self.place}: "prompt" must be a string or a list of {{"role", "content"}} messages')


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (the output of a job must never be its input)."""
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def table_format(path: Path) -> str:
    if path.suffix not in FORMATS:
        raise BadInput(f"{path}: unknown extension {path.suffix!r}; name the file .jsonl or .parquet")
    return FORMATS[path.suffix]


def count_rows(path: Path) -> int | None:
    """Rows in the file, cheaply: Parquet metadata, or the newlines of a JSONL file (read in
    blocks, never whole); None when unknown."""
    if table_format(path) == "parquet":
        return _parquet_file(path).metadata.num_rows
    count = 0
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            count += block.count(b"\n")
    return count


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def _jsonl_rows(path: Path) -> Iterator[Row | BadInput]:
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            place = f"{path}:{number}"
            try:
                # Python's json reads NaN and Infinity, which no JSON reader downstream accepts.
                record = json.loads(line, parse_constant=_not_json)
            except (ValueError, UnicodeDecodeError) as error:
                yield BadInput(f"{place}: not a JSON object ({error})")
                continue
            except RecursionError:
                yield BadInput(f"{place}: nested too deeply to read")
                continue
            yield Row(record, place) if isinstance(record, dict) else BadInput(f"{place}: not a JSON object")


def _parquet_rows(path: Path, window: int) -> Iterator[Row]:
    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=window):
            for record in batch.to_pylist():
                yield Row(record, f"{path}:row {number}")
                number += 1
    except (pa.ArrowException, OSError) as error:  # a file cut short or damaged past its footer
        raise BadInput(f"{path}: cannot read row {number} on ({error})") from None


def read_rows(path: Path, window: int) -> Iterator[Row | BadInput]:
    """Every row in file order; a row that cannot be read comes as a BadInput in its place."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    if table_format(path) == "jsonl":
        return _jsonl_rows(path)
    _parquet_file(path)
    return _parquet_rows(path, window)


def windows(rows: Iterable[T], size: int) -> Iterator[list[T]]:
    window: list[T] = []
    for row in rows:
        window.append(row)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise BadInput(f"{path}: not a Parquet file, or cut short ({error})") from None


def output_schema(path: Path, window: int, added: dict[str, list[tuple[str, pa.DataType]]]) -> pa.Schema:
    """One Parquet schema for a job's whole output, decided before any work: every field of every
    readable input row (a field only later rows have is kept; ints widen to floats, nulls to
    anything), plus the fields the job adds: `added` maps an input field to the (name, type) of
    each field the job writes for it, added when some row has that input field. A field whose type
    really changes is a BadInput naming it, now rather than after the job."""
    if table_format(path) == "parquet":
        schemas = [_parquet_file(path).schema_arrow]
    else:
        schemas = []
        for rows in windows(read_rows(path, window), window):
            readable = [row for row in rows if isinstance(row, Row)]
            if readable:
                place = f"{readable[0].place}-{readable[-1].place.rsplit(':', 1)[-1]}"
                schemas.append(_window_schema([row.record for row in readable], place))
    given = {name for schema in schemas for name in schema.names}
    schemas.append(
        pa.schema([field for source, fields in added.items() if source in given for field in fields])
    )
    return _one_schema(str(path), lambda: pa.unify_schemas(schemas, promote_options="permissive"))


def _window_schema(records: list[dict[str, Any]], place: str) -> pa.Schema:
    """The schema of one window's rows, field by field, so that a conflict names its field."""
    names = list(dict.fromkeys(name for record in records for name in record))
    return pa.schema(
        [
            (
                name,
                _one_schema(
                    f"{place}: field {name!r}", lambda n=name: pa.array([r.get(n) for r in records]).type
                ),
            )
            for name in names
        ]
    )


def _one_schema(place: str, make):
    try:
        return make()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise BadInput(
            f"{place}: a field changes type between rows ({error}); one Parquet file cannot hold it: "
            "write .jsonl instead"
        ) from None


class TableWriter:
    """Writes records to a JSONL or Parquet file chunk by chunk (Parquet: one row group per chunk,
    with `schema`, or else the schema of the first chunk)."""

    def __init__(self, path: Path, schema: pa.Schema | None = None):
        self.path, self.format = path, table_format(path)
        self._file = path.open("w") if self.format == "jsonl" else None
        self._parquet: pq.ParquetWriter | None = None
        if schema is not None and self.format == "parquet":
            self._parquet = pq.ParquetWriter(path, schema)

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self._file is not None:
            self._file.write("".join(json.dumps(r) + "\n" for r in records))
            return
        if self._parquet is None:
            table = pa.Table.from_pylist(records)
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        else:
            try:
                table = pa.Table.from_pylist(records, schema=self._parquet.schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                raise BadInput(
                    f"{self.path}: rows of different shapes cannot share one Parquet schema ({error}); "
                    "write .jsonl instead"
                ) from None
        self._parquet.write_table(table)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._parquet is not None:
            self._parquet.close()
        elif self.format == "parquet":  # no rows at all: an empty file with no columns
            pq.write_table(pa.table({}), self.path)
