"""The report's sentences: numbers with their intervals and p-values as a reader reads them, and the findings,
which claim only what the Holm-adjusted p-values support."""

from __future__ import annotations

import numpy as np

from qatune.methods import method
from qatune.report.analysis import Analysis
from qatune.report.configs import SHORT, Config
from qatune.report.convergence import EARLY, IMPROVING, PLATEAU
from qatune.report.stats import P_FLOOR, Contrast


# The report is a list of blocks rendered twice, as markdown and as HTML, so the two never disagree.
def own_values(t: dict) -> str:
    """A rank test's tuned options with each rank's chosen value, e.g. 'lr (r=8: 0.0015, r=128: 0.0005)'."""
    return "; ".join(f"{SHORT.get(k, k)} (" + ", ".join(f"r={r}: {v[k]:g}" if isinstance(v[k], float) else
                                                      f"r={r}: {v[k]}" for r, v in zip(t["ranks"], t["tuned_values"]))
                     + ")" for k in t["tuned"])

BORDERLINE = (0.025, 0.1)  # a verdict p-value this close to 0.05 (a factor 2) can fall on either side in a rerun
V2_KEYS = ("HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_exact_thresh", "best_f1",
           "best_f1_thresh")



def ci(c: Contrast, digits: int = 1, signed: bool = False) -> str:
    f = f"+.{digits}f" if signed else f".{digits}f"
    return f"{c.estimate:{f}} [{c.ci_low:{f}}, {c.ci_high:{f}}]"


def p_text(p: float) -> str:
    """A p-value for a table cell: below P_FLOOR a bound, since nothing that small is resolved by the data."""
    return f"{p:.4f}" if p >= P_FLOOR else f"< {P_FLOOR:g}"


def p_named(p: float, name: str = "p") -> str:
    """A p-value in a sentence: 'p = 0.0123' or 'p < 0.0001'."""
    return f"{name} = {p:.4f}" if p >= P_FLOOR else f"{name} < {P_FLOOR:g}"


def claim(c: Contrast, family: int) -> str:
    """The p-values behind a claim: raw, and Holm-adjusted over the verdict's family when it has one."""
    held = f", {p_named(c.p_holm, 'Holm p')} over the {family} claims of the verdict" if c.p_holm is not None else ""
    return p_named(c.p) + held


def significant(c: Contrast) -> bool:
    return (c.p_holm if c.p_holm is not None else c.p) < 0.05 and c.excludes_zero()


def _borderline(claims: list[tuple[str, Contrast]]) -> str | None:
    """The verdict's claims whose (Holm) p lies near 0.05: two fresh runs of the offline study put one of them at
    0.049 and 0.053, so its wording ("holds" / "not distinguishable") is the threshold's, not the evidence's."""
    near = [(name, c) for name, c in claims
            if BORDERLINE[0] <= (c.p_holm if c.p_holm is not None else c.p) < BORDERLINE[1]]
    if not near:
        return None
    return ("Near the 5% line (p within a factor 2 of 0.05; a rerun of the study may put it on the other side, so "
            "read these as suggestive either way): " + "; ".join(
                f"{name} {ci(c, 2, True)}, {p_named(c.p_holm if c.p_holm is not None else c.p, 'Holm p')}"
                for name, c in near) + ".")


