"""A study's results store: one SQLite file, written only by study drivers, in short transactions.

Runs are *claimed* before they train: a claim is an atomic ``BEGIN IMMEDIATE`` update that takes a pending
run, or a running one whose lease has expired (its driver stopped renewing it) or whose owner process is
gone (same host), and gives it an owner and a lease. The owning driver renews the leases of its runs while
their workers report progress, so two drivers on one study never train the same run, and a run lost with
its driver or worker is claimed again and resumes from its checkpoint. WAL journaling and FULL sync keep
the file consistent through ``kill -9`` at any moment.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from qatune.errors import QatuneError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    arm TEXT NOT NULL,
    point TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'finished', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    metrics TEXT,
    costs TEXT,
    output_dir TEXT NOT NULL,
    owner TEXT,
    lease_until REAL,
    heartbeat_at REAL,
    worker TEXT,
    step INTEGER,
    total_steps INTEGER,
    ord INTEGER,
    curve TEXT
);
"""
# Each time a study file is run its current grid is registered: a report covers the latest one by default.
GRID_SCHEMA = """
CREATE TABLE IF NOT EXISTS grids (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    registered_at REAL NOT NULL,
    study TEXT NOT NULL,
    file TEXT NOT NULL,
    headline TEXT,
    run_ids TEXT NOT NULL
);
"""
# Columns for claims, progress and learning curves, added to databases written before they existed.
CLAIM_COLUMNS = {"owner": "TEXT", "lease_until": "REAL", "heartbeat_at": "REAL", "worker": "TEXT",
                 "step": "INTEGER", "total_steps": "INTEGER", "ord": "INTEGER", "curve": "TEXT",
                 # tuning candidates: their configuration group, stage (candidate | paused | pruned | winner; chosen:
                 # an earlier version's winner, which went on to its test evaluation), the rung they train towards,
                 # the step they pause at and [{rung, step, f1}]
                 "grp": "TEXT", "stage": "TEXT", "rung": "INTEGER", "pause_at": "INTEGER", "scores": "TEXT"}
DECISIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (grp TEXT PRIMARY KEY, chosen TEXT NOT NULL, decided_at REAL NOT NULL);
"""
# A decision's winning candidate and the step of the rung that chose it; ``failed``: why none could be chosen (no
# candidate reached a rung: ``chosen`` is then null), until --retry-failed.
DECISION_COLUMNS = {"winner": "TEXT", "step": "INTEGER", "failed": "TEXT"}
TERMINAL_STAGES = ("paused", "pruned", "winner")  # a candidate in one of these is not claimed


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: a driver process, identified across hosts."""

    host: str
    pid: int
    token: str

    @classmethod
    def new(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            host, pid, token = text.rsplit(":", 2)
            return cls(host, int(pid), token)
        except (ValueError, AttributeError):
            return None

    def is_gone(self) -> bool:
        """True when this owner ran on this host and its process no longer exists (no need to wait for the
        lease to expire). PID reuse can only make this say "alive" wrongly, which costs a lease wait."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class StoreError(QatuneError, RuntimeError):
    """A study database that cannot be used; the message names the file and what to do."""


class OtherStudy(StoreError):
    """The study directory holds another study (by name)."""

    def __init__(self, name: str, file: str):
        super().__init__(f"the study directory holds the study {name!r} (from {file})")
        self.name, self.file = name, file


DB_FILE = "study.sqlite"


def exists(directory: Path) -> bool:
    """Whether ``directory`` holds a study database (a look at a study must not create one)."""
    return (Path(directory) / DB_FILE).exists()


def connect(directory: Path, wait_s: float = 60.0) -> sqlite3.Connection:
    """Open (or create) the study database. Several drivers may open it at once: a lock held by another one
    is waited for; a file that is not a usable database is refused with what to do."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the study directory {directory} ({e.strerror or e}); give a directory you "
                         f"can write to (--dir)") from e
    path = directory / DB_FILE
    if path.exists() and path.stat().st_size == 0 and any((directory / "runs").glob("*")):
        raise _unusable(path, ValueError("the file is empty, but runs/ holds run directories"))
    deadline = time.time() + wait_s
    while True:
        try:
            return _open(path)
        except sqlite3.OperationalError as e:
            if not _is_busy(e) or time.time() > deadline:
                raise _unusable(path, e) from e
            time.sleep(0.2)
        except sqlite3.DatabaseError as e:
            raise _unusable(path, e) from e


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=60000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]  # a small file: whole-file check is cheap
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        db.execute(SCHEMA)
        db.execute(GRID_SCHEMA)
        db.execute(DECISIONS_SCHEMA)
        for table, columns in (("runs", CLAIM_COLUMNS), ("decisions", DECISION_COLUMNS)):
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    try:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                    except sqlite3.OperationalError as e:
                        if "duplicate column" not in str(e):  # another driver added it a moment ago: fine
                            raise
    except BaseException:
        db.close()
        raise
    db.row_factory = sqlite3.Row
    return db


