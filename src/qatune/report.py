"""Reports: a study's results -> report.md, report.html (one self-contained page), figures and a JSON summary.

What a reviewer needs to trust each sentence:

* **What one configuration is**: a run's resolved configuration without its seed (:func:`config.config_id`),
  so only seeds are averaged. The report covers the study file's latest registered grid; rows of earlier
  grids stay in ``study.sqlite`` and are reported only when asked (``all_runs``).
* **Every number carries its uncertainty**: 95% t intervals with seeds and articles as sampled units
  (:mod:`qatune.stats`; coverage measured in ``benchmarks/bench_coverage.py``), scored per question with the
  official rules of the data's SQuAD version; each configuration's per-seed scores are shown beside them.
* **No winner's curse**: configurations are chosen on validation data (or, without it, on a fixed *selection*
  part of the evaluation questions with the difference tested on the disjoint rest); a tuning choice that the
  validation questions cannot separate from the runner-up is said to be so.
* **Families are corrected**: the verdict's claims (headline, volume interaction, factorial effects) share one
  Holm adjustment; the rank tests another.
* **Findings claim only what the adjusted p-value supports**: a difference is stated only when its Holm-adjusted
  p-value is below 5%.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from qatune.analysis import (
    CURVE_GAIN,
    SELECTION_SHARE,
    SHORT,
    SLOW_FRACTION,
    SPLIT_SEED,
    Analysis,
    Config,
    analyse,
    config_label,
    converged,
    convergence_text,
    cost_marks,
    volume_of,
)
from qatune.figures import figures
from qatune.render import to_html, to_markdown
from qatune.stats import P_FLOOR, Contrast
from qatune.tuning import expected_max_curves, stable_from


# ---------------------------------------------------------------------------------------------- text blocks
# The report is a list of blocks rendered twice, as markdown and as HTML, so the two never disagree.
def _own_values(t: dict) -> str:
    """A rank test's tuned options with each rank's chosen value, e.g. 'lr (r=8: 0.0015, r=128: 0.0005)'."""
    return "; ".join(f"{SHORT.get(k, k)} (" + ", ".join(f"r={r}: {v[k]:g}" if isinstance(v[k], float) else
                                                      f"r={r}: {v[k]}" for r, v in zip(t["ranks"], t["tuned_values"]))
                     + ")" for k in t["tuned"])


def _ci(c: Contrast, digits: int = 1, signed: bool = False) -> str:
    f = f"+.{digits}f" if signed else f".{digits}f"
    return f"{c.estimate:{f}} [{c.ci_low:{f}}, {c.ci_high:{f}}]"


def _p(p: float) -> str:
    """A p-value for a table cell: below P_FLOOR a bound, since nothing that small is resolved by the data."""
    return f"{p:.4f}" if p >= P_FLOOR else f"< {P_FLOOR:g}"


def _pp(p: float, name: str = "p") -> str:
    """A p-value in a sentence: 'p = 0.0123' or 'p < 0.0001'."""
    return f"{name} = {p:.4f}" if p >= P_FLOOR else f"{name} < {P_FLOOR:g}"


def _claim(c: Contrast, family: int) -> str:
    """The p-values behind a claim: raw, and Holm-adjusted over the verdict's family when it has one."""
    held = f", {_pp(c.p_holm, 'Holm p')} over the {family} claims of the verdict" if c.p_holm is not None else ""
    return _pp(c.p) + held


def _significant(c: Contrast) -> bool:
    return (c.p_holm if c.p_holm is not None else c.p) < 0.05 and c.excludes_zero()


BORDERLINE = (0.025, 0.1)  # a verdict p-value this close to 0.05 (a factor 2) can fall on either side in a rerun


def _borderline(claims: list[tuple[str, Contrast]]) -> str | None:
    """The verdict's claims whose (Holm) p lies near 0.05: two fresh runs of the offline study put one of them at
    0.049 and 0.053, so its wording ("holds" / "not distinguishable") is the threshold's, not the evidence's."""
    near = [(name, c) for name, c in claims
            if BORDERLINE[0] <= (c.p_holm if c.p_holm is not None else c.p) < BORDERLINE[1]]
    if not near:
        return None
    return ("Near the 5% line (p within a factor 2 of 0.05; a rerun of the study may put it on the other side, so "
            "read these as suggestive either way): " + "; ".join(
                f"{name} {_ci(c, 2, True)}, {_pp(c.p_holm if c.p_holm is not None else c.p, 'Holm p')}"
                for name, c in near) + ".")


