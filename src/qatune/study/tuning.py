"""Tuning an arm inside a study: the rules, as pure functions (the study file declares, the driver applies them).

Successive halving (Li et al., "A System for Massively Parallel Hyperparameter Tuning", MLSys 2020; Optuna's
``SuccessiveHalvingPruner`` and Ray Tune's ``ASHAScheduler`` implement the same rule): every candidate trains to the
first rung; the best 1/eta continue to the next, and so on to the full run. A candidate's schedule is its full
run's, so a promoted candidate continues from its checkpoint as an unpruned run would. ``grid`` trains every
candidate fully. Candidates are compared on validation F1 only, and train at a seed of their own (:func:`tuning_seed`):
the winner is never a final run. The choice is made at the first rung that leaves one candidate (a lone survivor
need not train on), else at the last rung.

A configuration's tuning state is a function of its candidates' scores (:func:`play`), not a history: after a
value is added or removed, a run finished before becoming a candidate, or a store is rebuilt, the same rule
applied to the same scores gives the same stages and the same choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qatune.train.keep import kept_point

METHODS = ("halving", "grid")


def rungs(candidates: int, total_steps: int, eval_steps: int, method: str = "halving", eta: int = 3) -> list[int]:
    """The steps at which candidates are compared: total_steps / eta^k for the rungs halving needs (each rounded up
    to a multiple of eval_steps, so a rung is a step every run evaluates at), the last one the full run."""
    if method == "grid" or candidates <= 1:
        return [total_steps]
    count = 1 + int(math.floor(math.log(candidates) / math.log(eta) + 1e-9))
    out = []
    for k in range(count - 1, 0, -1):
        step = math.ceil(total_steps / eta**k / eval_steps) * eval_steps
        if step < total_steps and (not out or step > out[-1]):
            out.append(step)
    return out + [total_steps]


END_OF_RUN = 2**31 - 1  # a last rung's pause: the run's own last step, however many steps it turns out to have


def pause_step(schedule: list[int], rung: int) -> int:
    """The step a candidate at ``rung`` pauses at: the rung's step, or the end of its run at the last rung (whose
    step in ``schedule`` may be an estimate, for runs given in epochs)."""
    return schedule[rung] if rung < len(schedule) - 1 else END_OF_RUN


def survivors(alive: int, eta: int, last: bool) -> int:
    """How many of ``alive`` candidates go on after a rung (one wins the last)."""
    return 1 if last else max(1, alive // eta)


def tuning_seed(seeds: list[int]) -> int:
    """The seed candidates train at: the smallest non-negative whole number that is not a final seed, so that no
    final run is the run its values were chosen on."""
    return next(s for s in range(len(seeds) + 1) if s not in seeds)


def promote(scores: list[tuple[str, float]], entrants: int, eta: int, last: bool) -> tuple[list[str], bool]:
    """A rung's decision: the ids that go on, best validation F1 first (the first of equals in ``scores``' order),
    and whether the choice is made (the last rung, or one left). ``scores`` are the candidates that reached the
    rung; ``entrants`` counts those that set out for it (a candidate that failed on the way is one of them)."""
    ranked = sorted(scores, key=lambda s: -s[1])  # stable: the first of equals in study order
    kept = [rid for rid, _ in ranked[:min(len(ranked), survivors(entrants, eta, last))]]
    return kept, last or len(kept) == 1


def rung_score(pauses: dict[int, float], schedule: list[int], rung: int,
               end: int | None = None) -> tuple[int, float] | None:
    """A candidate's (step, validation F1) at ``rung``: its pause at the rung's step (at the last rung, at or after
    it), else its pause at the end of its run (``end``: a run that ended, shorter than the rung, stands there with
    its last score); None when it has not reached the rung. A pause at another step (a rung of an earlier
    schedule) does not count: the candidate trains on to this one."""
    last = rung == len(schedule) - 1
    at = schedule[rung] if schedule[rung] in pauses else None
    if last:
        at = max((s for s in pauses if s >= schedule[rung]), default=None)
    if at is None and end is not None and end in pauses and (last or end <= schedule[rung]):
        at = end
    return None if at is None else (at, pauses[at])


def finished_pauses(curve: list[dict], schedule: list[int], keep: str) -> tuple[dict[int, float], int]:
    """The pauses a finished run stands for when it becomes a candidate, and its end: at each rung's step the
    validation F1 of the model it kept by then (as a candidate paused there would have), at its last step the one
    it kept at its end."""
    out = {}
    for step in schedule[:-1]:
        point = kept_point([p for p in curve if p["step"] <= step], keep)
        if point is not None:
            out[step] = point["f1"]
    end = curve[-1]["step"]
    out[end] = kept_point(curve, keep)["f1"]
    return out, end


@dataclass
class Play:
    """A tuned configuration's state: each candidate's ``{stage, rung, pause_at}`` (stage: candidate, to train to
    its rung; paused, waiting at it; pruned; winner), and the winner with the step it was chosen at, or the rung
    that no candidate reached (all that set out for it failed), or neither (a rung is still on)."""

    stages: dict[str, dict] = field(default_factory=dict)
    winner: str | None = None
    step: int | None = None
    failed_rung: int | None = None
    unreached: list[str] = field(default_factory=list)  # the failed candidates of ``failed_rung``


def play(ids: list[str], pauses: dict[str, dict[int, float]], failed: set[str], schedule: list[int],
         eta: int, ends: dict[str, int] | None = None) -> Play:
    """Successive halving over the candidates ``ids`` (study order; the first of equals is kept) from their pause
    scores ({step: validation F1}; ``ends``: the step a candidate's run ended at, see :func:`rung_score`) and which
    of them failed every attempt. A rung is decided when no candidate is
    still on its way to it: among those that reached it the best 1/eta of those that set out go on, the rest and
    the failed are pruned; the values are chosen at the first rung that leaves one, or at the last. A lone
    candidate is chosen without training."""
    if len(ids) == 1:
        return Play({ids[0]: {"stage": "winner", "rung": 0, "pause_at": None}}, ids[0])
    out = Play({rid: {"stage": "candidate", "rung": 0, "pause_at": pause_step(schedule, 0)} for rid in ids})
    alive = list(ids)
    for k in range(len(schedule)):
        reached = {rid: at for rid in alive
                   if (at := rung_score(pauses.get(rid, {}), schedule, k, (ends or {}).get(rid))) is not None}
        for rid in alive:
            out.stages[rid] = {"stage": "paused" if rid in reached else "candidate", "rung": k,
                               "pause_at": pause_step(schedule, k)}
        if any(rid not in reached and rid not in failed for rid in alive):
            return out  # still on its way
        if not reached:
            out.failed_rung, out.unreached = k, alive
            return out
        kept, decided = promote([(rid, reached[rid][1]) for rid in alive if rid in reached], len(alive), eta,
                                k == len(schedule) - 1)
        for rid in alive:
            if rid not in kept:
                out.stages[rid]["stage"] = "pruned"
        if decided:
            out.stages[kept[0]].update(stage="winner", pause_at=None)
            out.winner, out.step = kept[0], reached[kept[0]][0]
            return out
        alive = kept
    return out


def planned_steps(candidates: int, schedule: list[int], eta: int) -> int:
    """Optimizer steps the candidates of one configuration train in all (a promoted one continues, not restarts),
    up to the rung that decides (one candidate left, or the last); a lone candidate is chosen without training."""
    total, alive, done = 0, candidates, 0
    for k, step in enumerate(schedule):
        if alive <= 1:
            break
        total += alive * (step - done)
        done = step
        alive = survivors(alive, eta, k == len(schedule) - 1)
    return total
