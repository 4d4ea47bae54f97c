"""One base class for every error a user can cause or fix, so `qatune` catches them in one place.

Each failure family has its own subclass (data, features, model, config, training, study, store, launch,
file); the message says what is wrong and what to do. `cli.main` prints it on one line and exits 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class QatuneError(Exception):
    """A user-fixable error: printed without a traceback, exit status 2."""


class ConfigError(QatuneError, ValueError):
    """An option or configuration value is of the wrong type or out of range."""


class ModelError(ConfigError):
    """A model name, path, precision or option that cannot be used with this model; the message says what to do."""


class TrainingError(QatuneError, RuntimeError):
    """A run that cannot go on; the message says at which step and what was kept."""


class Interrupted(TrainingError):
    """A run was asked to stop (Ctrl-C, SIGTERM) and saved a checkpoint first; ``--resume`` continues it."""


class FileError(QatuneError, OSError):
    """A file is missing, unreadable, damaged or of the wrong format."""


def unreadable(path: str | Path, what: str, err: BaseException, fix: str = "") -> FileError:
    """A FileError naming the file, what it should be, the reason and (optionally) the fix."""
    if isinstance(err, FileNotFoundError):
        reason = "not found"
    elif isinstance(err, IsADirectoryError):
        reason = "is a directory, not a file"
    elif isinstance(err, PermissionError):
        reason = "permission denied"
    elif isinstance(err, UnicodeDecodeError):
        reason = f"not UTF-8 text (byte {err.start}: {err.reason})"
    else:
        reason = str(err) or type(err).__name__
    return FileError(f"{path}: {what} {reason}" + (f"; {fix}" if fix else ""))


def read_json(path: str | Path, what: str):
    """A JSON file (gzip-compressed or not) parsed, or a FileError naming the file, what it is and the fix."""
    import gzip
    import json

    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw.decode("utf-8"))
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise unreadable(path, f"{what} file", e, "give a UTF-8 JSON file (gzip-compressed is fine)") from e
    except json.JSONDecodeError as e:
        raise FileError(f"{path}: {what} file is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