def findings(a: Analysis) -> list[str]:
    out, claims = [], []
    for comp in a.comparisons[-1:]:  # the headline: the largest volume both arms trained on
        f1, x, y = comp["f1"], comp["a"], comp["b"]
        claims.append((f"{x.label} − {y.label}", f1))
        where = _where(comp, a.split)
        if significant(f1):
            win, lose = (x, y) if f1.estimate > 0 else (y, x)
            lo, hi = sorted((abs(f1.ci_low), abs(f1.ci_high)))
            out.append(f"**{win.label}** beats **{lose.label}** by {abs(f1.estimate):.2f} F1 points (95% CI {lo:.2f} "
                       f"to {hi:.2f}, {claim(f1, len(a.family))}) at {int(comp['volume'])} training "
                       f"questions{where}, training {win.runs[0]['costs']['trainable_percent']:.2f}% vs "
                       f"{lose.runs[0]['costs']['trainable_percent']:.2f}% of the weights.")
        else:
            out.append(f"**{x.label}** and **{y.label}** are not distinguishable at {int(comp['volume'])} training "
                       f"questions: F1 difference {ci(f1, 2, True)} (95% CI), {claim(f1, len(a.family))}{where}.")
    for f in a.factorial[:1]:  # the largest volume
        effects = factorial_effects(f)
        claims += effects
        held = [f"{name} {ci(c, 2, True)}" for name, c in effects if significant(c)]
        unknown = [name for name, c in effects if not significant(c)]
        out.append(f"Model and method at {int(f['volume'])} training questions (Holm over the {len(a.family)} "
                   f"claims of the verdict): " + ("; ".join(held) + " hold" if held else "no effect holds")
                   + (f"; not distinguishable from zero: {', '.join(unknown)}." if unknown else "."))
    for t in a.rank_tests:
        means = np.array(t["f1"])
        lo_r, hi_r = t["ranks"][int(np.argmin(means))], t["ranks"][int(np.argmax(means))]
        verdict = "rank matters" if t["p_holm"] < 0.05 else "no detectable effect of rank"
        fixed = ", ".join(f"{v}" if k == "alpha_policy" else f"{SHORT.get(k, k)}={v}" for k, v in t["fixed"].items()
                          if k not in ("train_questions",))
        own = own_values(t)
        out.append(f"{t['arm']} ({fixed or 'one setting'}) at {int(t['volume'])} questions: F1 goes from "
                   f"{means.min():.2f} (r={lo_r}) to {means.max():.2f} (r={hi_r}) across ranks "
                   f"{t['ranks'][0]}–{t['ranks'][-1]}" + (f", each rank at its own tuned {own}" if own else "")
                   + f"; {p_named(t['p_holm'], 'Holm-adjusted p')} over {len(a.rank_tests)} test(s): {verdict} at the "
                   f"5% level.")
    if a.interaction:
        it, (lo, hi) = a.interaction["f1"], a.interaction["volumes"]
        (alo, blo), (ahi, bhi) = a.interaction["pairs"]
        gap = f"gap {ahi.arm} − {bhi.arm}"
        claims.append((f"the change of the F1 {gap} with more data", it))
        if significant(it):
            more = ahi.arm if it.estimate > 0 else bhi.arm
            out.append(f"More data helps **{more}** more: the F1 {gap} changes by {it.estimate:+.2f} points from "
                       f"{int(lo)} to {int(hi)} training questions (95% CI {it.ci_low:+.2f} to {it.ci_high:+.2f}, "
                       f"{claim(it, len(a.family))}).")
        else:
            out.append(f"No detectable change of the F1 {gap} between {int(lo)} and {int(hi)} training questions: "
                       f"{ci(it, 2, True)} (95% CI), {claim(it, len(a.family))}.")
    near = _borderline(claims)
    if near:
        out.append(near)
    loose = [t for t in a.tuning if t.get("separable") is False]
    if loose:
        out.append("Tuning choices the validation questions cannot separate from the runner-up (paired 95% interval "
                   "of the margin includes zero): " + "; ".join(
                       f"{t['arm']} {where_tuned(t)}: {t['chosen']} over {t['runner_up']} by "
                       f"{t['margin']:+.2f} [{t['margin_ci'][0]:+.2f}, {t['margin_ci'][1]:+.2f}]" for t in loose)
                   + ". Their configurations' scores hold for the values chosen; another of those values may do as "
                     "well, and a rerun may choose it.")
    out.append(_convergence_finding(a))
    if a.configs and max(len(c.runs) for c in a.configs) < 2:
        out.append("One training seed per configuration: every interval and test covers the sampling of evaluation "
                   "questions only, not run-to-run variation; add seeds to the grid for that.")
    if len(a.done) < len(a.covered):
        out.append(f"Based on {len(a.done)} of {len(a.covered)} runs; the missing ones may change these numbers.")
    return out


def _convergence_finding(a: Analysis) -> str:
    """Which configurations were still improving at their budget: their scores understate what they reach."""
    known = [(c, e) for c in a.configs for r in c.runs if (e := a.endings[r["id"]]) is not None]
    if not known:
        return ("Whether the runs converged is unknown: it needs two learning-curve evaluations per run with their "
                "per-question scores (set `eval_steps` below the run's steps).")
    counts = {s: sum(e.state == s for _, e in known) for s in (IMPROVING, PLATEAU, EARLY)}
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    rising = sorted({c.label for c, e in known if e.state == IMPROVING})
    if not rising:
        return (f"Every run with a learning curve ended on a plateau or by early stopping ({tally} of {len(known)}): "
                "its last evaluation did not beat the best before it beyond the validation noise.")
    return (f"{counts[IMPROVING]} of {len(known)} runs with a learning curve were still improving at their budget "
            f"({tally}): " + "; ".join(rising) + ". Their scores understate what those configurations reach with more "
            "compute; a comparison with one of them holds at this budget only (see Convergence).")


def where_tuned(t: dict) -> str:
    return "(" + (", ".join(f"{k}={v}" for k, v in t["point"].items() if k != "train_questions") or "one setting") + ")"


def _where(comp: dict, split: dict | None) -> str:
    if split and split.get("on") == "selection":
        return (f" (tested on {split['test']} questions; the configurations were chosen on the other "
                f"{split['selection']})")
    if split and split.get("on") == "validation":
        return f" (on {comp['f1'].questions} questions; the configurations were chosen on validation F1)"
    return f" (on {comp['f1'].questions} questions)"


def factorial_effects(f: dict) -> list[tuple[str, Contrast]]:
    """A factorial's effects as a reader names them, in the order the report lists them."""
    ref, models = method(f["reference"]).label, f["models"]
    out = [(f"{ref} − {method(s).label}" + (f" on {m}" if len(models) > 1 else ""), c)
           for m in models for s, c in f["method_effect"][m].items()]
    out += [(f"{models[0]} − {models[-1]} with {method(s).label}", c) for s, c in f["model_effect"].items()]
    out += [(f"the model × method interaction ({ref} − {method(s).label})", c) for s, c in f["interaction"].items()]
    return out


def v2_means(c: Config) -> dict[str, float]:
    """The official v2 breakdown and best-threshold scores (those every run has), averaged over the seeds."""
    return {k: float(np.mean([r["metrics"][k] for r in c.runs])) for k in V2_KEYS
            if all(k in r["metrics"] for r in c.runs)}


def pflop(rs: list[dict]) -> str:
    values = [r["costs"].get("train_flops") for r in rs]
    return f"{np.mean(values) / 1e15:.3f}" if all(values) else "n/a"
