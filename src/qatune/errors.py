"""One base class for every error a user can cause or fix, so `qatune` catches them in one place.

Here: the base, the families several stages raise (configuration and model, training with its interruption and
pause, files) and the helpers that read JSON files with such errors. The stages define their own beside the code
that raises them: ``SquadDataError`` (data.squad), ``FeatureError`` (data.features), ``ModelConfigError``
(model.load), ``TrackingError`` (train.tracking), ``ExportError`` (answer.export), ``StudyError`` (study.studyfile),
``StoreError`` (study.store), ``LaunchError`` (study.launch), ``ReportError`` (report.configs) and ``CliError``
(cli.common). Every message says what is wrong and what to do; `cli.main` prints it on one line and exits 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
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


class Paused(TrainingError):
    """A tuning candidate reached the step it was asked to pause at (``pause_at``): checkpoint saved, validated;
    the study driver promotes it (it resumes from there) or prunes it."""

    def __init__(self, step: int, score: float, end: bool = False):
        super().__init__(f"paused at step {step} with validation F1 {score:.2f}")
        self.step, self.score, self.end = step, score, end  # end: the run's last step (shorter than its rung)


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


def check_writable(path: str | Path, what: str, directory: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """Refuse, before any work is done, an output path that cannot be written or that would overwrite an input:
    a file where a directory is wanted (or the reverse), a path under a regular file, a place without write
    permission, or one of ``inputs`` itself (compared as resolved paths, so links and ``./`` do not hide it)."""
    path = Path(path)
    for given in inputs:
        if Path(given).exists() and path.exists() and os.path.samefile(given, path):
            raise FileError(f"{what} {path} is the input {given}: writing it would destroy the input; choose "
                            f"another path")
    if path.exists():
        if directory and not path.is_dir():
            raise FileError(f"{what} {path} is a file; give a directory (it is created if missing)")
        if not directory and path.is_dir():
            raise FileError(f"{what} {path} is a directory; give a file path")
    parent = path if directory else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FileError(f"{what} {path}: {parent} is a file, so nothing can be created under it; choose another "
                        f"path")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise FileError(f"{what} {path}: no permission to write to {path if path.exists() else parent}; choose a "
                        f"place you can write to")
