"""`bon`: one command, with a subcommand per job.

Each command's flags are parsed before its module is imported (the parsers live in
`server/arguments.py` and `trainers/arguments.py`, which import nothing heavy), so --help and a
usage error answer at once; serving never loads the trainers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import typing
from importlib.metadata import version
from pathlib import Path

DESCRIPTION = """Best-of-N serving with a Bradley-Terry reward model, and RAFT retraining on what was served.

  bon serve --policy DIR --reward-model DIR       serve best-of-N over an OpenAI-compatible API
  bon score rows.jsonl -o scored.jsonl --reward-model DIR
  bon generate ... / bon eval ... / bon export-samples ...
  bon train sft|rm|prm|raft ...                  fine-tune a policy, train a reward model, RAFT
  bon label-steps ...                            step labels from rollouts, for bon train prm
  bon retrain --published DIR --sample-log LOG   one gated RAFT round, for cron
  bon demo --output DIR                          the whole pipeline on tiny models, on a CPU

`bon COMMAND --help` lists a command's flags with their defaults."""

# Commands whose flags a parser of their own reads: (module holding the parser, its function,
# module whose main(argv) runs the command). The parser runs first, so --help never waits for torch.
COMMANDS = {
    "score": ("server.arguments", "score_parser", "server.batch.score"),
    "generate": ("server.arguments", "generate_parser", "server.batch.generate"),
    "eval": ("trainers.arguments", "eval_parser", "trainers.evaluation.run"),
    "train sft": ("trainers.arguments", "sft_parser", "trainers.sft"),
    "train rm": ("trainers.arguments", "rm_parser", "trainers.reward"),
    "train raft": ("trainers.arguments", "raft_parser", "trainers.raft"),
    "train prm": ("trainers.arguments", "prm_parser", "trainers.prm"),
    "label-steps": ("trainers.arguments", "label_steps_parser", "trainers.label_steps"),
    "demo": ("trainers.arguments", "demo_parser", "trainers.demo.pipeline"),
    "retrain": ("trainers.arguments", "retrain_parser", "trainers.retrain"),
}
TRAINERS = {
    "sft": "supervised fine-tuning of a causal LM on prompt/completion or chat data",
    "rm": "a Bradley-Terry reward model from pairs, rankings with ties, and logged feedback",
    "raft": "fine-tune the policy on its best logged (or self-sampled) candidates",
    "prm": "a process reward model from step-labelled answers (bon label-steps writes them)",
}


