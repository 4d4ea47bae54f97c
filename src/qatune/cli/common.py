"""What every command shares: the user-error type, printing a result, tables, reading the user's files."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from qatune.errors import QatuneError, read_json, unreadable


class CliError(QatuneError):
    """A user error: printed without a traceback, exit status 2."""


def emit(result: dict, as_json: bool, lines: list[str]) -> None:
    """Print the human-readable lines; with ``--json`` the result follows as one JSON object on the last line."""
    for line in lines:
        print(line)
    if as_json:
        print(json.dumps(result, sort_keys=True))


def table(header: list[str], body: list[list]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in body]


def read_json_mapping(path: str, what: str, value_type: type | tuple[type, ...]) -> dict:
    """A JSON object {question_id: value} whose values are all of ``value_type`` (finite when numbers)."""
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise CliError(f"{path}: {what} must be a JSON object {{question_id: value}}, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, value_type) or isinstance(v, bool)
           or isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise CliError(f"{path}: {what} for question {bad[0]!r} is {obj[bad[0]]!r}, not a "
                       f"{'string' if value_type is str else 'finite number'}; {len(bad)} such entries")
    return obj


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(path, what, e, "give a UTF-8 text file") from e


def load_toml(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise CliError(f"{path}: config file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(path, "config file", e, "give a UTF-8 TOML file") from e
    except tomllib.TOMLDecodeError as e:
        raise CliError(f"{path}: not valid TOML: {e}") from e


def count_or_fraction(text: str) -> int | float:
    """'500' -> 500 questions, '0.25' -> a quarter of them."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a question count or a fraction, got {text!r}") from e


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per config field (help from the field), defaulting to "not given" so --config can fill in."""
    import typing
    from dataclasses import MISSING, fields

    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        default = f.default if f.default is not MISSING else None
        kw: dict = {"default": argparse.SUPPRESS, "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif t == (list[str] | None):
            parser.add_argument(flag, nargs="+", **kw)
        elif t == (int | float | None):
            parser.add_argument(flag, type=count_or_fraction, **kw)
        else:
            base = next((a for a in typing.get_args(t) if a is not type(None)), t)
            parser.add_argument(flag, type=base, **kw)


MODEL_HELP = "a run directory (train's --output-dir), a model directory or an export directory"