def _findings(a: Analysis) -> list[str]:
    out, claims = [], []
    for comp in a.comparisons[-1:]:  # the headline: the largest volume both arms trained on
        f1, x, y = comp["f1"], comp["a"], comp["b"]
        claims.append((f"{x.label} − {y.label}", f1))
        where = _where(comp, a.split)
        if _significant(f1):
            win, lose = (x, y) if f1.estimate > 0 else (y, x)
            lo, hi = sorted((abs(f1.ci_low), abs(f1.ci_high)))
            out.append(f"**{win.label}** beats **{lose.label}** by {abs(f1.estimate):.2f} F1 points (95% CI {lo:.2f} "
                       f"to {hi:.2f}, {_claim(f1, len(a.family))}) at {int(comp['volume'])} training "
                       f"questions{where}, training {win.runs[0]['costs']['trainable_percent']:.2f}% vs "
                       f"{lose.runs[0]['costs']['trainable_percent']:.2f}% of the weights.")
        else:
            out.append(f"**{x.label}** and **{y.label}** are not distinguishable at {int(comp['volume'])} training "
                       f"questions: F1 difference {_ci(f1, 2, True)} (95% CI), {_claim(f1, len(a.family))}{where}.")
    for f in a.factorial[:1]:  # the largest volume
        effects = [(f"full − LoRA on {m}", f["strategy_effect"][m]) for m in f["models"]]
        effects += [(f"{f['models'][0]} − {f['models'][1]} with {s}", f["model_effect"][s]) for s in f["strategies"]]
        effects.append(("the model × strategy interaction", f["interaction"]))
        claims += effects
        held = [f"{name} {_ci(c, 2, True)}" for name, c in effects if _significant(c)]
        unknown = [name for name, c in effects if not _significant(c)]
        out.append(f"Model and strategy at {int(f['volume'])} training questions (Holm over the {len(a.family)} "
                   f"claims of the verdict): " + ("; ".join(held) + " hold" if held else "no effect holds")
                   + (f"; not distinguishable from zero: {', '.join(unknown)}." if unknown else "."))
    for t in a.rank_tests:
        means = np.array(t["f1"])
        lo_r, hi_r = t["ranks"][int(np.argmin(means))], t["ranks"][int(np.argmax(means))]
        verdict = "rank matters" if t["p_holm"] < 0.05 else "no detectable effect of rank"
        fixed = ", ".join(f"{v}" if k == "alpha_policy" else f"{SHORT.get(k, k)}={v}" for k, v in t["fixed"].items()
                          if k not in ("train_questions",))
        own = _own_values(t)
        out.append(f"{t['arm']} ({fixed or 'one setting'}) at {int(t['volume'])} questions: F1 goes from "
                   f"{means.min():.2f} (r={lo_r}) to {means.max():.2f} (r={hi_r}) across ranks "
                   f"{t['ranks'][0]}–{t['ranks'][-1]}" + (f", each rank at its own tuned {own}" if own else "")
                   + f"; {_pp(t['p_holm'], 'Holm-adjusted p')} over {len(a.rank_tests)} test(s): {verdict} at the "
                   f"5% level.")
    if a.interaction:
        it, (lo, hi) = a.interaction["f1"], a.interaction["volumes"]
        (alo, blo), (ahi, bhi) = a.interaction["pairs"]
        gap = f"gap {ahi.arm} − {bhi.arm}"
        claims.append((f"the change of the F1 {gap} with more data", it))
        if _significant(it):
            more = ahi.arm if it.estimate > 0 else bhi.arm
            out.append(f"More data helps **{more}** more: the F1 {gap} changes by {it.estimate:+.2f} points from "
                       f"{int(lo)} to {int(hi)} training questions (95% CI {it.ci_low:+.2f} to {it.ci_high:+.2f}, "
                       f"{_claim(it, len(a.family))}).")
        else:
            out.append(f"No detectable change of the F1 {gap} between {int(lo)} and {int(hi)} training questions: "
                       f"{_ci(it, 2, True)} (95% CI), {_claim(it, len(a.family))}.")
    near = _borderline(claims)
    if near:
        out.append(near)
    loose = [t for t in a.tuning if t.get("separable") is False]
    if loose:
        out.append("Tuning choices the validation questions cannot separate from the runner-up (paired 95% interval "
                   "of the margin includes zero): " + "; ".join(
                       f"{t['arm']} {_where_tuned(t)}: {t['chosen']} over {t['runner_up']} by "
                       f"{t['margin']:+.2f} [{t['margin_ci'][0]:+.2f}, {t['margin_ci'][1]:+.2f}]" for t in loose)
                   + ". Their configurations' scores hold for the values chosen; another of those values may do as "
                     "well, and a rerun may choose it.")
    flags = [(r, converged(r.get("curve"))) for r in a.done]
    known = [(r, f) for r, f in flags if f is not None]
    if not known:
        out.append("No learning curves were recorded (set `eval_steps`), so whether the runs converged is unknown.")
    else:
        bad = [r for r, f in known if not f]
        if bad:
            out.append(f"{len(bad)} of {len(known)} runs with a learning curve had not converged: F1 still rose by "
                       f"more than {CURVE_GAIN:.1f} point over their last evaluation interval ("
                       + ", ".join(f"`{r['id']}`" for r in bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8
                                                                        else "")
                       + "; marked in the table); their scores understate what those configurations reach with "
                       "more steps.")
        else:
            out.append(f"All {len(known)} runs with a learning curve converged: F1 rose by at most {CURVE_GAIN:.1f} "
                       f"point over their last evaluation interval.")
    if a.configs and max(len(c.runs) for c in a.configs) < 2:
        out.append("One training seed per configuration: every interval and test covers the sampling of evaluation "
                   "questions only, not run-to-run variation; add seeds to the grid for that.")
    if len(a.done) < len(a.covered):
        out.append(f"Based on {len(a.done)} of {len(a.covered)} runs; the missing ones may change these numbers.")
    return out


