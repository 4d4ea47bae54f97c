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

from qatune.keep import kept_point

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


def expected_max(scores: list[float], trials: int) -> tuple[float, float]:
    """Expected best of ``trials`` configurations drawn (with replacement) from those tried, and its standard
    deviation: Dodge et al., "Show Your Work" (EMNLP 2019), the closed form over the empirical distribution of the
    tried scores (the band they draw is mean +- this SD)."""
    v = sorted(scores)
    n = len(v)
    weights = [(i / n) ** trials - ((i - 1) / n) ** trials for i in range(1, n + 1)]
    mean = sum(x * w for x, w in zip(v, weights))
    second = sum(x * x * w for x, w in zip(v, weights))
    return mean, max(second - mean * mean, 0.0) ** 0.5


def at_edge(values: list, chosen) -> bool:
    """A chosen number at the smallest or largest value tried: the best may lie outside the range."""
    numbers = [x for x in values if isinstance(x, int | float) and not isinstance(x, bool)]
    return len(numbers) == len(values) >= 2 and chosen in (min(numbers), max(numbers))


def summarize(rows: list[dict], chosen: dict[str, dict], failed: dict[str, str] | None = None) -> list[dict]:
    """Per tuned configuration (rows of the store with a ``grp``): the values tried with their validation F1 at the
    last rung each reached, the value chosen (``chosen``: the store's decisions), whether it lies at the edge of
    its range, and why none was chosen (``failed``: no candidate reached a rung). Only validation numbers: a
    candidate's test score is never looked at."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("grp"):
            groups.setdefault(r["grp"], []).append(r)
    out = []
    for grp, members in groups.items():
        points = [{k: v for k, v in r["point"].items() if k != "seed"} for r in members]
        pick = chosen.get(grp)  # its keys are the tuned options, even of a lone candidate
        options = sorted(pick) if pick else sorted(k for k in points[0] if len({repr(p.get(k)) for p in points}) > 1)
        tried = []
        for r, p in zip(members, points):
            scores = [s for s in r.get("scores") or [] if "rung" in s]  # pauses off the rungs (an edit ago) aside
            last = scores[-1] if scores else {}
            tried.append({"value": p[options[0]] if len(options) == 1 else {k: p[k] for k in options},
                          "validation_f1": last.get("f1"), "steps": last.get("step"),
                          "rungs": [{"step": s["step"], "validation_f1": s["f1"]} for s in scores],
                          "stage": r.get("stage")})
        value = None if pick is None else (pick.get(options[0]) if len(options) == 1 else pick)
        out.append({"configuration": grp, "arm": members[0]["arm"],
                    "option": options[0] if len(options) == 1 else options, "tried": tried, "chosen": value,
                    "at_edge": value is not None and len(options) == 1 and at_edge([t["value"] for t in tried], value),
                    "point": {k: v for k, v in points[0].items() if k not in options},
                    "failed": (failed or {}).get(grp)})
    return out


def expected_max_curves(summary: list[dict]) -> list[dict]:
    """Per arm, the expected best validation F1 against the number of configurations tried, every candidate scored
    at one budget: the first rung's step, which all of them reached (scores at later rungs would mix budgets).
    Each curve: ``{"arm", "budget_steps", "curve": [{"trials", "expected_f1", "sd"}]}``."""
    firsts: dict[str, list[dict]] = {}
    for s in summary:
        for t in s["tried"]:
            if t["rungs"]:
                firsts.setdefault(s["arm"], []).append(t["rungs"][0])
    out = []
    for arm, points in firsts.items():
        budget = min(p["step"] for p in points)
        scores = [p["validation_f1"] for p in points if p["step"] == budget and p["validation_f1"] is not None]
        if scores:
            curve = [dict(zip(("expected_f1", "sd"), expected_max(scores, n)), trials=n)
                     for n in range(1, len(scores) + 1)]
            out.append({"arm": arm, "budget_steps": budget, "curve": curve})
    return out


def stable_from(a: list[dict], b: list[dict]) -> int | None:
    """The fewest trials from which arm a's expected best stays on the same side of arm b's (None: never)."""
    n = min(len(a), len(b))
    if not n:
        return None
    signs = [a[k]["expected_f1"] > b[k]["expected_f1"] for k in range(n)]
    k = n - 1
    while k > 0 and signs[k - 1] == signs[-1]:
        k -= 1
    return k + 1
