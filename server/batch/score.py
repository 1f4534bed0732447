"""`bon score`: reward every row of a file with Bradley-Terry reward models, as `/v1/score` would.

    bon score INPUT -o OUTPUT --reward-model [NAME=]DIR [--reward-model ...] [--resume] [--skip-bad-rows]

INPUT and OUTPUT are .jsonl or .parquet. Each row is {"prompt": str | messages, "response": str}
or {"prompt": ..., "responses": [str, ...]}; OUTPUT has every row, in input order, with all its
fields and "reward" (or "rewards", one per response) added: the raw logit, from the same
reward-model input rule as the server. With several reward models, "reward" is their combination
(bon serve's rule: --reward-combine, --reward-weights) and "reward_members" (or "rewards_members")
holds each one's raw reward by name. A process reward model's reward is its --step-aggregate of
the step scores, which go in "step_rewards" (or "rewards_steps", one list per response). A row a
reward model cannot take whole (longer than its context) is a bad row: it is never truncated.

The input is read in windows; each window is sorted by length and scored in batches of at most
--batch-tokens tokens, so padding stays small and memory stays bounded however long the file is.
A killed job is finished by the same command with --resume (server/batch/journal.py). Under
`torchrun --nproc-per-node P -m bon score ...` (or `accelerate launch`) each process scores every
P-th window and rank 0 writes the one merged OUTPUT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from server.admission import score_input
from server.arguments import score_parser
from server.batch.journal import Journal, job_identity
from server.batch.tables import (
    BadInput,
    Row,
    count_rows,
    output_schema,
    read_rows,
    same_file,
    table_format,
    windows,
)
from server.engines.hf.scorer import padded_tokens, token_budget_chunks
from server.failures import ContextTooLong
from server.members import member_name, parse_weights
from server.policy import read_policy
from server.prompts import unicode_text
from server.reward import Reward, RewardModelInfo, check_finite, read_reward_model, read_steps
from server.selection import Combination, combine
from server.threads import apply_torch_threads

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One window's rows with their reward-model inputs, flattened across responses."""

    records: list[dict[str, Any]]  # the rows kept, in input order
    inputs: dict[str, list[list[int]]]  # per reward model: its token ids, row by row, response by response
    owners: list[tuple[int, int | None]]  # (record index, response index; None: a "response" row)
    skipped: int