def _where_tuned(t: dict) -> str:
    return "(" + (", ".join(f"{k}={v}" for k, v in t["point"].items() if k != "train_questions") or "one setting") + ")"


def _where(comp: dict, split: dict | None) -> str:
    if split and split.get("on") == "selection":
        return (f" (tested on {split['test']} questions; the configurations were chosen on the other "
                f"{split['selection']})")
    if split and split.get("on") == "validation":
        return f" (on {comp['f1'].questions} questions; the configurations were chosen on validation F1)"
    return f" (on {comp['f1'].questions} questions)"


def _blocks(a: Analysis, study_dir: Path, figures: list[str]) -> list[tuple]:
    """The report's sections in order, as blocks that `qatune.render` writes as markdown and as HTML."""
    b = _scope_blocks(a, study_dir)
    if not a.done:
        return b + [("p", "No finished runs yet.")]
    marks = cost_marks(a.done)
    b += _reading_blocks(a) + _tuning_blocks(a) + _table_blocks(a, marks) + _comparison_blocks(a) + _factorial_blocks(a)
    b += [("h2", "Findings"), ("ul", _findings(a) or ["Not enough finished runs for a comparison yet."])]
    b += [("h2", "Figures")] + [("img", name) for name in figures]
    return b + _cost_blocks(a.done, marks) + _inference_blocks(a, study_dir)


