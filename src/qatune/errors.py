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
