"""The study driver: claims a study's runs in its results store and hands them to a launcher.

The study file is read by `qatune.study.studyfile`, its cost estimated by `qatune.study.plan`. :func:`run_study` expands
nothing itself: it registers the runs in ``study.sqlite`` (`qatune.study.store`), claims them one at a time and
starts each on a free slot of a launcher (`qatune.study.launch`: worker processes here, or Ray tasks). Each run trains
in a process of its own and its outcome comes back to the driver, the only writer of the store.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path

from qatune.record import exact_match
from qatune.rundir import RunDir
from qatune.study import store, tuningstate
from qatune.study.launch import Launcher, Outcome, Slot
from qatune.study.studyfile import Group, Run, Study
from qatune.train.tracking import StudyTracker

LEASE_S = 120.0  # a run whose driver stopped renewing its lease this long ago is claimed again
STATUS_EVERY_S = 30.0


class StudyInterrupted(RuntimeError):
    """The driver was stopped (Ctrl-C); its runs were handed back with their checkpoints."""


def run_study(study: Study, launcher: Launcher | None = None, max_attempts: int = 3, retry_failed: bool = False,
              lease_s: float = LEASE_S, poll_s: float = 1.0, progress: bool = True) -> dict[str, int]:
    """Drive the study to its end: claim runs, start them on the launcher's slots, record every outcome.

    This process is the only writer of ``study.sqlite`` for its claims; several drivers (on one machine or
    many) may work on one study at once. A failed or lost attempt is retried up to ``max_attempts`` (the
    run resumes from its checkpoint); a failure is recorded with its error. Returns run counts by status.
    """
    from qatune.study.launch import LocalLauncher

    driver = _Driver(study, launcher or LocalLauncher(workers=1), max_attempts, lease_s, progress)
    try:  # SIGTERM (timeout, systemd, a job scheduler) stops as Ctrl-C does: checkpoints first
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: its caller owns the signals
        previous = None
    try:
        driver.open(retry_failed)
        while driver.step():
            time.sleep(poll_s)
    except KeyboardInterrupt:
        stopped = driver.stop()
        kept = f"{stopped} run(s) were running and keep their checkpoints" if stopped else "no run was left half-done"
        raise StudyInterrupted(f"stopped; {kept}. Run the same command again to continue (--status shows where "
                               f"the study is).") from None
    finally:
        driver.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return driver.counts()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class _Driver:
    """One driver's state: its claims (``active``), its free slots, and the store it alone writes for them."""

    def __init__(self, study: Study, launcher: Launcher, max_attempts: int, lease_s: float, progress: bool):
        self.study, self.launcher, self.max_attempts, self.lease_s = study, launcher, max_attempts, lease_s
        self.say = (lambda text: print(text, flush=True)) if progress else (lambda text: None)
        self.ids = [r.id for r in study.runs]
        self.by_id = {r.id: r for r in study.runs}
        self.owner = store.Owner.new()
        self.free: list[Slot] = list(launcher.slots)
        self.active: dict[str, Slot] = {}
        self.shared: dict[str, int] = {}  # most runs of this driver that shared a run's device with it
        self.waiting = False
        self.last_status = time.time()
        self.db = None
        self.tracker = None
        self.group_of: dict[str, Group] = {}  # candidate run id -> its tuned configuration
        self.decided: set[str] = set()  # configurations whose decision this driver knows (chosen or failed)
        self.seen: dict[str, str] = {}  # run statuses when this driver last looked for decisions to take

    def open(self, retry_failed: bool) -> None:
        self.db = store.connect(self.study.directory)
        register(self.db, self.study)
        self.group_of = {run.id: g for g in self.study.groups for _, run in g.candidates}
        known = set(self.ids)
        retried = store.retry_failed(self.db, self.ids) if retry_failed else 0  # failed configurations too
        for g in self.study.groups:  # its candidates' stages (values added or removed since: played again), a
            self.decide(g)  # decision left to make (a driver stopped before it), or taken: its final runs
        for rid, why in untrusted_finished(self.db, list(self.by_id.values())).items():
            store.reopen(self.db, rid, why)
            self.say(f"run {rid} was finished but {why}: training it again")
        if retry_failed:  # the final runs of configurations decided before
            retried += store.retry_failed(self.db, [r for r in self.ids if r not in known])
        if retried:
            self.say(f"retrying {retried} failed run(s)")
        self.tracker = StudyTracker(self.study)

    def step(self) -> bool:
        """Collect outcomes, fill free slots, renew leases; False once no run is left to do."""
        for o in self.launcher.poll():
            self.record(o)
        self.start_runs()
        for rid, slot in self.active.items():
            others = sum(self.launcher.shares_device(slot, s) for r, s in self.active.items() if r != rid)
            self.shared[rid] = max(self.shared.get(rid, 0), others)
        reports = {rid: RunDir(self.by_id[rid].config.output_dir).read_progress() for rid in self.active}
        store.renew(self.db, self.owner, self.lease_s,
                    {rid: {"step": p.get("step"), "total_steps": p.get("total_steps"),
                           "worker": _where(self.active[rid], p)} for rid, p in reports.items()})
        if not self.active:
            states = store.statuses(self.db, self.ids)
            if states != self.seen:  # a candidate failed or was lost elsewhere: a rung may be decidable now
                self.seen = states
                for g in self.study.groups:
                    if g.id not in self.decided:
                        self.decide(g)
                states = store.statuses(self.db, self.ids)
            if not any(s in ("pending", "running", "paused") for s in states.values()):
                return False
            if "running" not in states.values():  # nothing claimable here, and no other driver holds a run
                stuck = sorted(rid for rid, s in states.items() if s in ("pending", "paused"))
                raise store.StoreError(f"{self.study.directory}: run(s) {', '.join(stuck)} wait for a tuning "
                                       f"decision that cannot be taken (a bug: please report it with this study "
                                       f"file); finished runs are kept")
            if not self.waiting:
                self.say("waiting: the remaining runs are held by another driver (they are claimed here if it stops)")
                self.waiting = True
        elif time.time() - self.last_status > STATUS_EVERY_S:
            self.last_status = time.time()
            self.say("  running: " + "; ".join(f"{rid} step {p.get('step', 0)}/{p.get('total_steps', '?')}"
                                               for rid, p in reports.items()))
        return True

    def start_runs(self) -> None:
        while self.free:
            slot = self.free[0]
            rid = store.claim(self.db, self.ids, self.owner, self.lease_s, self.max_attempts, slot.describe())
            if rid is None:
                return
            self.free.pop(0)
            run = self.by_id[rid]
            if rid in self.group_of:  # a candidate trains to its rung (or, chosen, to the end)
                run = Run(run.id, run.arm, replace(run.config, pause_at=tuningstate.pause_at(self.db, rid)), run.point)
            self.launcher.submit(run, slot)
            self.active[rid] = slot
            self.waiting = False
            done = sum(s == "finished" for s in store.statuses(self.db, self.ids).values())
            label = ", ".join(f"{k}={v}" for k, v in run.point.items()) or "no grid"
            self.say(f"[{done}/{self.study.final_runs} done] start {rid}: {run.arm} ({label}) on {slot.describe()}")

    def record(self, o: Outcome) -> None:
        self.free.append(self.active.pop(o.run_id))
        self.free.sort(key=lambda s: s.index)
        neighbours = self.shared.pop(o.run_id, 0)
        run = self.by_id[o.run_id]
        if o.status == "finished":
            store.finish(self.db, o.run_id, self.owner, o.record.metrics,
                         {**o.record.costs(), "shared_runs": neighbours}, o.record.curve)
            if run.config.report_to == "mlflow":
                self.tracker.log(o.run_id, run.arm, run.point, o.record)
            m = o.record.metrics
            score = f"EM {exact_match(m):.2f}, F1 {m['f1']:.2f}, " if m else ""
            self.say(f"  finished {o.run_id} ({run.arm}): {score}train {o.record.costs()['train_s']:.0f}s")
            if (o.record.inference or {}).get("error"):
                self.say(f"  inference cost of {o.run_id} not measured: {o.record.inference['error']} (kept in its "
                         f"run.json and listed in the report)")
        elif o.status == "paused":
            tuningstate.pause(self.db, o.run_id, self.owner, o.step, o.score, o.end)
            self.say(f"  paused {o.run_id} ({run.arm}) at step {o.step}: validation F1 {o.score:.2f}")
            self.decide(self.group_of[o.run_id])
        elif o.status == "interrupted":
            store.release(self.db, o.run_id, self.owner)
        else:
            final = store.fail(self.db, o.run_id, self.owner, o.error or o.status, self.max_attempts)
            first = (o.error or o.status).strip().splitlines()[0]
            candidate = " (a tuning candidate, left out of the choice)" if final and o.run_id in \
                self.group_of else ""
            self.say(f"  {'failed' if final else 'attempt failed (will retry)'}: {o.run_id}{candidate}: {first}")
            if final and o.run_id in self.group_of:
                self.decide(self.group_of[o.run_id])  # its rung may wait for it alone

    def decide(self, group: Group) -> None:
        """Promote or prune a rung's candidates when they are all in; once chosen, add the chosen values' final runs
        (every seed, each a fresh run); a configuration none of whose candidates reached a rung is reported failed."""
        decision = decide(self.db, group, self.study.eta)
        if decision is None:
            return
        self.decided.add(group.id)
        where = f"{group.arm} ({', '.join(f'{k}={v}' for k, v in group.point.items()) or 'its one configuration'})"
        if decision.chosen is None:
            if decision.new:
                self.say(f"  tuning failed for {where}, configuration {group.id}: {decision.error}")
            return
        finals = [group.run(decision.chosen, seed) for seed in group.seeds]
        new = [r for r in finals if r.id not in self.by_id]
        if new:
            if decision.new:
                at = f" at step {decision.step}" if decision.step is not None else " (its only candidate)"
                self.say(f"  chose {decision.chosen} for {where}{at} (candidate {decision.winner}): training it "
                         f"with seed(s) {', '.join(map(str, group.seeds))}")
            store.register(self.db, new)
            store.extend_grid(self.db, [r.id for r in new])
            self.ids += [r.id for r in new]
            self.by_id.update({r.id: r for r in new})

    def stop(self) -> int:
        """Ctrl-C: every running run saves a checkpoint and is handed back for the next driver."""
        self.say(f"stopping {len(self.active)} run(s): each saves a checkpoint first ...")
        kept = 0  # runs handed back to continue (not those that finished or paused as the stop came)
        for o in self.launcher.stop():
            # a worker killed by the stop before it could save (still starting up): handed back, no attempt used
            o = replace(o, status="interrupted") if o.status == "died" else o
            kept += o.status == "interrupted"
            self.record(o)
        for rid in list(self.active):
            store.release(self.db, rid, self.owner)
            kept += 1
        return kept

    def close(self) -> None:
        self.launcher.close()
        if self.tracker is not None:
            self.tracker.close()

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for status in store.statuses(self.db, self.ids).values():
            counts[status] = counts.get(status, 0) + 1
        self.db.close()
        return counts