def _scope_blocks(a: Analysis, study_dir: Path) -> list[tuple]:
    """Title, which runs the report covers, and the runs without results."""
    b: list[tuple] = [("h1", f"Study report: {a.grid['study'] if a.grid else study_dir.name}")]
    if a.grid:
        when = datetime.fromtimestamp(a.grid["registered_at"], UTC).strftime("%Y-%m-%d %H:%M UTC")
        scope = (f"This report covers the {len(a.covered)} runs of the study file `{a.grid['file']}` as last run "
                 f"({when}).")
        if a.other_rows:
            scope += (f" {a.other_rows} other row(s) of `study.sqlite`, from earlier versions of the study file, are "
                      f"left out (`qatune report {study_dir} --all-runs` includes them).")
        b.append(("p", scope))
    else:
        b.append(("p", f"This report covers all {len(a.covered)} runs in `study.sqlite`."))
    status = defaultdict(int)
    for r in a.covered:
        status[r["status"]] += 1
    b.append(("p", f"Runs: {len(a.covered)} — " + ", ".join(f"{v} {k}" for k, v in sorted(status.items()))))
    missing = [r for r in a.covered if r["status"] != "finished"]
    if missing:
        b.append(("p", "**Incomplete study** — these runs have no results yet, so every figure and statistic "
                       "below covers only the finished ones:"))
        b.append(("ul", [f"`{r['id']}` {config_label(r['arm'], r['point'])}, "
                         f"{r['config'].get('train_questions') or 'all'} training questions, seed {r['config']['seed']}: "
                         f"{r['status']}" + (f" ({r['error'].splitlines()[0]})" if r["error"] else "")
                         for r in missing]))
    return b


def _reading_blocks(a: Analysis) -> list[tuple]:
    """How to read the numbers: the metric, what is averaged, the intervals, how the headline chose."""
    seeds = sorted({len(c.runs) for c in a.configs})
    return [("h2", "How to read the numbers"),
            ("ul", [f"Evaluation: SQuAD v{a.scores.version} rules, {len(a.questions)} questions scored in every run"
                    + (" (unanswerable questions score 1 only for an empty answer; HasAns/NoAns columns split them)"
                       if a.scores.version.startswith("2") else "") + ".",
                    "A configuration is a run's full configuration without its seed: only seeds are averaged. "
                    f"Seeds per configuration: {', '.join(map(str, seeds))}.",
                    "Intervals are 95% t intervals in which seeds and articles are sampled units: a configuration's "
                    "run-to-run variance (unbiased, over its seeds, with few seeds' uncertainty in the t quantile) "
                    "plus the variance of the evaluation questions clustered by article (the same questions for "
                    "every configuration, so comparisons are paired); never narrower than Welch's t interval on the "
                    "runs' means. Their coverage is measured by simulation (`benchmarks/bench_coverage.py`)"
                    + ("; with one seed they cover question sampling only." if seeds == [1] else "."),
                    "Multiplicity: the verdict's claims (" + (", ".join(a.family) or "none yet") + ") share one Holm "
                    "adjustment, and a finding states a difference only when its Holm-adjusted p is below 5%; the "
                    "rank tests are a family of their own. p-values below 0.0001 are printed as a bound.",
                    ("Headline: no comparison yet (an arm of the headline has no finished run)." if not a.comparisons
                     else f"Headline choice without bias: where an arm of the headline has several configurations, "
                     f"the best is chosen on a fixed selection part of the evaluation questions "
                     f"({a.split['selection']} questions: a hash of the question id with seed {SPLIT_SEED}, share "
                     f"{SELECTION_SHARE:.0%}) and the difference is tested on the other {a.split['test']} (listed in "
                     f"`split.json`)." if a.split and a.split.get("on") == "selection" else
                     "Headline choice without bias: where an arm of the headline has several configurations, the "
                     "best is chosen on its runs' validation F1 (validation data apart from the evaluation "
                     "questions), and all evaluation questions test the difference."
                     if a.split and a.split.get("on") == "validation" else
                     "Headline: each headline arm has a single configuration, so nothing is chosen and all "
                     "questions test the difference."),
                    f"Learning curves: a run is \"not converged\" when F1 on its curve questions still rose by more "
                    f"than {CURVE_GAIN:.1f} point over its last evaluation interval. " + _curve_source(a)])]


def _curve_source(a: Analysis) -> str:
    """Where the learning curves (and with them any kept checkpoint) were measured: validation or test questions."""
    on = {r["costs"].get("curve_on") for r in a.done if r.get("curve")}
    if on == {"validation"}:
        kept = sorted({(r["costs"].get("validation") or {}).get("keep") or "last" for r in a.done})
        return (f"They are measured on validation questions, apart from the evaluation questions (model kept: "
                f"{' / '.join(kept)} validation step), so no choice saw the test data.")
    if on:
        return ("Some are measured on the evaluation questions themselves (runs without validation data): a "
                "convergence judgement there looks at the test data; give `validation_share` or `validation_data`.")
    return ""