def _is_busy(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


def _unusable(path: Path, e: Exception) -> StoreError:
    return StoreError(f"{path}: not a usable study database ({e}); rebuild it from the run directories with "
                      f"`qatune study STUDY_FILE --rebuild-db` (finished runs are kept, nothing is retrained)")


def directory_of(db: sqlite3.Connection) -> Path:
    """The study directory of an open store (the folder of its file)."""
    return Path(db.execute("PRAGMA database_list").fetchone()[2]).parent


def _relative(db: sqlite3.Connection, run_dir: str) -> str:
    """A run directory as stored: relative to the study directory, so the study can be moved or copied."""
    try:
        return str(Path(run_dir).resolve().relative_to(directory_of(db).resolve()))
    except ValueError:  # outside the study directory: kept as given
        return run_dir


def run_dir(directory: Path, rid: str, stored: str) -> Path:
    """Where a run's files are: stored paths are relative to the study directory. Stores written before
    that hold absolute paths; the study's own ``runs/<id>`` wins, so a copied study reads its own files."""
    p = Path(stored)
    if not p.is_absolute():
        return directory / p
    own = directory / "runs" / rid
    return own if own.exists() or not p.exists() else p


def register(db: sqlite3.Connection, runs: Sequence, candidates: Collection[str] = ()) -> None:
    """Insert the study's runs that the store does not know yet (as pending), in the study's order, and name the
    known ones as the file does now (an arm renamed keeps its runs). A run that is no tuning candidate now
    (``candidates``: the ids that are) leaves the tuned configuration an earlier version of the file had it in:
    e.g. a former candidate whose seed became a final seed trains as a final run, not waits as a candidate."""
    with db:
        for k, r in enumerate(runs):
            db.execute("INSERT OR IGNORE INTO runs (id, arm, point, config, status, created_at, output_dir, ord) "
                       "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                       (r.id, r.arm, json.dumps(r.point), json.dumps(asdict(r.config)), time.time(),
                        _relative(db, r.config.output_dir), k))
            db.execute("UPDATE runs SET ord=COALESCE(ord, ?), arm=?, point=? WHERE id=?",
                       (k, r.arm, json.dumps(r.point), r.id))
            if r.id not in candidates:
                db.execute("UPDATE runs SET grp=NULL, stage=NULL, rung=NULL, pause_at=NULL WHERE id=? AND "
                           "grp IS NOT NULL AND status != 'running'", (r.id,))


def register_grid(db: sqlite3.Connection, study: str, file: str, headline: Sequence[str] | None,
                  ids: Sequence[str]) -> None:
    """Record the study file's grid as it is now (its run ids in order, its headline arms); :class:`OtherStudy`
    if a study of another name registered here first (checked and written in one transaction)."""
    with immediate(db):
        other = db.execute("SELECT study, file FROM grids WHERE study != ? ORDER BY seq LIMIT 1", (study,)).fetchone()
        if other is not None:
            raise OtherStudy(other["study"], other["file"])
        db.execute("INSERT INTO grids (registered_at, study, file, headline, run_ids) VALUES (?, ?, ?, ?, ?)",
                   (time.time(), study, file, json.dumps(list(headline) if headline else None), json.dumps(list(ids))))


