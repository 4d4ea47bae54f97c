"""How each run's learning curve ended, judged against the noise of the questions it is measured on: a run still
improving at its budget understates what its configuration reaches, one on a plateau does not."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qatune.report.stats import contrast
from qatune.rundir import RunDir

EARLY, PLATEAU, IMPROVING = "early stop", "plateau", "improving"


@dataclass(frozen=True)
class Ending:
    """``state``: EARLY (early stopping fired), PLATEAU (the last evaluation did not beat the best one before it
    beyond the noise: the paired 95% interval of the gain over the curve questions reaches zero) or IMPROVING (the
    interval lies above zero). ``gain`` and ``ci`` in F1 points, last evaluation minus the best earlier one."""
    state: str
    step: int
    gain: float
    ci: tuple[float, float] | None

    def to_dict(self) -> dict:
        return {"state": self.state, "step": self.step, "gain": self.gain,
                "ci": list(self.ci) if self.ci else None}


def ending(row: dict) -> Ending | None:
    """How a stored run's curve ended; None with fewer than two curve points or without the per-question scores
    behind them (question_scores.json), since then the noise is unknown."""
    curve = row.get("curve") or []
    if len(curve) < 2:
        return None
    last = curve[-1]
    before = max(curve[:-1], key=lambda p: p["f1"])
    stopped = ((row.get("costs") or {}).get("validation") or {}).get("stopped_at")
    if stopped is not None:
        return Ending(EARLY, stopped, last["f1"] - before["f1"], None)
    scores = RunDir(row["output_dir"]).read_question_scores()
    a, b = scores.get(last["step"]), scores.get(before["step"])
    common = sorted(set(a or ()) & set(b or ()))
    if len(common) < 2:
        return None
    c = contrast([np.array([[a[q] for q in common]]), np.array([[b[q] for q in common]])], [1.0, -1.0])
    state = IMPROVING if c.ci_low > 0 else PLATEAU
    return Ending(state, last["step"], c.estimate, (c.ci_low, c.ci_high))


def endings_text(endings: list[Ending | None]) -> str:
    """One configuration's runs in a table cell: "plateau", "**improving** (2/3)", "early stop (1/3), plateau"."""
    known = [e.state for e in endings if e is not None]
    if not known:
        return "—"
    if len(set(known)) == 1:
        return _cell(known[0])
    return ", ".join(f"{_cell(s)} ({known.count(s)}/{len(known)})" for s in (IMPROVING, EARLY, PLATEAU) if s in known)


def _cell(state: str) -> str:
    return f"**{state}**" if state == IMPROVING else state