def _table_blocks(a: Analysis, marks: dict) -> list[tuple]:
    """Every configuration with its scores, convergence and costs: the largest data volume first."""
    top = max(c.volume for c in a.configs)
    v2 = a.scores.version.startswith("2")
    b: list[tuple] = [("h2", f"Headline table ({int(top)} training questions)"),
                      ("p", "Every configuration at the largest data volume; EM and F1: mean over seeds [95% "
                            "interval]. ‡ marks a LoRA rank at or beyond the width of the adapted layers, † runs "
                            "slowed by other load.")]
    header = ["configuration", "train q", "seeds", "EM", "F1", "F1 per seed"]
    if v2:
        header += ["HasAns F1", "NoAns F1", "best F1 (threshold)"]
    header += ["converged", "trainable %", "train PFLOP", "train s"]
    body = []
    for c in a.configs:  # sorted by volume, largest first
        if c.volume != top and body and body[-1][1] == f"{int(top)}":
            b.append(("table", header, body))
            b += [("h2", "Other data volumes"), ("p", "The same configurations trained on less data.")]
            body = []
        iv = a.intervals[c.id]
        row = [c.label + (" ‡" if c.notes else ""), f"{int(c.volume)}", str(len(c.runs)), _ci(iv["em"]),
               _ci(iv["f1"]), " / ".join(f"{s['f1']:.1f}" for s in c.seed_scores())]
        if v2:
            m = _v2_means(c)
            row += [f"{m['HasAns_f1']:.1f}" if "HasAns_f1" in m else "—", f"{m['NoAns_f1']:.1f}" if "NoAns_f1" in m
                    else "—", f"{m['best_f1']:.1f} ({m['best_f1_thresh']:.2f})" if "best_f1" in m else "—"]
        slowed = sum(r["id"] in marks for r in c.runs)
        row += [convergence_text(c), f"{c.runs[0]['costs']['trainable_percent']:.2f}", _pflop(c.runs),
                f"{np.mean([r['costs']['train_s'] for r in c.runs]):.0f}" + (f" †{slowed}" if slowed else "")]
        body.append(row)
    b.append(("table", header, body))
    notes = sorted({n for c in a.configs for n in c.notes})
    return b + ([("ul", notes)] if notes else [])


def _comparison_blocks(a: Analysis) -> list[tuple]:
    """The headline comparison per data volume, its volume interaction, and the rank tests."""
    b: list[tuple] = [("h2", "Comparisons and tests")]
    if a.comparisons:
        rows = [[f"{int(comp['volume'])}", comp["a"].label, comp["b"].label, " / ".join(map(str, comp["candidates"])),
                 _ci(comp["f1"], 2, True), _p(comp["f1"].p), _p(comp["f1"].p_holm), _ci(comp["em"], 2, True),
                 _p(comp["em"].p), str(comp["f1"].questions)] for comp in a.comparisons]
        b += [("p", f"Headline arms `{a.headline[0]}` − `{a.headline[1]}` (from `[study] headline`), at each data "
                    f"volume; 'candidates' counts the configurations each arm had to choose from."),
              ("table", ["train q", "A", "B", "candidates", "F1 diff [95% CI]", "p", "Holm p", "EM diff [95% CI]",
                         "p", "test questions"], rows)]
    if a.interaction:
        it, (lo, hi) = a.interaction["f1"], a.interaction["volumes"]
        b.append(("p", f"Data-volume interaction: change of the F1 difference A − B from {int(lo)} to {int(hi)} "
                       f"training questions = {_ci(it, 2, True)}, {_claim(it, len(a.family))} (same test questions; "
                       f"seeds and articles sampled)."))
    if a.rank_tests:
        b += [("p", "Does LoRA rank matter? Per arm and setting, the test of 'F1 does not depend on rank': the t "
                    "test of each pair of ranks (seeds and articles sampled, as every interval here), Bonferroni over "
                    "the pairs; p-values Holm-adjusted over the family. A large p-value means no detectable effect, "
                    "not proof that there is none."),
              ("table", ["arm", "train q", "setting", "F1 by rank", "p", "Holm p", "method"],
               [[t["arm"], f"{int(t['volume'])}", ", ".join([*(f"{k}={v}" for k, v in t["fixed"].items()
                                                              if k != "train_questions"),
                                                            *([f"tuned per rank: {_own_values(t)}"] if t["tuned"]
                                                              else [])]) or "—",
                 ", ".join(f"r={r}: {m:.2f}" for r, m in zip(t["ranks"], t["f1"])), _p(t["p"]), _p(t["p_holm"]),
                 t["method"]] for t in a.rank_tests])]
    return b


