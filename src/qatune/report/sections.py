"""The report's sections, in order, as blocks (heading, paragraph, list, table, image) that
:mod:`qatune.report.render` writes as markdown and as HTML."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from qatune.methods import method
from qatune.report.analysis import FRONT_COSTS, SLOW_FRACTION, Analysis, cost_marks, pareto_fronts
from qatune.report.configs import SELECTION_SHARE, SPLIT_SEED, config_label, volume_of
from qatune.report.convergence import endings_text
from qatune.report.text import (
    ci,
    claim,
    factorial_effects,
    findings,
    own_values,
    p_text,
    pflop,
    v2_means,
)


def blocks(a: Analysis, study_dir: Path, figures: list[str]) -> list[tuple]:
    """The report's sections in order, as blocks that `qatune.report.render` writes as markdown and as HTML."""
    b = _scope_blocks(a, study_dir)
    if not a.done:
        return b + [("p", "No finished runs yet.")]
    marks = cost_marks(a.done)
    b += _reading_blocks(a) + _tuning_blocks(a) + _table_blocks(a, marks) + _comparison_blocks(a) + _factorial_blocks(a)
    b += _convergence_blocks(a)
    b += [("h2", "Findings"), ("ul", findings(a) or ["Not enough finished runs for a comparison yet."])]
    b += [("h2", "Figures")] + [("img", name) for name in figures]
    return b + _cost_blocks(a.done, marks) + _front_blocks(a) + _inference_blocks(a, study_dir)


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
                    "Learning curves: a run is \"improving\" at its budget when its last evaluation beat the best one "
                    "before it beyond the noise (the paired 95% interval of the F1 gain over the curve questions lies "
                    "above zero), on a \"plateau\" when it did not, \"early stop\" when early stopping ended it. "
                    + _curve_source(a)])]


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
    header += ["ended", "trainable %", "train PFLOP", "train s"]
    body = []
    for c in a.configs:  # sorted by volume, largest first
        if c.volume != top and body and body[-1][1] == f"{int(top)}":
            b.append(("table", header, body))
            b += [("h2", "Other data volumes"), ("p", "The same configurations trained on less data.")]
            body = []
        iv = a.intervals[c.id]
        row = [c.label + (" ‡" if c.notes else ""), f"{int(c.volume)}", str(len(c.runs)), ci(iv["em"]),
               ci(iv["f1"]), " / ".join(f"{s['f1']:.1f}" for s in c.seed_scores())]
        if v2:
            m = v2_means(c)
            row += [f"{m['HasAns_f1']:.1f}" if "HasAns_f1" in m else "—", f"{m['NoAns_f1']:.1f}" if "NoAns_f1" in m
                    else "—", f"{m['best_f1']:.1f} ({m['best_f1_thresh']:.2f})" if "best_f1" in m else "—"]
        slowed = sum(r["id"] in marks for r in c.runs)
        row += [endings_text([a.endings[r["id"]] for r in c.runs]), f"{c.runs[0]['costs']['trainable_percent']:.2f}", pflop(c.runs),
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
                 ci(comp["f1"], 2, True), p_text(comp["f1"].p), p_text(comp["f1"].p_holm), ci(comp["em"], 2, True),
                 p_text(comp["em"].p), str(comp["f1"].questions)] for comp in a.comparisons]
        b += [("p", f"Headline arms `{a.headline[0]}` − `{a.headline[1]}` (from `[study] headline`), at each data "
                    f"volume; 'candidates' counts the configurations each arm had to choose from."),
              ("table", ["train q", "A", "B", "candidates", "F1 diff [95% CI]", "p", "Holm p", "EM diff [95% CI]",
                         "p", "test questions"], rows)]
    if a.interaction:
        it, (lo, hi) = a.interaction["f1"], a.interaction["volumes"]
        b.append(("p", f"Data-volume interaction: change of the F1 difference A − B from {int(lo)} to {int(hi)} "
                       f"training questions = {ci(it, 2, True)}, {claim(it, len(a.family))} (same test questions; "
                       f"seeds and articles sampled)."))
    if a.rank_tests:
        b += [("p", "Does LoRA rank matter? Per arm and setting, the test of 'F1 does not depend on rank': the t "
                    "test of each pair of ranks (seeds and articles sampled, as every interval here), Bonferroni over "
                    "the pairs; p-values Holm-adjusted over the family. A large p-value means no detectable effect, "
                    "not proof that there is none."),
              ("table", ["arm", "train q", "setting", "F1 by rank", "p", "Holm p", "method"],
               [[t["arm"], f"{int(t['volume'])}", ", ".join([*(f"{k}={v}" for k, v in t["fixed"].items()
                                                              if k != "train_questions"),
                                                            *([f"tuned per rank: {own_values(t)}"] if t["tuned"]
                                                              else [])]) or "—",
                 ", ".join(f"r={r}: {m:.2f}" for r, m in zip(t["ranks"], t["f1"])), p_text(t["p"]), p_text(t["p_holm"]),
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
    """Model and fine-tuning method as two factors: F1 per cell and each effect with its interval."""
    if not a.factorial and not a.factorial_note:
        return []
    b: list[tuple] = [("h2", "Model and method: two factors")]
    if a.factorial_note:
        return b + [("p", a.factorial_note)]
    ref = method(a.factorial[0]["reference"]).label
    b.append(("p", "Each cell is its arm at the configuration chosen as the headline chooses (on validation F1, "
                   "else on the selection questions); F1 and the effects are measured on the test questions, each "
                   "effect with its 95% interval (seeds and articles sampled) and its Holm-adjusted p over the "
                   f"verdict's claims. Method effect: {ref} (the reference) − the method, within a model"
                   + ("; model effect: the first model − the second within a method; interaction: how much a "
                      "method's effect changes between the models." if len(a.factorial[0]["models"]) > 1 else ".")))
    for f in a.factorial:
        b.append(("h3", f"{int(f['volume'])} training questions ({f['test_questions']} test questions)"))
        b.append(("table", ["model", *(f"{method(s).label} F1" for s in f["methods"])],
                  [[m, *(f"{f['f1'][(m, s)]:.2f}" for s in f["methods"])] for m in f["models"]]))
        b.append(("table", ["effect", "F1 difference [95% CI]", "p", "Holm p"],
                  [[name, ci(c, 2, True), p_text(c.p), p_text(c.p_holm)] for name, c in factorial_effects(f)]))
    return b


def _inference_blocks(a: Analysis, study_dir: Path) -> list[tuple]:
    """What each model costs to run (latency, size, int8 accuracy), and the runs whose measurement failed."""
    from qatune.report.costtable import COST_HEADER, COST_INTRO, cost_rows, not_measured
    from qatune.report.figures import cost_figure

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


EQUAL_COST = 1.05  # costs within 5% of each other: one budget (equal compute), not a trade-off


def _front_blocks(a: Analysis) -> list[tuple]:
    """The Pareto fronts across methods: the configurations that buy their F1 most cheaply, per cost."""
    fronts = pareto_fronts(a)
    if not fronts:
        return []
    top = int(max(c.volume for c in a.configs))

    def point(p: dict, key: str) -> str:
        cost = (f"{p['cost']:,.0f}" if key == "trainable_params" else f"{p['cost'] / 1e15:.3f} PFLOP"
                if key == "train_flops" else f"{p['cost']:.1f} ms")
        return f"{p['label']} (F1 {p['f1']:.1f}, {cost})"

    return [("h2", "Pareto fronts"),
            ("p", f"At {top} training questions, the configurations no other beats on both test F1 and the cost "
                  "(cheapest first); each further point buys F1 with more of it. Point estimates: the intervals "
                  "are in the headline table."),
            ("ul", [f"{FRONT_COSTS[k]}: " + (" → ".join(point(p, k) for p in front) if front[-1]["cost"] >
                                             EQUAL_COST * front[0]["cost"] else
                                             f"every configuration at one cost (within {EQUAL_COST - 1:.0%}, the "
                                             f"study's budget): no trade-off to show")
                    for k, front in fronts.items()])]


def _convergence_blocks(a: Analysis) -> list[tuple]:
    """Per configuration: how each seed's curve ended, its last gain with the interval that judged it."""
    rows = []
    for c in a.configs:
        ends = [a.endings[r["id"]] for r in c.runs]
        if not any(ends):
            continue
        gains = " / ".join("—" if e is None else f"{e.gain:+.1f}" + (f" [{e.ci[0]:+.1f}, {e.ci[1]:+.1f}]" if e.ci
                                                                      else "") for e in ends)
        steps = " / ".join("—" if e is None else str(e.step) for e in ends)
        rows.append([c.label, f"{int(c.volume)}", endings_text(ends), gains, steps, pflop(c.runs)])
    if not rows:
        return []
    return [("h2", "Convergence"),
            ("p", "How each configuration's runs ended (per seed): the F1 gain of the last learning-curve evaluation "
                  "over the best one before it, with its paired 95% interval over the curve questions; \"improving\" "
                  "when that interval lies above zero."),
            ("table", ["configuration", "train q", "ended", "last gain [95% CI] per seed", "last step", "train PFLOP"],
             rows)]
