"""`bon export-samples`: the candidate log as JSONL or Parquet, one record per candidate, or as
best-versus-worst preference pairs (`--format pairs`) for DPO."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from server.batch.tables import table_format
from server.log.sources import read_records


def export_record(record: dict) -> dict:
    """The exported shape: model identities as {"path", "version"} objects."""
    out = {k: v for k, v in record.items() if k not in ("policy_version", "reward_model_version")}
    out["policy"] = {"path": record["policy"], "version": record["policy_version"]}
    out["reward_model"] = {"path": record["reward_model"], "version": record["reward_model_version"]}
    return out


def preference_pairs(records: list[dict], min_margin: float = 0.0) -> list[dict]:
    """One pair per prompt: its highest-reward candidate as chosen, its lowest as rejected.

    Candidates are compared only when the same reward-model version scored them (rewards of two
    reward models are not on one scale). Pairs closer than `min_margin`, or of identical texts,
    say nothing and are dropped, and so are candidates early rejection pruned (partial texts).
    Chat prompts give TRL's conversational form (the responses as assistant turns); text prompts
    its standard form.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in (r for r in records if not r.get("pruned")):
        key = (json.dumps(record["prompt"], sort_keys=True), record["reward_model_version"])
        groups.setdefault(key, []).append(record)
    pairs = []
    for group in groups.values():
        best = max(group, key=lambda r: r["reward"])
        worst = min(group, key=lambda r: r["reward"])
        margin = best["reward"] - worst["reward"]
        if best["completion"] == worst["completion"] or margin < min_margin or margin <= 0:
            continue
        chat = isinstance(best["prompt"], list)
        turn = (lambda text: [{"role": "assistant", "content": text}]) if chat else (lambda text: text)
        pairs.append(
            {
                "prompt": best["prompt"],
                "chosen": turn(best["completion"]),
                "rejected": turn(worst["completion"]),
                "chosen_reward": best["reward"],
                "rejected_reward": worst["reward"],
                "candidates": len(group),
            }
        )
    return pairs


def export_samples(
    sample_log: list[str] | str | Path, output: Path, shape: str = "candidates", min_margin: float = 0.0
) -> int:
    """Write `sample_log` to `output` as candidates or pairs; returns how many records were written."""
    fmt = table_format(output)
    records = read_records(sample_log)
    if shape == "pairs":
        rows = preference_pairs(records, min_margin)
    elif shape == "candidates":
        rows = [export_record(r) for r in records]
    else:
        raise ValueError(f"unknown --format {shape!r}; choose candidates or pairs")
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with output.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return len(rows)
    if shape == "candidates":
        # prompt is a string or a messages list, params a dict of mixed types: keep both as JSON
        # text so every row has one type.
        for row in rows:
            row["prompt"] = json.dumps(row["prompt"])
            row["params"] = json.dumps(row["params"])
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise ValueError(
            f"the log mixes text and chat prompts, which one Parquet column cannot hold; write "
            f"{output.with_suffix('.jsonl')} instead"
        ) from None
    pq.write_table(table, output)
    return len(rows)
