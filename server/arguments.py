"""Command-line parsers for every job (`bon score`, `bon generate`, `bon eval`, `bon train ...`).

One look: the job's docstring as written, the default of every flag that has one, and required
flags listed apart (argparse lists them as optional).
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The job's docstring as written, and the default of every flag that has one."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def job_parser(prog: str, description: str | None):
    """A job's parser, and its group of required flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    return parser, parser.add_argument_group("required")