def _tuning_blocks(a: Analysis) -> list[tuple]:
    """What each tuned configuration tried and chose, on validation data only; a choice at the edge is flagged."""
    if not a.tuning:
        return []
    b: list[tuple] = [("h2", "Tuning (validation data only)"),
                      ("p", "Each configuration's candidates trained with a tuning seed that no final run uses and "
                            "were compared on validation F1 (at the last step each reached: successive halving stops "
                            "the weaker ones early); the chosen value then trained afresh with every seed, and those "
                            "runs are the ones reported below, so the choice does not select their luck. No "
                            "candidate was scored on the test questions. 'margin' is the chosen value's validation F1 "
                            "minus the runner-up's where they were compared, with its 95% interval paired over the "
                            "validation questions; 'separable' says whether that interval excludes zero.")]
    rows = []
    for t in a.tuning:
        where = ", ".join(f"{k}={v}" for k, v in t["point"].items()) or "—"
        tried = "; ".join(f"{x['value']}: {x['validation_f1']:.2f} @{x['steps']}" if x["validation_f1"] is not None
                          else f"{x['value']}: —" for x in t["tried"])
        chosen = (("none: every candidate failed (qatune study --status)" if t.get("failed") else "not yet")
                  if t["chosen"] is None else
                  str(t["chosen"]) + (" (at the edge: widen the range)" if t["at_edge"] else ""))
        margin = "—" if t.get("margin") is None else f"{t['margin']:+.2f}" + (
            f" [{t['margin_ci'][0]:+.2f}, {t['margin_ci'][1]:+.2f}]" if t.get("margin_ci") else "")
        separable = {True: "yes", False: "**no**", None: "—"}[t.get("separable")]
        rows.append([t["arm"], where, str(t["option"]), tried, chosen, margin, separable])
    b.append(("table", ["arm", "configuration", "option", "tried: validation F1 @ steps", "chosen",
                        "margin over runner-up [95% CI]", "separable"], rows))
    return b


def _factorial_blocks(a: Analysis) -> list[tuple]:
    """Model size and strategy as two factors: the 2x2 of F1 and the effects with their intervals."""
    if not a.factorial and not a.factorial_note:
        return []
    b: list[tuple] = [("h2", "Model and strategy: two factors")]
    if a.factorial_note:
        return b + [("p", a.factorial_note)]
    b.append(("p", "Each cell is its arm at the configuration chosen as the headline chooses (on validation F1, "
                   "else on the selection questions); F1 and the effects are measured on the test questions, each "
                   "effect with its 95% interval (seeds and articles sampled) and its Holm-adjusted p over the "
                   "verdict's claims. Strategy effect: full − LoRA within a model; model effect: the first model − "
                   "the second within a strategy; interaction: how much the strategy effect changes between models."))
    for f in a.factorial:
        (m1, m2) = f["models"]
        b.append(("h3", f"{int(f['volume'])} training questions ({f['test_questions']} test questions)"))
        b.append(("table", ["model", "full F1", "LoRA F1", "full − LoRA [95% CI]", "p", "Holm p"],
                  [[m, f"{f['f1'][(m, 'full')]:.2f}", f"{f['f1'][(m, 'lora')]:.2f}",
                    _ci(f["strategy_effect"][m], 2, True), _p(f["strategy_effect"][m].p),
                    _p(f["strategy_effect"][m].p_holm)] for m in f["models"]]))
        b.append(("ul", [f"model effect ({m1} − {m2}) with {s} fine-tuning: {_ci(f['model_effect'][s], 2, True)}, "
                         f"{_claim(f['model_effect'][s], len(a.family))}" for s in f["strategies"]]
                  + [f"interaction: {_ci(f['interaction'], 2, True)}, {_claim(f['interaction'], len(a.family))}"]))
    return b


