"""`bon retrain`: one periodic RAFT round as one command, safe to run from cron or a CronJob.

    bon retrain --published DIR --sample-log LOG [--sample-log LOG ...] --reward-model DIR \\
                --eval-prompts FILE [--reference DIR] [--min-win-rate W] [--max-kl K] [--servers URL,...]

1. Takes DIR/.retrain.lock: while another round holds it, this one does nothing (exit 5).
2. Reads the finished candidates logged since the newest published checkpoint's window ended,
   from every log given (a PostgreSQL URL, SQLite files, directories of shards). Fewer than
   --min-samples: a clean no-op (exit 0, nothing published).
3. Trains RAFT from that checkpoint into a hidden directory under DIR (--watch ignores it).
4. Evaluates the candidate against the current checkpoint on the held-out prompts, as `bon eval`
   measures: K samples per prompt from each at temperature 1, the reward model's win rate of the
   candidate's over the current's, KL(candidate || reference) and reward at N. The reference is
   the first policy of the chain of rounds (the SFT policy) unless --reference names another.
5. Publishes the candidate (one rename into DIR) only if every gate passes, with the evaluation in
   its raft_manifest.json; otherwise deletes it and exits 3, naming each failed gate and by how much.
6. With --servers, moves each replica to the new checkpoint (--notify reload: POST /admin/reload
   with BON_ADMIN_KEY; watch: the replicas run --watch DIR) and checks that each reports the new
   version in /v1/models (BON_API_KEY); exit 4 names those that do not.

Exit codes: 0 published, or nothing to do; 2 a user error; 3 a gate failed; 4 published, but a
replica does not serve it; 5 another round is running. Every round that trains leaves its
evaluation in DIR/.rounds/VERSION.json, published or not.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.checkpoints import MANIFEST, checkpoint_dir, newest_checkpoint, raft_manifest
from server.log.sources import shown
from server.reward import read_reward_model
from trainers.arguments import retrain_parser, train_args
from trainers.data import RecipeError, load_prompts
from trainers.evaluation.estimators import mean_with_interval, win_probabilities
from trainers.evaluation.measures import measure
from trainers.evaluation.run import pools_from_models
from trainers.raft import Selection, parent_window_end, raft_on_window, samples_from_log

log = logging.getLogger(__name__)

EXIT_GATE, EXIT_REPLICA, EXIT_LOCKED = 3, 4, 5


@contextmanager
def round_lock(published: Path) -> Iterator[bool]:
    """Whether this round holds DIR/.retrain.lock (released when the process ends, however)."""
    with (published / ".retrain.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def first_policy(checkpoint: Path) -> Path:
    """The start of a chain of RAFT rounds: parents followed while they exist."""
    seen = {checkpoint}
    while (parent := raft_manifest(checkpoint).get("parent", {}).get("path")) and Path(parent).is_dir():
        checkpoint = Path(parent)
        if checkpoint in seen:
            break
        seen.add(checkpoint)
    return checkpoint


def evaluate(
    candidate: Path, current: Path, reference: Path, reward_model: Path, prompts: list, args
) -> dict:
    """The candidate against the current checkpoint, on the held-out prompts."""
    pools = pools_from_models(
        reward_model, reference, [current, candidate], prompts, (args.k, args.max_tokens, args.seed),
        sample_reference=False,
    )  # fmt: skip
    current_pools, candidate_pools = pools.values()
    wins = [
        float(win_probabilities(new.rewards, old.rewards).mean())
        for new, old in zip(candidate_pools, current_pools, strict=True)
    ]
    new, old = measure(candidate_pools), measure(current_pools)
    return {
        "prompts": len(prompts),
        "samples_per_prompt": args.k,
        "win_rate_vs_current": mean_with_interval(wins),
        "kl_to_reference": new["kl_to_reference"],
        "current_kl_to_reference": old["kl_to_reference"],
        "reward_at_n": {"candidate": new["reward_at_n"], "current": old["reward_at_n"]},
        "reference": str(reference),
    }


def gates(evaluation: dict, min_win_rate: float, max_kl: float | None) -> list[dict]:
    """Each gate: its measured value, its limit, whether it passed and by how much it missed."""
    win = evaluation["win_rate_vs_current"]["mean"]
    out = [{"gate": "min_win_rate", "value": win, "limit": min_win_rate, "passed": win >= min_win_rate,
            "missed_by": max(0.0, min_win_rate - win)}]  # fmt: skip
    if max_kl is not None:
        kl = evaluation["kl_to_reference"]["mean"]
        out.append({"gate": "max_kl", "value": kl, "limit": max_kl, "passed": kl <= max_kl,
                    "missed_by": max(0.0, kl - max_kl)})  # fmt: skip
    return out


def publish(candidate: Path, published: Path, manifest: dict) -> Path:
    """Write the final manifest, then rename the candidate into place: --watch sees all or nothing.

    The manifest is replaced (not rewritten in place) so the directory's modification time, which
    orders checkpoints, is the moment of publishing."""
    staged = candidate / f".{MANIFEST}.tmp"
    staged.write_text(json.dumps(manifest, indent=2))
    os.replace(staged, candidate / MANIFEST)
    target = published / manifest["version"]
    os.rename(candidate, target)
    return target


def _get_json(url: str, headers: dict[str, str], body: dict | None = None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        headers={**headers, "Content-Type": "application/json"},
        method="POST" if data else "GET",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def served_version(server: str, headers: dict[str, str]) -> str | None:
    try:
        return _get_json(f"{server}/v1/models", headers, timeout=10)["data"][0]["policy_version"]
    except (OSError, ValueError, KeyError, IndexError):  # down, or not a bon server: not serving it
        return None


def move_replicas(servers: list[str], checkpoint: Path, version: str, notify: str, wait: float) -> dict:
    """{server: None when it reports `version`, else what went wrong}; one replica at a time."""
    api = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("BON_API_KEY")) else {}
    admin = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("BON_ADMIN_KEY")) else {}
    problems: dict[str, str | None] = {}
    for server in servers:
        if notify == "reload":
            try:
                _get_json(f"{server}/admin/reload", admin, {"policy": str(checkpoint)}, timeout=wait)
            except urllib.error.HTTPError as error:
                problems[server] = (
                    f"reload answered {error.code}: {error.read().decode(errors='replace')[:300]}"
                )
                continue
            except OSError as error:
                problems[server] = f"reload failed: {error}"
                continue
        deadline = time.monotonic() + wait
        while (seen := served_version(server, api)) != version and time.monotonic() < deadline:
            time.sleep(1.0)
        problems[server] = None if seen == version else f"serves {seen} after {wait:.0f} s, not {version}"
    return problems


def main(argv: list[str] | None = None) -> dict:
    args = retrain_parser().parse_args(argv)
    published = args.published
    if not published.is_dir():
        raise RecipeError(f"--published {published} is not a directory")
    current = newest_checkpoint(published)
    if current is None:
        raise RecipeError(
            f"nothing published under {published}: copy the first policy there (e.g. {published}/sft)"
        )
    checkpoint_dir(current, "policy", "--published", generates=True)
    read_reward_model(args.reward_model)
    prompts = load_prompts(args.eval_prompts)
    reference = checkpoint_dir(args.reference or first_policy(current), "reference", "--reference", True)
    servers = [s.strip().rstrip("/") for s in args.servers.split(",") if s.strip()]
    with round_lock(published) as held:
        if not held:
            log.warning("another round holds %s; this one does nothing", published / ".retrain.lock")
            return outcome(published, EXIT_LOCKED, {"published": False, "why": "another round is running"})
        return one_round(args, published, current, reference, prompts, servers)


def one_round(
    args, published: Path, current: Path, reference: Path, prompts: list, servers: list[str]
) -> dict:
    window = (parent_window_end(current), time.time())
    samples = samples_from_log(args.sample_log, *window)
    data = {
        "current": str(current),
        "window": {"since": window[0], "until": window[1]},
        "samples": len(samples),
        "sample_log": [shown(location) for location in args.sample_log],
    }
    if len(samples) < args.min_samples:
        log.info(
            "%d new candidates, fewer than --min-samples %d: nothing to do", len(samples), args.min_samples
        )
        return outcome(published, 0, {"published": False, "why": "too few new samples"}, data)
    candidate = published / f".candidate-{uuid.uuid4().hex[:8]}"
    try:
        rule = Selection(args.top_k, args.top_fraction, args.min_reward, args.min_candidates)
        manifest = raft_on_window(
            current, samples, args.sample_log, window, candidate, train_args(args), rule
        )
        evaluation = evaluate(candidate, current, reference, args.reward_model, prompts, args)
        checks = gates(evaluation, args.min_win_rate, args.max_kl)
        manifest["retrain"] = {"evaluation": evaluation, "gates": checks, "reference": str(reference)}
        rounds = published / ".rounds"
        rounds.mkdir(exist_ok=True)
        (rounds / f"{manifest['version']}.json").write_text(json.dumps(manifest, indent=2))
        failed = [c for c in checks if not c["passed"]]
        if failed:
            for check in failed:
                log.error(
                    "gate %s failed: %.4f against a limit of %.4f (missed by %.4f); nothing published",
                    check["gate"], check["value"], check["limit"], check["missed_by"],
                )  # fmt: skip
            return outcome(published, EXIT_GATE, {"published": False, "why": "a gate failed", "gates": checks,
                                                  "version": manifest["version"]}, data)  # fmt: skip
        target = publish(candidate, published, manifest)
    finally:
        shutil.rmtree(candidate, ignore_errors=True)
    log.info("published %s (win rate %.3f)", target, evaluation["win_rate_vs_current"]["mean"])
    result = {"published": True, "version": manifest["version"], "path": str(target), "gates": checks}
    if not servers:
        return outcome(published, 0, result, data)
    problems = move_replicas(servers, target, manifest["version"], args.notify, args.wait_seconds)
    result["replicas"] = {server: problem or "serves it" for server, problem in problems.items()}
    if lagging := [server for server, problem in problems.items() if problem]:
        for server in lagging:
            log.error("replica %s: %s", server, problems[server])
        return outcome(published, EXIT_REPLICA, result, data)
    return outcome(published, 0, result, data)


def outcome(published: Path, code: int, result: dict, data: dict | None = None) -> dict:
    """The summary every recipe prints, with the exit code `bon` returns."""
    return {"recipe": "retrain", "output": str(published.resolve()), "data": data or {}, "result": result,
            "exit_code": code}  # fmt: skip