def _responses(record: dict[str, Any], place: str) -> tuple[list[str], bool]:
    """The row's responses, and whether it gave a single "response". A null field is an absent one:
    a Parquet file with both columns has one of them null in each row."""
    single, several = record.get("response") is not None, record.get("responses") is not None
    if single == several:
        raise BadInput(f'{place}: give exactly one of "response" (a string) or "responses" (a list)')
    if single:
        if not isinstance(record["response"], str):
            raise BadInput(f'{place}: "response" must be a string')
        return [record["response"]], True
    responses = record["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise BadInput(f'{place}: "responses" must be a list of strings')
    return responses, False


def row_inputs(row: Row, rm: RewardModelInfo, policy_tokenizer) -> tuple[list[list[int]], bool]:
    """A row's RM inputs (one per response) and whether it had a single "response"; BadInput naming
    the row and field when it cannot be scored as given."""
    place = row.place
    prompt = row.prompt()
    responses, single = _responses(row.record, place)
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    for name, text in [("prompt", t) for t in texts] + [("response", r) for r in responses]:
        try:
            unicode_text(text)
        except ValueError as error:
            raise BadInput(f"{place}: {name} {error}") from None
    inputs = []
    for index, response in enumerate(responses):
        try:  # the server's admission rule: whole, or refused
            inputs.append(
                score_input(rm, prompt, response, policy_tokenizer, f"response {index}", "response")
            )
        except ContextTooLong as error:
            raise BadInput(f"{place}: {error.message}") from None
    return inputs, single


class ScoreJob:
    """Args:
    members: the reward models by name, with the handle the scorer loaded each as.
    combination: how several make one reward (one alone is its raw reward).
    """

    def __init__(
        self,
        members: dict[str, tuple[RewardModelInfo, object]],
        policy_tokenizer,
        scorer,
        combination: Combination,
        skip_bad_rows: bool,
        step_aggregate: str,
    ):
        self.members, self.policy_tokenizer = members, policy_tokenizer
        self.step_aggregate = step_aggregate  # a process reward model's rule
        self.scorer, self.combination = scorer, combination
        self.skip_bad_rows = skip_bad_rows
        self.bad_rows = 0  # this run's; the journal counts every run's
        self.tokens = 0
        self.padded_tokens = 0  # tokens of the padded batches a transformers forward runs

    def prepare(self, window: list[Row | BadInput]) -> Scored:
        scored = Scored([], {name: [] for name in self.members}, [], 0)
        for row in window:
            try:
                if isinstance(row, BadInput):
                    raise row
                read = {
                    name: row_inputs(row, rm, self.policy_tokenizer) for name, (rm, _) in self.members.items()
                }
            except BadInput as error:
                if not self.skip_bad_rows:
                    raise
                scored.skipped += 1
                self.bad_rows += 1
                if self.bad_rows <= 10:
                    log.warning("skipping %s", error)
                continue
            index = len(scored.records)
            scored.records.append(dict(row.record))
            count, single = len(next(iter(read.values()))[0]), next(iter(read.values()))[1]
            scored.owners += [(index, None)] if single else [(index, j) for j in range(count)]
            for name, (inputs, _) in read.items():
                scored.inputs[name] += inputs
            if not single:
                scored.records[index]["rewards"] = [0.0] * count
                if len(self.members) > 1:
                    scored.records[index]["rewards_members"] = [{} for _ in range(count)]
        return scored

    async def _member(self, name: str, scored: Scored, batch_tokens: int) -> list[Reward]:
        """One reward model's rewards, sorted by length for the forward passes and put back in
        input order. A row's responses stay together (ordered by the row's longest), so the scorer
        runs their shared prompt once."""
        rm, weights = self.members[name]
        inputs = scored.inputs[name]
        longest: dict[int, int] = {}
        for (owner, _), ids in zip(scored.owners, inputs, strict=True):
            longest[owner] = max(longest.get(owner, 0), len(ids))
        order = sorted(range(len(inputs)), key=lambda i: (longest[scored.owners[i][0]], scored.owners[i][0]))
        by_length = [inputs[i] for i in order]
        rewards = check_finite(await self.scorer.score(by_length, weights), rm.path)
        if rm.steps is not None:
            rewards = read_steps(rewards, self.step_aggregate)
        self.tokens += sum(len(ids) for ids in by_length)
        self.padded_tokens += sum(map(padded_tokens, token_budget_chunks(by_length, batch_tokens)))
        in_order = [Reward(0.0)] * len(inputs)
        for position, reward in zip(order, rewards, strict=True):
            in_order[position] = reward
        return in_order

    async def score(self, scored: Scored, batch_tokens: int) -> None:
        """Every member's rewards in, combined: "reward" (or "rewards"), and with several reward
        models each one's raw reward by name in "reward_members" (or "rewards_members")."""
        read = {name: await self._member(name, scored, batch_tokens) for name in self.members}
        raw = {name: [r.value for r in rewards] for name, rewards in read.items()}
        stats = {name: rm.stats for name, (rm, _) in self.members.items()}
        several = len(self.members) > 1
        process = [read[name] for name, (rm, _) in self.members.items() if rm.steps is not None]
        combined = combine(raw, stats, self.combination)
        for i, ((record_index, response_index), reward) in enumerate(
            zip(scored.owners, combined, strict=True)
        ):
            record = scored.records[record_index]
            steps = process[0][i].steps if process else None
            if response_index is None:
                record["reward"] = reward.value
                if several:
                    record["reward_members"] = reward.members
                if process:
                    record["step_rewards"] = steps
            else:
                record["rewards"][response_index] = reward.value
                if several:
                    record["rewards_members"][response_index] = reward.members
                if process:
                    record.setdefault("rewards_steps", [[] for _ in record["rewards"]])[response_index] = (
                        steps
                    )


def added_columns(names: list[str], process: bool) -> dict[str, list[tuple[str, pa.DataType]]]:
    """What a job adds for each input field: the reward(s), with several reward models each one's
    raw reward by name, and with a process reward model the step scores."""
    member = pa.struct([(name, pa.float64()) for name in names])
    single: list[tuple[str, pa.DataType]] = [("reward", pa.float64())]
    several: list[tuple[str, pa.DataType]] = [("rewards", pa.list_(pa.float64()))]
    if len(names) > 1:
        single.append(("reward_members", member))
        several.append(("rewards_members", pa.list_(member)))
    if process:
        single.append(("step_rewards", pa.list_(pa.float64())))
        several.append(("rewards_steps", pa.list_(pa.list_(pa.float64()))))
    return {"response": single, "responses": several}


def reward_summary(rewards: array) -> dict[str, float]:
    """Count, mean, std and quantiles; `rewards` is a packed array (8 bytes a reward, so a
    10-million-row job holds 80 MB here, not its rows)."""
    if not rewards:
        return {"count": 0}
    values = np.frombuffer(rewards, dtype=np.float64)
    p05, p25, p50, p75, p95 = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist()
    return {
        "count": len(values),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "p05": p05,
        "p25": p25,
        "p50": p50,
        "p75": p75,
        "p95": p95,
        "max": float(values.max()),
    }


def _scorer(args):
    from server.engines.build import build_scorer
    from server.settings import Settings

    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else args.device
    given = {"reward_engine": args.engine} if args.engine else {}
    # Settings is the server's: a scoring job has no policy, so the field names the RM (never loaded
    # as one); the vLLM options come from BON_VLLM_* like the server's.
    directory = member_name(args.reward_model[0])[1]
    settings = Settings(
        policy=directory,
        reward_model=[str(directory)],
        device=device,
        dtype=args.dtype,
        max_batch_tokens=args.batch_tokens,
        **given,
    )
    return build_scorer(settings), settings.reward_engine


async def run(args) -> dict[str, Any]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    table_format(args.input), table_format(args.output)
    if args.window_rows < 1 or args.batch_tokens < 1:
        raise BadInput("--window-rows and --batch-tokens must be at least 1")
    if not args.input.is_file():
        raise BadInput(f"{args.input}: no such file")
    if same_file(args.input, args.output):
        raise BadInput(f"-o {args.output} is the input file; write the scores elsewhere")
    named = [member_name(value) for value in args.reward_model]
    if duplicated := sorted({n for n, _ in named if [m for m, _ in named].count(n) > 1}):
        raise BadInput(f"reward model names must be unique; {', '.join(duplicated)} given twice")
    try:
        combination = Combination(
            args.reward_combine, parse_weights(args.reward_weights), args.reward_uncertainty_penalty
        )
    except ValueError as error:
        raise BadInput(str(error)) from None
    if unknown := sorted(set(combination.weights) - {n for n, _ in named}):
        raise BadInput(f"--reward-weights names {', '.join(unknown)}, not a --reward-model")
    members = {name: read_reward_model(directory, args.step_delimiter) for name, directory in named}
    process = any(rm.steps is not None for rm in members.values())
    # Decided before any scoring: a field whose type changes between rows fails now.
    schema = (
        output_schema(args.input, args.window_rows, added_columns([n for n, _ in named], process))
        if table_format(args.output) == "parquet"
        else None
    )
    first = next(iter(members.values()))
    policy_tokenizer = read_policy(args.policy).tokenizer if args.policy else first.tokenizer
    identity = job_identity(
        args.input,
        window_rows=args.window_rows,
        world=world,
        reward_model=",".join(f"{n}={rm.path}" for n, rm in members.items()),
        version=",".join(rm.version for rm in members.values()),
        combination=[args.reward_combine, combination.weights, args.reward_uncertainty_penalty],
    )
    journal = Journal(args.output, rank, world, identity)
    if args.resume and args.output.exists() and not journal.leftovers():
        return {"output": str(args.output.resolve()), "note": "already complete; nothing to do"}
    last_done = journal.open(args.resume)
    try:
        return await _score(
            args, members, combination, policy_tokenizer, journal, last_done, schema, rank, world
        )
    except BadInput:
        if journal.started_here:  # a user's mistake before any resumable work: start clean next time
            journal.remove_leftovers()
        raise
    finally:
        journal.unlock()


async def _score(
    args,
    members,
    combination,
    policy_tokenizer,
    journal: Journal,
    last_done: int,
    schema,
    rank: int,
    world: int,
):
    scorer, engine = _scorer(args)
    try:
        loaded = {name: (rm, await scorer.load(rm)) for name, rm in members.items()}
        job = ScoreJob(loaded, policy_tokenizer, scorer, combination, args.skip_bad_rows, args.step_aggregate)
        started = time.monotonic()  # the job's time: reading, tokenizing, scoring, writing
        total = count_rows(args.input)
        bar = tqdm(total=total, unit=" rows", disable=rank != 0, dynamic_ncols=True)
        count, rows_scored = 0, 0
        # One window scores (the engine's thread) while the next is tokenized (a worker thread,
        # so the event loop keeps feeding the scorer its chunks); the forward releases the GIL.
        in_flight: tuple[int, Scored, asyncio.Task] | None = None

        def advance(rows: int) -> None:
            bar.update(rows)
            elapsed = time.monotonic() - started
            bar.set_postfix_str(f"{job.tokens / max(elapsed, 1e-9):,.0f} tok/s (this process)")

        async def land(flight: tuple[int, Scored, asyncio.Task]) -> int:
            """Wait for a window in flight, record it, and only then count it on the bar."""
            index, scored, scoring = flight
            await scoring
            journal.append(index, scored.records, scored.skipped)
            advance(len(scored.records) + scored.skipped)
            return len(scored.records)

        try:
            for index, window in enumerate(
                windows(read_rows(args.input, args.window_rows), args.window_rows)
            ):
                count = index + 1
                if index % world == rank and index > last_done:
                    scored = await asyncio.to_thread(job.prepare, window)
                    if in_flight is not None:
                        rows_scored += await land(in_flight)
                    in_flight = (index, scored, asyncio.create_task(job.score(scored, args.batch_tokens)))
                else:  # done by an earlier run, or another process's
                    advance(len(window))
            if in_flight is not None:
                rows_scored += await land(in_flight)
        except BaseException:
            if in_flight is not None:
                in_flight[2].cancel()
            raise
        bar.close()
        journal.finish(count)
    finally:
        await scorer.close()
    seconds = time.monotonic() - started
    mine = {"rows_scored": rows_scored, "tokens": job.tokens, "seconds": round(seconds, 2)}
    if rank != 0:
        return {"rank": rank, **mine}
    journal.wait_for_all()
    rewards = array("d")
    skipped = journal.skipped()  # every process's, this run's and earlier runs'
    written = journal.merge(
        count,
        lambda r: rewards.append(r["reward"]) if "reward" in r else rewards.extend(r["rewards"]),
        schema,
    )
    return {
        "output": str(args.output.resolve()),
        "rows": written,
        "skipped_bad_rows": skipped,
        "engine": engine,
        "processes": world,
        **mine,
        "rows_per_second": round(rows_scored / max(seconds, 1e-9), 1),
        "tokens_per_second": round(job.tokens / max(seconds, 1e-9), 1),
        "padding_waste": round(1 - job.tokens / job.padded_tokens, 4)
        if job.padded_tokens and engine == "transformers"
        else None,
        "reward": reward_summary(rewards),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the job; a user's mistake raises BadInput (or CheckpointError), which `bon` prints as
    one line."""
    args = score_parser().parse_args(argv)
    apply_torch_threads(args.torch_threads)
    return asyncio.run(run(args))