def latest_grid(db: sqlite3.Connection) -> dict | None:
    """The last registered grid: ``{study, file, headline, run_ids, registered_at}``, or None (older stores)."""
    row = db.execute("SELECT * FROM grids ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return None
    d = dict(row)
    d["headline"] = json.loads(d["headline"]) if d["headline"] else None
    d["run_ids"] = json.loads(d["run_ids"])
    return d


def rows(db: sqlite3.Connection, ids: Iterable[str] | None = None) -> list[dict]:
    """The stored runs (``output_dir`` resolved to where the run's files are now)."""
    wanted = set(ids) if ids is not None else None
    directory = directory_of(db)
    out = []
    for row in db.execute("SELECT * FROM runs ORDER BY created_at, ord, id"):
        d = dict(row)
        if wanted is not None and d["id"] not in wanted:
            continue
        for k in ("point", "config", "metrics", "costs", "curve", "scores"):
            d[k] = json.loads(d[k]) if d[k] else None
        d["output_dir"] = str(run_dir(directory, d["id"], d["output_dir"]))
        out.append(d)
    return out


def reopen(db: sqlite3.Connection, rid: str, reason: str) -> None:
    """A finished run whose files cannot be trusted any more: pending again, with a fresh attempt budget."""
    with db:
        db.execute("UPDATE runs SET status='pending', attempts=0, metrics=NULL, costs=NULL, error=? "
                   "WHERE id=? AND status='finished'", (f"finished before, but {reason}; trained again", rid))


def restore(db: sqlite3.Connection, rid: str, metrics: dict, costs: dict, curve: list, finished_at: float) -> None:
    """Mark a run finished from its run directory (rebuilding a damaged store)."""
    with db:
        db.execute("UPDATE runs SET status='finished', attempts=1, finished_at=?, metrics=?, costs=?, curve=? "
                   "WHERE id=?", (finished_at, json.dumps(metrics), json.dumps(costs), json.dumps(curve or []), rid))


def set_aside(directory: Path) -> Path | None:
    """Move a damaged study.sqlite (with its WAL files) aside; returns its new name."""
    path = directory / DB_FILE
    if not path.exists():
        return None
    aside = path.with_name(f"study.sqlite.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    return aside


def immediate(db: sqlite3.Connection):
    """A write transaction taken at once (BEGIN IMMEDIATE), so claim decisions see no concurrent writer."""

    class _Tx:
        def __enter__(self):
            db.execute("BEGIN IMMEDIATE")
            return db

        def __exit__(self, exc_type, exc, tb):
            db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            return False

    return _Tx()


def claim(db: sqlite3.Connection, ids: Sequence[str], owner: Owner, lease_s: float, max_attempts: int,
          worker: str) -> str | None:
    """Claim the first claimable run of ``ids`` (study order) for ``owner``; returns its id, or None.

    A running run whose lease expired or whose owner is gone counts as lost: claimed again while it has
    attempts left (it resumes from its checkpoint), else marked failed with the reason.
    """
    now = time.time()
    wanted = set(ids)
    with immediate(db):
        for row in db.execute("SELECT id, status, owner, lease_until, attempts FROM runs WHERE status IN "
                              "('pending', 'running') AND COALESCE(stage, '') NOT IN ('paused', 'pruned', 'winner') "
                              "ORDER BY ord, created_at, id").fetchall():
            if row["id"] not in wanted:
                continue
            note = None
            if row["status"] == "running":
                holder = Owner.parse(row["owner"] or "")
                expired = (row["lease_until"] or 0) < now
                if not expired and not (holder and holder.is_gone()):
                    continue
                note = (f"attempt {row['attempts']} was lost: its driver {row['owner']} "
                        f"{'stopped renewing its lease' if expired else 'is no longer running'}")
                if row["attempts"] >= max_attempts:
                    db.execute("UPDATE runs SET status='failed', finished_at=?, owner=NULL, lease_until=NULL, "
                               "error=? WHERE id=?", (now, note + f"; {max_attempts} attempts used", row["id"]))
                    continue
            db.execute("UPDATE runs SET status='running', attempts=attempts+1, owner=?, lease_until=?, "
                       "heartbeat_at=?, started_at=?, worker=?, step=NULL, total_steps=NULL, "
                       "error=COALESCE(?, error) WHERE id=?",
                       (str(owner), now + lease_s, now, now, worker, note, row["id"]))
            return row["id"]
    return None


def renew(db: sqlite3.Connection, owner: Owner, lease_s: float, progress: dict[str, dict]) -> None:
    """Extend the leases of ``owner``'s runs and store their progress (step, total, where)."""
    now = time.time()
    with db:
        for rid, p in progress.items():
            db.execute("UPDATE runs SET lease_until=?, heartbeat_at=?, step=COALESCE(?, step), "
                       "total_steps=COALESCE(?, total_steps), worker=COALESCE(?, worker) "
                       "WHERE id=? AND owner=? AND status='running'",
                       (now + lease_s, now, p.get("step"), p.get("total_steps"), p.get("worker"), rid, str(owner)))


def finish(db: sqlite3.Connection, rid: str, owner: Owner, metrics: dict, costs: dict,
           curve: list | None = None) -> None:
    with db:
        db.execute("UPDATE runs SET status='finished', finished_at=?, metrics=?, costs=?, curve=?, owner=NULL, "
                   "lease_until=NULL, error=NULL WHERE id=? AND owner=?",
                   (time.time(), json.dumps(metrics), json.dumps(costs), json.dumps(curve or []), rid, str(owner)))


def fail(db: sqlite3.Connection, rid: str, owner: Owner, error: str, max_attempts: int) -> bool:
    """Record a failed attempt; the run goes back to pending while it has attempts left. True when final."""
    with db:
        row = db.execute("SELECT attempts FROM runs WHERE id=?", (rid,)).fetchone()
        final = row["attempts"] >= max_attempts
        db.execute("UPDATE runs SET status=?, finished_at=?, error=?, owner=NULL, lease_until=NULL "
                   "WHERE id=? AND owner=?",
                   ("failed" if final else "pending", time.time(), error, rid, str(owner)))
    return final


def release(db: sqlite3.Connection, rid: str, owner: Owner) -> None:
    """Give a run back untouched (a clean stop): pending again, and the interrupted attempt does not count."""
    with db:
        db.execute("UPDATE runs SET status='pending', attempts=MAX(attempts-1, 0), owner=NULL, lease_until=NULL "
                   "WHERE id=? AND owner=? AND status='running'", (rid, str(owner)))


def retry_failed(db: sqlite3.Connection, ids: Sequence[str]) -> int:
    """Make the failed runs among ``ids`` pending again with a fresh attempt budget; a tuned configuration that
    failed (no candidate reached a rung) is undecided again, its failed candidates going on from their checkpoints."""
    with immediate(db):
        count, groups = 0, set()
        for rid in ids:
            row = db.execute("SELECT grp FROM runs WHERE id=? AND status='failed' AND COALESCE(stage, '') != 'pruned'",
                             (rid,)).fetchone()
            if row is None:
                continue
            count += db.execute("UPDATE runs SET status='pending', attempts=0 WHERE id=?", (rid,)).rowcount
            if row["grp"]:
                groups.add(row["grp"])
        for grp in groups:
            db.execute("DELETE FROM decisions WHERE grp=? AND failed IS NOT NULL", (grp,))
        return count


def statuses(db: sqlite3.Connection, ids: Sequence[str]) -> dict[str, str]:
    """Each run's status; a tuning candidate waiting for its rung's decision is "paused", a dropped one "pruned",
    the chosen one "winner" (its values' final runs are other runs)."""
    wanted = set(ids)
    return {r["id"]: r["stage"] if r["stage"] in TERMINAL_STAGES else r["status"]
            for r in db.execute("SELECT id, status, stage FROM runs") if r["id"] in wanted}


def extend_grid(db: sqlite3.Connection, ids: Sequence[str]) -> None:
    """Add runs made during the study (a tuned configuration's final seeds) to its latest registered grid."""
    with immediate(db):
        row = db.execute("SELECT seq, run_ids FROM grids ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            known = json.loads(row["run_ids"])
            db.execute("UPDATE grids SET run_ids=? WHERE seq=?",
                       (json.dumps(known + [i for i in ids if i not in known]), row["seq"]))