def _add_serve(commands) -> None:
    from server.arguments import HelpFormatter
    from server.settings import Settings

    serve = commands.add_parser(
        "serve",
        help="serve best-of-N over an OpenAI-compatible HTTP API",
        description="Serve best-of-N: sample best_of candidates from the policy, score each with the\n"
        "reward model, return the best n in the OpenAI schema, and log every candidate.\n"
        "Every flag is also an environment variable BON_<FLAG>; the command line wins.",
        formatter_class=HelpFormatter,
    )
    required = serve.add_argument_group("required (a flag or its environment variable)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        group = required if field.is_required() else serve
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        default = "" if value is None or value is False or value == [] else f"; default: {value}"
        help_text = f"{field.description or ''} (env BON_{name.upper()}{default})"
        choices = (
            typing.get_args(field.annotation)
            if typing.get_origin(field.annotation) is typing.Literal
            else None
        )
        if field.annotation is bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif name in ("api_key", "admin_key", "reward_model", "reward_function"):
            group.add_argument(
                flag, action="append", default=argparse.SUPPRESS, help=help_text + "; repeatable"
            )
        else:
            group.add_argument(flag, default=argparse.SUPPRESS, choices=choices, help=help_text)


GRACEFUL_SHUTDOWN_SECONDS = 10


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from server.api.app import build_app
    from server.api.connections import HEADER_BYTES, bounded_h11
    from server.engines.build import EngineUnavailable, build_sampler, build_scorer
    from server.failures import CheckpointError, SampleLogUnusable
    from server.log.sources import open_store
    from server.policy import read_policy
    from server.reward import read_reward_model
    from server.rules import RuleSpecError, load_rule
    from server.settings import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        settings = Settings(**given)
    except ValidationError as error:
        first = error.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        print(f"bon serve: {where}{first['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger(__name__).info("configuration: %s", settings.redacted())
    from server.threads import apply_torch_threads

    apply_torch_threads(settings.torch_threads)
    try:
        policy = read_policy(settings.policy)
        reward_models = {
            name: read_reward_model(path, settings.step_delimiter) for name, path in settings.reward_models()
        }
        for name, rm in reward_models.items():
            logging.getLogger(__name__).info("reward model %s (%s): %s", name, rm.path, rm.described())
        rules = [load_rule(name, spec) for name, spec in settings.reward_functions()]
        sampler, scorer = build_sampler(settings), build_scorer(settings)
        if not settings.no_sample_log:
            open_store(settings.sample_log).close()
    except (CheckpointError, EngineUnavailable, SampleLogUnusable, RuleSpecError) as error:
        print(f"bon serve: {error}", file=sys.stderr)
        return 2
    if not settings.loopback and not settings.api_key:
        logging.getLogger(__name__).warning(
            "SERVING WITHOUT AN API KEY ON %s: anyone who can reach this port can use the models; "
            "set --api-key (or BON_API_KEY)",
            settings.host,
        )
    app = build_app(settings, policy, reward_models, sampler, scorer, rules)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=bounded_h11(settings.header_timeout_seconds, settings.max_connections),
        h11_max_incomplete_event_size=HEADER_BYTES,
        # SIGTERM: requests still running after this long are cut off; then the log is flushed.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    server = uvicorn.Server(config)  # its Config has set up uvicorn's loggers by now
    logging.getLogger("uvicorn.access").addFilter(_drop_query_strings)
    server.run()
    return 0 if server.started else 3


def _drop_query_strings(record: logging.LogRecord) -> bool:
    """Access-log lines without query strings: a client may put a key there (?api_key=...)."""
    if isinstance(record.args, tuple) and len(record.args) >= 3 and "?" in str(record.args[2]):
        args = list(record.args)
        args[2] = str(args[2]).split("?", 1)[0] + "?<query hidden>"
        record.args = tuple(args)
    return True


def _export(args: argparse.Namespace) -> int:
    from server.failures import Failure
    from server.log.export import export_samples

    try:
        count = export_samples(args.sample_log, args.output, args.format, args.min_margin)
    except (FileNotFoundError, ValueError, Failure) as error:
        print(f"bon export-samples: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} {args.format} to {args.output}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """A command with its own parser: parse (help and usage errors end here, before any heavy
    import), then import the command's module and run it; a user's mistake is one line."""
    name = f"{args.command} {args.method}" if getattr(args, "method", None) else args.command
    if args.command == "train" and args.method is None:
        return _list_trainers(args.rest)
    parser_module, parser_name, module = COMMANDS[name]
    getattr(importlib.import_module(parser_module), parser_name)().parse_args(args.rest)
    logging.basicConfig(level=logging.INFO, format=f"bon {name}: %(message)s")
    from server.batch.tables import BadInput
    from server.engines.build import EngineUnavailable
    from server.failures import Failure
    from trainers.data import RecipeError

    try:
        summary = importlib.import_module(module).main(args.rest)
    except (BadInput, RecipeError, Failure, EngineUnavailable, OSError) as error:
        # A user's mistake (a file, a row, a flag, a directory): one line, no traceback.
        print(f"bon {name}: {error}", file=sys.stderr)
        return 2
    if name != "demo":  # the demo prints its own table
        print(json.dumps(summary, indent=2))
    return summary.get("exit_code", 0)  # bon retrain: 3 a gate failed, 4 a replica lags, 5 locked


def _list_trainers(rest: list[str]) -> int:
    wanted = bool({"-h", "--help"} & set(rest))
    lines = ["usage: bon train METHOD [flags]", "", "methods:"]
    lines += [f"  {method:6} {what}" for method, what in TRAINERS.items()]
    lines += ["", "`bon train METHOD --help` lists a method's flags with their defaults."]
    print("\n".join(lines), file=sys.stdout if wanted else sys.stderr)
    return 0 if wanted else 2


def build_parser() -> argparse.ArgumentParser:
    from server.arguments import READ_HELP

    parser = argparse.ArgumentParser(
        prog="bon", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"bon {version('bon')}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    commands.choices["serve"].set_defaults(func=_serve)

    export = commands.add_parser("export-samples", help="write the candidate log as JSONL or Parquet")
    export.add_argument("--sample-log", action="append", required=True, help=READ_HELP)
    export.add_argument(
        "--format",
        choices=["candidates", "pairs"],
        default="candidates",
        help="candidates: one record per candidate; pairs: best vs worst per prompt (prompt, chosen, "
        "rejected: what TRL's DPO trainer reads). The file format follows the extension",
    )
    export.add_argument(
        "--min-margin", type=float, default=0.0, help="pairs: drop those whose rewards differ by less"
    )
    export.add_argument("-o", "--output", type=Path, required=True, help="a .jsonl or .parquet file")
    export.set_defaults(func=_export)

    train = commands.add_parser(
        "train",
        help="train a policy (sft), a reward model (rm), a process reward model (prm) or RAFT; "
        "`bon train METHOD --help`",
        add_help=False,
    )
    train.add_argument("method", nargs="?", choices=sorted(TRAINERS))
    train.set_defaults(func=_run, passes_through=True)

    for name, what in [
        ("score", "reward every row of a JSONL/Parquet file; resumable, torchrun-ready"),
        ("generate", "offline best-of-N: sample, score and log like the server, for RAFT data"),
        ("eval", "reward vs N, KL, win rate and diversity: eval.json, report.md and plots"),
        ("label-steps", "label each step of sampled answers by rollouts (Math-Shepherd), for bon train prm"),
        ("retrain", "one periodic RAFT round: train on the new log window, gate, publish, move the replicas"),
    ]:
        job = commands.add_parser(name, help=f"{what}; `bon {name} --help`", add_help=False)
        job.set_defaults(func=_run, passes_through=True)

    demo = commands.add_parser(
        "demo", help="the whole pipeline from scratch on CPU; `bon demo --help`", add_help=False
    )
    demo.set_defaults(func=_run, passes_through=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # train and demo hand their flags to the recipe's own parser (its --help lists them).
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    sys.exit(args.func(args))