def _inference_blocks(a: Analysis, study_dir: Path) -> list[tuple]:
    """What each model costs to run (latency, size, int8 accuracy), and the runs whose measurement failed."""
    from qatune.cost import COST_HEADER, COST_INTRO, cost_rows, not_measured
    from qatune.figures import cost_figure

    def label(r: dict) -> str:
        return config_label(r["arm"], r["point"])

    measured, failed = cost_rows(a.done, label), not_measured(a.done)
    b: list[tuple] = []
    if measured or failed:
        b += [("h2", "What each model costs to run"), ("p", COST_INTRO)]
    if measured:
        b += [("table", COST_HEADER, measured), ("img", cost_figure(a.done, study_dir, label))]
    if failed:
        b += [("p", f"Not measured for {len(failed)} run(s): the measurement failed (the runs' training and "
                    f"evaluation results stand; the cause is in each run's `run.json` → `inference`):"),
              ("ul", [f"`{rid}`: {error}" for rid, error in failed])]
    return b


V2_KEYS = ("HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_exact_thresh", "best_f1",
           "best_f1_thresh")


def _v2_means(c: Config) -> dict[str, float]:
    """The official v2 breakdown and best-threshold scores (those every run has), averaged over the seeds."""
    return {k: float(np.mean([r["metrics"][k] for r in c.runs])) for k in V2_KEYS
            if all(k in r["metrics"] for r in c.runs)}


def _pflop(rs: list[dict]) -> str:
    values = [r["costs"].get("train_flops") for r in rs]
    return f"{np.mean(values) / 1e15:.3f}" if all(values) else "n/a"


def _cost_blocks(runs: list[dict], marks: dict[str, str]) -> list[tuple]:
    """Every run's costs: counted FLOPs (load-independent), CPU and device time, and wall time with its marks."""
    def num(v, f):
        return "n/a" if v is None else format(v, f)

    body = []
    for r in runs:
        c = r["costs"]
        body.append([f"`{r['id']}`", config_label(r["arm"], r["point"]), f"{int(volume_of(r))}", str(r["config"]["seed"]),
                     num(c.get("train_flops") and c["train_flops"] / 1e15, ".3f"), f"{c['train_s']:.0f}",
                     num(c.get("train_flop_per_s") and c["train_flop_per_s"] / 1e9, ".1f"),
                     num(c.get("process_cpu_s"), ".0f"), num(c.get("device_s"), ".1f"), num(c.get("others_cores"), ".2f"),
                     str(c.get("shared_runs", "n/a")), f"† {marks[r['id']]}" if r["id"] in marks else ""])
    return [("h2", "Costs per run"),
            ("p", "Training compute is counted (FlopCounterMode on the run's model shape, times the batches it "
                  "trained), so it does not depend on the machine's load; wall time does. A run whose FLOP/s fell "
                  f"below {SLOW_FRACTION:.0%} of its configuration's rate when running alone is marked †, with the "
                  "evidence."),
            ("table", ["run", "configuration", "train q", "seed", "train PFLOP", "train s", "GFLOP/s", "CPU s",
                       "device s", "other load (cores)", "runs sharing its device", "mark"], body)]