def register(db, study: Study) -> None:
    """Record the study's runs and its grid as it is now; a directory holding another study is refused."""
    try:
        store.register_grid(db, study.name, str(study.path), study.headline, [r.id for r in study.runs])
    except store.OtherStudy as e:
        raise store.StoreError(f"{study.directory} holds the study {e.name!r} (from {e.file}), not "
                               f"{study.name!r} (from {study.path}): a study directory belongs to one study. "
                               f"Give this one its own --dir, or set [study] name = {e.name!r} if it is the same "
                               f"study under a new name") from None
    store.register(db, study.runs, {run.id for g in study.groups for _, run in g.candidates})


def untrusted_finished(db, runs: list[Run]) -> dict[str, str]:
    """Finished runs among ``runs`` whose run directory no longer holds what the report needs (deleted, damaged, or
    another configuration's files), with the reason."""
    out = {}
    by_id = {r.id: r for r in runs}
    for row in store.rows(db, by_id):
        if row["status"] == "finished":
            record, why = RunDir(row["output_dir"]).finished_record(by_id[row["id"]].config)
            if record is None:
                out[row["id"]] = why if Path(row["output_dir"]).is_dir() else "its run directory is gone"
    return out


def with_finals(study: Study, chosen: dict[str, dict]) -> list[Run]:
    """The study's runs with the final runs of its tuned configurations decided so far (``chosen``: the store's
    decisions): each configuration's chosen values at every seed, listed after its candidates."""
    last = {g.candidates[-1][1].id: g for g in study.groups if g.id in chosen}
    out = []
    for run in study.runs:
        out.append(run)
        if run.id in last:
            g = last[run.id]
            out += [g.run(chosen[g.id], seed) for seed in g.seeds]
    return out


