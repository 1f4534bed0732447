"""`bon export-samples`: the candidate log as JSONL or Parquet, one record per candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from server.log.sample_log import read_records


def export_record(record: dict) -> dict:
    """The exported shape: model identities as {"path", "version"} objects."""
    out = {k: v for k, v in record.items() if k not in ("policy_version", "reward_model_version")}
    out["policy"] = {"path": record["policy"], "version": record["policy_version"]}
    out["reward_model"] = {"path": record["reward_model"], "version": record["reward_model_version"]}
    return out


FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def format_of(output: Path, fmt: str | None) -> str:
    """The format asked for, or the one the output's extension names."""
    if fmt is not None:
        return fmt
    if output.suffix not in FORMATS:
        raise ValueError(
            f"cannot tell the format of {output} from its extension: name it .jsonl or .parquet, "
            "or give --format"
        )
    return FORMATS[output.suffix]


def export_samples(sample_log: Path, output: Path, fmt: str | None = None) -> int:
    """Write every candidate of `sample_log` to `output`; returns how many were written."""
    fmt = format_of(output, fmt)
    records = [export_record(r) for r in read_records(sample_log)]
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with output.open("w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    elif fmt == "parquet":
        # prompt is a string or a messages list, params a dict of mixed types: keep both as JSON
        # text so every row has one type.
        for record in records:
            record["prompt"] = json.dumps(record["prompt"])
            record["params"] = json.dumps(record["params"])
        pq.write_table(pa.Table.from_pylist(records), output)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose jsonl or parquet")
    return len(records)
