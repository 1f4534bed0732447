"""`bon generate`: offline best-of-N, the rejection-sampling data RAFT trains on.

    bon generate --policy DIR --reward-model DIR --prompts FILE --best-of N --sample-log DB \\
                 [--max-tokens T] [--seed S] [--resume]

Each prompt of FILE (.jsonl or .parquet rows with a "prompt": a string, or chat messages) goes
through the server's own service: the same engines (`--engine`, `--reward-engine`), prompt rules,
reward-model input rule and selection, and the same candidate log. So `bon export-samples` and
`bon train raft --sample-log DB` read the result as they read a server's log.

Prompt i is logged as request `generate-<job>-<i>`, where <job> names the job (prompts file,
models, sampling settings) and its seed is S + i: a killed job run again with --resume skips the
prompts already committed and draws the same candidates for the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from server.arguments import generate_parser
from server.batch.tables import BadInput, Row, count_rows, read_rows, table_format, windows
from server.engines.contract import SamplingParams
from server.failures import Failure
from server.log.sqlite import sqlite_file
from server.policy import read_policy
from server.reward import read_reward_model
from server.seeds import prompt_seed
from server.service import BestOfNResult
from server.threads import apply_torch_threads

if TYPE_CHECKING:
    from server.assembly import Service


def job_name(args, policy_version: str, reward_version: str) -> str:
    """What makes two runs the same job; a short hash of it names the job's requests."""
    stat = args.prompts.stat()
    identity = [str(args.prompts.resolve()), stat.st_size, stat.st_mtime, policy_version, reward_version,
                args.best_of, args.max_tokens, args.temperature, args.top_p, args.seed]  # fmt: skip
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]


def logged_prompts(sample_log: Path, prefix: str) -> set[int]:
    """Row indices of this job already committed to the log."""
    if not sample_log.exists():
        return set()
    connection = sqlite3.connect(f"file:{sample_log}?mode=ro", uri=True)
    try:
        with sqlite_file(sample_log):
            if connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'").fetchone() is None:
                return set()
            rows = connection.execute(
                "SELECT request_id FROM requests WHERE request_id LIKE ?",
                (prefix + "%",),  # hex: no wildcards
            ).fetchall()
    finally:
        connection.close()
    return {int(request_id.rsplit("-", 1)[1]) for (request_id,) in rows}


async def one(service: Service, request_id: str, row: Row, args, seed: int | None) -> list[BestOfNResult]:
    """Best-of-N for one prompt, logged as `request_id`, through the server's admission; Failure
    (a prompt the models cannot take) becomes BadInput naming the row."""
    admission = service.admission
    try:
        async with service.checkpoints.pinned() as pinned:
            policy, raw = pinned.policy.info, row.prompt()
            prompts = (
                await admission.text_prompts(policy, [raw])
                if isinstance(raw, str)
                else [await admission.chat_prompt(policy, raw)]
            )
            max_tokens = admission.resolve_max_tokens(policy, prompts, args.max_tokens, args.max_tokens)
            params = SamplingParams(
                max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p, seed=seed
            )
            admission.check_best_of(args.best_of, params, prompts)
            return await service.best_of_n.run(
                pinned, request_id, prompts, params, n=1, best_of=args.best_of, log=True
            )
    except Failure as error:
        raise BadInput(f"{row.place}: {error.message}") from None


async def run(args) -> dict[str, Any]:
    from server.assembly import start_service
    from server.engines.build import build_sampler, build_scorer
    from server.settings import Settings

    table_format(args.prompts)
    if not args.prompts.is_file():
        raise BadInput(f"{args.prompts}: no such file")
    if args.best_of < 1 or args.window < 1:
        raise BadInput("--best-of and --window must be at least 1")
    policy, reward_model = read_policy(args.policy), read_reward_model(args.reward_model)
    prefix = f"generate-{job_name(args, policy.version, reward_model.version)}-"
    done = logged_prompts(args.sample_log, prefix)
    if done and not args.resume:
        raise BadInput(
            f"{args.sample_log} already holds {len(done)} prompts of this job: pass --resume to finish it"
        )
    engines = {k: v for k, v in (("engine", args.engine), ("reward_engine", args.reward_engine)) if v}
    settings = Settings(
        policy=args.policy, reward_model=args.reward_model, device=args.device, dtype=args.dtype,
        max_best_of=args.best_of, max_batch_tokens=args.max_batch_tokens,
        max_queued_prompts=args.window, sample_log=str(args.sample_log), **engines,
    )  # fmt: skip
    service = await start_service(
        settings,
        policy,
        {settings.reward_models()[0][0]: reward_model},
        build_sampler(settings),
        build_scorer(settings),
    )
    sample_log = service.sample_log
    assert sample_log is not None  # the settings above keep one: it is what the job writes
    started = time.monotonic()
    # Running sums, not lists: a job of millions of prompts keeps nothing per candidate.
    reward_sum, candidates, chosen_sum, tokens, skipped, generated = 0.0, 0, 0.0, 0, 0, 0
    bar = tqdm(total=count_rows(args.prompts), unit=" prompts", dynamic_ncols=True)
    try:
        rows = enumerate(read_rows(args.prompts, 4096))
        for window in windows(rows, args.window):
            todo = [(i, row) for i, row in window if i not in done]
            bad = [row for _, row in todo if isinstance(row, BadInput)]
            if bad and not args.skip_bad_rows:
                raise bad[0]
            ready = [(i, row) for i, row in todo if isinstance(row, Row)]
            results = await asyncio.gather(
                *(one(service, f"{prefix}{i}", row, args, prompt_seed(args.seed, i)) for i, row in ready),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BadInput) and args.skip_bad_rows:
                    skipped += 1
                elif isinstance(result, BaseException):
                    raise result
                else:
                    [outcome] = result
                    generated += 1
                    tokens += outcome.completion_tokens
                    chosen_sum += outcome.candidates[outcome.chosen[0]].reward
                    reward_sum += sum(c.reward for c in outcome.candidates)
                    candidates += len(outcome.candidates)
            skipped += len(bad)
            sample_log.flush()  # this window is durable before the next starts
            bar.update(len(window))
            bar.set_postfix_str(f"{tokens / max(time.monotonic() - started, 1e-9):,.0f} tok/s")
    finally:
        bar.close()
        await service.close()
        sample_log.close()
    seconds = time.monotonic() - started
    return {
        "sample_log": str(args.sample_log.resolve()),
        "job": prefix.rstrip("-"),
        "prompts_generated": generated,
        "prompts_already_logged": len(done),
        "skipped_bad_rows": skipped,
        "candidates": candidates,
        "generated_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "reward_mean_all": reward_sum / candidates if candidates else None,
        "reward_mean_chosen": chosen_sum / generated if generated else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = generate_parser().parse_args(argv)
    if str(args.sample_log).startswith("postgres"):  # resuming reads the file back
        raise BadInput(
            "bon generate writes a SQLite file (--sample-log FILE.db); the readers take it beside a "
            "PostgreSQL log (--sample-log repeated)"
        )
    apply_torch_threads(args.torch_threads)
    return asyncio.run(run(args))