def rebuild_store(study: Study) -> dict[str, int]:
    """A new study.sqlite from the run directories (the damaged one is moved aside): each run whose directory
    holds its finished record is finished, every other run is pending (it resumes from its checkpoints). A tuned
    configuration's rungs are replayed from the scores its candidates saved when they paused (``pauses.json``), so
    the same values are chosen and their final runs are found again; a rung not complete is left to be finished."""
    if store.exists(study.directory):
        try:
            store.connect(study.directory, wait_s=5).close()
        except store.StoreError:
            pass  # damaged: rebuilt below
        else:
            raise store.StoreError(f"{study.directory / store.DB_FILE} opens and passes SQLite's integrity check: "
                                   f"nothing to rebuild (--status shows its runs). --rebuild-db is for a database "
                                   f"that cannot be used; to rebuild a usable one anyway, move it aside first")
    aside = store.set_aside(study.directory)
    db = store.connect(study.directory)
    register(db, study)
    counts = {"finished": 0, "pending": 0}

    def restore(runs: list[Run]) -> None:
        for run in runs:
            run_dir = RunDir(run.config.output_dir)
            record, _ = run_dir.finished_record(run.config)
            if record is None:
                counts["pending"] += run.id not in candidates
                continue
            store.restore(db, run.id, record.metrics, record.costs(), record.curve, run_dir.record.stat().st_mtime)
            counts["finished"] += run.id not in candidates  # a finished run that became a candidate: not a result

    candidates = {run.id for g in study.groups for _, run in g.candidates}
    restore(study.runs)
    for g in study.groups:
        for _, run in g.candidates:
            run_dir = RunDir(run.config.output_dir)
            tuningstate.restore_pauses(db, run.id, run_dir.read_pauses(), run_dir.read_pause_end())
        decide(db, g, study.eta)
    finals = [r for r in with_finals(study, tuningstate.decisions(db)) if r.id not in {x.id for x in study.runs}]
    store.register(db, finals)
    store.extend_grid(db, [r.id for r in finals])
    restore(finals)
    if study.groups:
        decided = tuningstate.decisions(db)
        counts["tuned"] = len(decided)
        # final runs on disk whose configuration could not be decided again (e.g. its winner's directory is gone):
        # found once the candidates train again and the same values are chosen
        counts["awaiting_choice"] = sum(
            RunDir(run.config.output_dir).finished_record(run.config)[0] is not None
            for g in study.groups if g.id not in decided
            for values, _ in g.candidates for run in (g.run(values, seed) for seed in g.seeds))
    db.close()
    return {**counts, "set_aside": str(aside) if aside else None}


