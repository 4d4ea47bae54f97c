"""The `qatune` command line: one module per command, each with its parser beside its handler; a handler parses
its flags, calls the Python API and prints what it returned.

Every command prints a human-readable summary; with ``--json`` the last line printed is one JSON object,
so scripts can read the result with ``tail -n 1``. A user error exits 2 with one line (``--debug``: the
traceback), an interruption 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from qatune.cli import evaluate, predict, report, score, ship, study, train
from qatune.cli.common import CliError
from qatune.errors import QatuneError

COMMANDS = (score, train, evaluate, predict, ship, study, report)  # in the order `qatune --help` lists them

__all__ = ["CliError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qatune", description="Fine-tune and compare extractive QA models.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qatune.errors import Interrupted
    from qatune.study.driver import StudyInterrupted

    try:
        args.func(args)
    except (Interrupted, StudyInterrupted) as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C where nothing needed saving (loading, a dry run, a report)
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`qatune ... | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except QatuneError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
