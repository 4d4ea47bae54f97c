"""A tuned study's state in study.sqlite: where each candidate pauses, the scores it paused with, and the
decisions of successive halving (which candidates go on to the next rung, which value wins), claimed and written
under the store's locks so that workers and drivers agree."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from qatune.study.store import Owner, StoreError, directory_of, immediate
from qatune.study.tuning import finished_pauses, play, rung_score


def pause_at(db: sqlite3.Connection, rid: str) -> int | None:
    row = db.execute("SELECT stage, pause_at FROM runs WHERE id=?", (rid,)).fetchone()
    return row["pause_at"] if row and row["stage"] == "candidate" else None


def pause(db: sqlite3.Connection, rid: str, owner: Owner, step: int, score: float, end: bool = False) -> None:
    """A candidate reached its rung (``end``: or the end of its run, before it): it waits (pending, not claimable)
    with its validation score. Like a clean stop, the attempt does not count: a candidate's claims are one per rung,
    and only failures use its attempts."""
    with immediate(db):
        row = db.execute("SELECT scores FROM runs WHERE id=? AND owner=?", (rid, str(owner))).fetchone()
        if row is None:
            return
        db.execute("UPDATE runs SET status='pending', stage='paused', scores=?, step=?, owner=NULL, lease_until=NULL, "
                   "error=NULL, attempts=MAX(attempts-1, 0) WHERE id=?",
                   (json.dumps(_with_pause(row["scores"], step, score, end)), step, rid))


def restore_pauses(db: sqlite3.Connection, rid: str, pauses: dict[int, float], end: int | None = None) -> None:
    """A candidate's pause scores (and the step its run ended at, if it did) read back from its run directory
    (rebuilding a damaged store)."""
    with db:
        row = db.execute("SELECT scores FROM runs WHERE id=?", (rid,)).fetchone()
        scores = row["scores"] if row else None
        for step, f1 in sorted(pauses.items()):
            scores = json.dumps(_with_pause(scores, step, f1, step == end))
        db.execute("UPDATE runs SET scores=?, step=COALESCE(?, step) WHERE id=?", (scores, max(pauses, default=None), rid))


def _with_pause(scores: str | None, step: int, f1: float, end: bool = False) -> list[dict]:
    """The stored pauses ([{step, f1}, with ``end`` at the end of the run], by step) with one more (a pause at the
    same step replaces it)."""
    out = ([s for s in json.loads(scores or "[]") if s["step"] != step]
           + [{"step": step, "f1": f1, **({"end": True} if end else {})}])
    return sorted(out, key=lambda s: s["step"])


@dataclass(frozen=True)
class Decision:
    """A tuned configuration's outcome: its chosen values (from its ``winner`` candidate, scored at ``step``; None
    for a lone candidate, chosen without training), or ``error`` when no candidate reached a rung (``chosen``
    None). ``new``: taken by this call, not read back."""

    chosen: dict | None
    winner: str | None = None
    step: int | None = None
    error: str | None = None
    new: bool = False


def decide(db: sqlite3.Connection, grp: str, values: dict[str, dict], schedule: Sequence[int], eta: int,
           keep: str) -> Decision | None:
    """Bring the tuned configuration ``grp`` (its candidates: ``values``, run id -> tuned values, in study order) up
    to date and return its :class:`Decision` once there is one (now or before), else None. One transaction, so
    drivers agree.

    A decision stands while the configuration's candidates are the ones it was taken among. Otherwise (none yet, a
    value added or removed since) the stages are played again from the candidates' pause scores by
    :func:`qatune.study.tuning.play`: a finished run that became a candidate counts with the scores its learning curve
    gives at the rungs (``keep``: the model a run keeps), a candidate that failed every attempt is out, and a
    configuration none of whose candidates reached a rung fails with their errors (``failed``), so that nobody
    waits for it. A run that is no candidate any more leaves the configuration."""
    ids = list(values)
    with immediate(db):
        members = {r["id"] for r in db.execute("SELECT id FROM runs WHERE grp=?", (grp,))}
        done = db.execute("SELECT * FROM decisions WHERE grp=?", (grp,)).fetchone()
        if done is not None and members == set(ids):
            return Decision(json.loads(done["chosen"]), done["winner"], done["step"], done["failed"])
        if members != set(ids):  # another version of the file: not while a live driver trains the other set
            held = [r for r in db.execute("SELECT id, owner FROM runs WHERE grp=? AND status='running' AND "
                                          "lease_until > ?", (grp, time.time())) if r["id"] not in ids]
            if held:
                raise StoreError(f"{directory_of(db)}: another driver ({held[0]['owner']}) is training candidate "
                                 f"{held[0]['id']} of tuned configuration {grp}, which this study file no longer "
                                 f"tries: two versions of one study file cannot run at once. Stop that driver (its "
                                 f"runs keep their checkpoints), or give this version its own --dir")
        rows = {r["id"]: r for r in db.execute(
            f"SELECT id, status, scores, curve, error FROM runs WHERE id IN ({','.join('?' * len(ids))})", ids)}
        pauses, ends = {}, {}
        for rid, r in rows.items():
            stored = json.loads(r["scores"] or "[]")
            pauses[rid] = {s["step"]: s["f1"] for s in stored}
            end = next((s["step"] for s in stored if s.get("end")), None)
            if end is not None:
                ends[rid] = end
            if r["status"] == "finished" and r["curve"]:
                adopted, ends[rid] = finished_pauses(json.loads(r["curve"]), list(schedule), keep)
                pauses[rid] = {**adopted, **pauses[rid]}
        failed = {rid for rid, r in rows.items() if r["status"] == "failed"}
        outcome = play([rid for rid in ids if rid in rows], pauses, failed, list(schedule), eta, ends)
        db.execute(f"UPDATE runs SET grp=NULL, stage=NULL, rung=NULL, pause_at=NULL WHERE grp=? AND id NOT IN "
                   f"({','.join('?' * len(ids))})", (grp, *ids))
        for rid, st in outcome.stages.items():
            scores = [{"rung": k, "step": at[0], "f1": at[1]} for k in range(len(schedule))
                      if k <= st["rung"] and (at := rung_score(pauses[rid], list(schedule), k, ends.get(rid)))
                      is not None]
            db.execute("UPDATE runs SET grp=?, stage=?, rung=?, pause_at=?, scores=? WHERE id=?",
                       (grp, st["stage"], st["rung"], st["pause_at"],
                        json.dumps(_all_pauses(pauses[rid], scores, ends.get(rid))), rid))
        db.execute("DELETE FROM decisions WHERE grp=?", (grp,))
        if outcome.winner is not None:
            chosen = values[outcome.winner]
            db.execute("INSERT INTO decisions (grp, chosen, decided_at, winner, step) VALUES (?, ?, ?, ?, ?)",
                       (grp, json.dumps(chosen), time.time(), outcome.winner, outcome.step))
            return Decision(chosen, outcome.winner, outcome.step, new=True)
        if outcome.failed_rung is not None:
            k = outcome.failed_rung
            where = f"step {schedule[k]}" if k < len(schedule) - 1 else "the end of its run"
            error = (f"no candidate reached {where} (rung {k + 1} of {len(schedule)}): "
                     + "; ".join(f"{rid}: {_first_line(rows[rid]['error'])}" for rid in outcome.unreached))
            db.execute("INSERT INTO decisions (grp, chosen, decided_at, failed) VALUES (?, 'null', ?, ?)",
                       (grp, time.time(), error))
            return Decision(None, error=error, new=True)
        return None


def _all_pauses(pauses: dict[int, float], rung_scores: list[dict], end: int | None) -> list[dict]:
    """What a candidate's ``scores`` column keeps: every pause ({step, f1}, by step), those that were its rungs'
    scores with their ``rung`` (the last of them, when a run's end stands for several), its run's end marked."""
    rung_of = {s["step"]: s["rung"] for s in rung_scores}
    return [{"step": step, "f1": f1, **({"rung": rung_of[step]} if step in rung_of else {}),
             **({"end": True} if step == end else {})} for step, f1 in sorted(pauses.items())]


def _first_line(error: str | None) -> str:
    return error.strip().splitlines()[0][:200] if error and error.strip() else "failed"


def decisions(db: sqlite3.Connection, candidates: dict[str, Sequence[str]] | None = None) -> dict[str, dict]:
    """The chosen tuned values of every decided configuration group (not those that failed); with ``candidates``
    (group -> its candidates' run ids in the study file now), only the decisions taken among exactly those (a
    decision for other candidates is retaken by the next ``qatune study``)."""
    out = {r["grp"]: json.loads(r["chosen"]) for r in db.execute("SELECT grp, chosen, failed FROM decisions")
           if r["failed"] is None}
    if candidates is None:
        return out
    members: dict[str, set] = {}
    for r in db.execute("SELECT id, grp FROM runs WHERE grp IS NOT NULL"):
        members.setdefault(r["grp"], set()).add(r["id"])
    return {g: v for g, v in out.items() if g in candidates and members.get(g) == set(candidates[g])}


def failed_decisions(db: sqlite3.Connection) -> dict[str, str]:
    """Tuned configurations none of whose candidates reached a rung, with why (their errors)."""
    return {r["grp"]: r["failed"] for r in db.execute("SELECT grp, failed FROM decisions WHERE failed IS NOT NULL")}