# ---------------------------------------------------------------------------------------------- JSON
def summary(a: Analysis) -> dict:
    """The machine-readable report (``qatune report --json``)."""
    from qatune.cost import not_measured

    def interval(c: Contrast) -> dict:
        return {"mean": c.estimate, "ci_low": c.ci_low, "ci_high": c.ci_high}

    def contrast(c: Contrast) -> dict:
        return {"diff": c.estimate, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p, "p_holm": c.p_holm,
                "questions": c.questions, "articles": c.articles, "seeds": list(c.seeds), "df": c.df, "se": c.se,
                "seed_share": c.seed_share}

    configs = [{"id": c.id, "arm": c.arm, "label": c.label, "point": c.point, "train_questions": c.volume,
                "seeds": c.seed_scores(), "run_ids": [r["id"] for r in c.runs], "em": interval(a.intervals[c.id]["em"]),
                "f1": interval(a.intervals[c.id]["f1"]),
                "converged": [converged(r.get("curve")) for r in c.runs], "notes": c.notes,
                "best_step": [(r["costs"].get("validation") or {}).get("best_step") for r in c.runs],
                "validation_f1": [(r["costs"].get("validation") or {}).get("f1") for r in c.runs],
                **({"squad_v2": _v2_means(c)} if a.scores.version.startswith("2") else {})} for c in a.configs]
    split = {k: v for k, v in (a.split or {}).items() if not k.endswith("_ids")}
    comparisons = [{"kind": "headline", "arms": list(a.headline), "train_questions": comp["volume"],
                    "a": comp["a"].id, "b": comp["b"].id, "a_label": comp["a"].label, "b_label": comp["b"].label,
                    "candidates": comp["candidates"], "selection_questions": split.get("selection", 0),
                    "test_questions": comp["f1"].questions, "split": {**split, "file": "split.json"},
                    "f1": contrast(comp["f1"]), "em": contrast(comp["em"])} for comp in a.comparisons]
    tests: dict = {"rank": [dict(t) for t in a.rank_tests], "volume_interaction": None}
    expected = expected_max_curves(a.tuning)
    by_arm = {e["arm"]: e["curve"] for e in expected}
    stable = (stable_from(by_arm[a.headline[0]], by_arm[a.headline[1]])
              if a.headline and all(arm in by_arm for arm in a.headline) else None)
    if a.interaction:
        (alo, blo), (ahi, bhi) = a.interaction["pairs"]
        tests["volume_interaction"] = {"train_questions": list(a.interaction["volumes"]),
                                       "a": [alo.id, ahi.id], "b": [blo.id, bhi.id],
                                       "f1": contrast(a.interaction["f1"]), "em": contrast(a.interaction["em"])}
    return {"squad_version": a.scores.version, "runs": len(a.covered), "finished": len(a.done),
            "other_rows": a.other_rows, "questions": len(a.questions), "configurations": configs,
            "comparisons": comparisons, "tests": tests, "verdict_family": a.family, "factorial_note": a.factorial_note,
            "tuning": a.tuning, "expected_max": expected, "expected_max_stable_at": stable,
            "factorial": [{"train_questions": f["volume"], "models": f["models"], "strategies": f["strategies"],
                           "cells": {m: {s: f["f1"][(m, s)] for s in f["strategies"]} for m in f["models"]},
                           "configurations": {m: {s: f["cells"][(m, s)].id for s in f["strategies"]}
                                              for m in f["models"]},
                           "test_questions": f["test_questions"], "selection_questions": f["selection_questions"],
                           "strategy_effect": {m: contrast(c) for m, c in f["strategy_effect"].items()},
                           "model_effect": {s: contrast(c) for s, c in f["model_effect"].items()},
                           "interaction": contrast(f["interaction"])} for f in a.factorial],
            "inference_cost_failures": [{"run": rid, "error": e} for rid, e in not_measured(a.done)]}


# ---------------------------------------------------------------------------------------------- entry point
def write_report(study_dir: str | Path, all_runs: bool = False) -> dict:
    """Write report.md, report.html, the figures and split.json into ``study_dir``; works on a partly finished
    study. Returns the JSON summary with the paths written."""
    study_dir = Path(study_dir)
    a = analyse(study_dir, all_runs)
    written = figures(study_dir, a) if a.done else []
    blocks = _blocks(a, study_dir, written)
    md, page = study_dir / "report.md", study_dir / "report.html"
    _write(md, to_markdown(blocks))
    _write(page, to_html(blocks, study_dir))
    if a.split and a.split.get("on") == "selection":
        _write(study_dir / "split.json", json.dumps({k: a.split[k] for k in ("seed", "selection_share")}
                                                    | {"selection": a.split["selection_ids"],
                                                       "test": a.split["test_ids"]}, indent=1))
    else:  # nothing was chosen on test questions: a split from an earlier report would describe nothing here
        (study_dir / "split.json").unlink(missing_ok=True)
    return {"report": str(md), "html": str(page), "figures": written, **summary(a)}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