def decide(db, group: Group, eta: int) -> tuningstate.Decision | None:
    """The tuned configuration's state brought up to date in the store (:func:`qatune.tuningstate.decide`)."""
    return tuningstate.decide(db, group.id, {run.id: v for v, run in group.candidates}, group.schedule, eta,
                        group.candidates[0][1].config.resolved_keep())


def candidates_of(study: Study) -> dict[str, list[str]]:
    """Each tuned configuration's candidates' run ids, as the study file has them now."""
    return {g.id: [run.id for _, run in g.candidates] for g in study.groups}


def status(study: Study) -> list[dict]:
    """Each run of the study file as it is now, the final runs of its tuned configurations decided so far among
    them (``status`` "not started" before its first claim): ``{run, status, attempts, step, total_steps, worker,
    owner, error, metrics, train_s, stage, scores}`` (``stage``, ``scores``: a tuning candidate's, else None).
    Creates nothing.

    What the store says is checked against what is true: a finished run whose directory no longer holds its
    results is "to retrain" (the next ``qatune study`` trains it again), and a running run whose driver is gone
    or whose lease ran out is "stopped" (the next ``qatune study`` resumes it from its checkpoint)."""
    by_id, untrusted, runs = {}, {}, study.runs
    if store.exists(study.directory):
        db = store.connect(study.directory)
        runs = with_finals(study, tuningstate.decisions(db, candidates_of(study)))
        by_id = {r["id"]: r for r in store.rows(db, [r.id for r in runs])}
        untrusted = untrusted_finished(db, runs)
        db.close()
    out = []
    for run in runs:
        row = by_id.get(run.id, {})
        state, error = row.get("status", "not started"), row.get("error")
        if row.get("stage") in store.TERMINAL_STAGES:  # a tuning candidate waiting for its rung, dropped or chosen
            state = row["stage"]
        if run.id in untrusted:
            state, error = "to retrain", f"finished, but {untrusted[run.id]}: the next qatune study trains it again"
        elif state == "running" and _driver_gone(row):
            state, error = "stopped", (f"its driver ({row.get('owner')}) is gone: the next qatune study resumes it "
                                       f"from its checkpoint")
        out.append({"run": run, "status": state, "attempts": row.get("attempts", 0), "step": row.get("step"),
                    "total_steps": row.get("total_steps"), "worker": row.get("worker"), "owner": row.get("owner"),
                    "error": error, "metrics": (row.get("metrics") or {}) if state == "finished" else {},
                    "train_s": (row.get("costs") or {}).get("train_s") if state == "finished" else None,
                    "stage": row.get("stage"), "scores": row.get("scores")})
    return out


def failed_configurations(study: Study) -> list[tuple[Group, str]]:
    """The tuned configurations none of whose candidates reached a rung, with why (their errors)."""
    if not store.exists(study.directory):
        return []
    db = store.connect(study.directory)
    failed = tuningstate.failed_decisions(db)
    db.close()
    return [(g, failed[g.id]) for g in study.groups if g.id in failed]


def _driver_gone(row: dict) -> bool:
    """A running run's claim is dead: its driver process is gone (this host), or its lease ran out (any host)."""
    owner = store.Owner.parse(row.get("owner") or "")
    return (owner is not None and owner.is_gone()) or (row.get("lease_until") or 0) < time.time()


def _where(slot: Slot, progress: dict) -> str:
    host = progress.get("host")
    return f"{host}: {slot.describe()}" if host else slot.describe()
