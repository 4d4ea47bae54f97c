"""Reports: a study's results -> report.md, report.html (one self-contained page), figures and a JSON summary.

What a reviewer needs to trust each sentence:

* **What one configuration is**: a run's resolved configuration without its seed (:func:`config.config_id`),
  so only seeds are averaged. The report covers the study file's latest registered grid; rows of earlier
  grids stay in ``study.sqlite`` and are reported only when asked (``all_runs``).
* **Every number carries its uncertainty**: 95% t intervals with seeds and articles as sampled units
  (:mod:`qatune.report.stats`; coverage measured in ``benchmarks/bench_coverage.py``), scored per question with the
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
from pathlib import Path

from qatune.report.analysis import (
    Analysis,
    analyse,
    pareto_fronts,
)
from qatune.report.figures import figures
from qatune.report.render import to_html, to_markdown
from qatune.report.sections import blocks
from qatune.report.stats import Contrast
from qatune.report.text import v2_means
from qatune.report.tuningsummary import expected_max_curves, stable_from


def summary(a: Analysis) -> dict:
    """The machine-readable report (``qatune report --json``)."""
    from qatune.report.costtable import not_measured

    def interval(c: Contrast) -> dict:
        return {"mean": c.estimate, "ci_low": c.ci_low, "ci_high": c.ci_high}

    def contrast(c: Contrast) -> dict:
        return {"diff": c.estimate, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p, "p_holm": c.p_holm,
                "questions": c.questions, "articles": c.articles, "seeds": list(c.seeds), "df": c.df, "se": c.se,
                "seed_share": c.seed_share}

    configs = [{"id": c.id, "arm": c.arm, "label": c.label, "point": c.point, "train_questions": c.volume,
                "seeds": c.seed_scores(), "run_ids": [r["id"] for r in c.runs], "em": interval(a.intervals[c.id]["em"]),
                "f1": interval(a.intervals[c.id]["f1"]),
                "ended": [e.to_dict() if (e := a.endings[r["id"]]) else None for r in c.runs], "notes": c.notes,
                "best_step": [(r["costs"].get("validation") or {}).get("best_step") for r in c.runs],
                "validation_f1": [(r["costs"].get("validation") or {}).get("f1") for r in c.runs],
                **({"squad_v2": v2_means(c)} if a.scores.version.startswith("2") else {})} for c in a.configs]
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
            "factorial": [{"train_questions": f["volume"], "models": f["models"], "methods": f["methods"],
                           "reference": f["reference"],
                           "cells": {m: {s: f["f1"][(m, s)] for s in f["methods"]} for m in f["models"]},
                           "configurations": {m: {s: f["cells"][(m, s)].id for s in f["methods"]}
                                              for m in f["models"]},
                           "test_questions": f["test_questions"], "selection_questions": f["selection_questions"],
                           "method_effect": {m: {s: contrast(c) for s, c in e.items()}
                                             for m, e in f["method_effect"].items()},
                           "model_effect": {s: contrast(c) for s, c in f["model_effect"].items()},
                           "interaction": {s: contrast(c) for s, c in f["interaction"].items()}} for f in a.factorial],
            "pareto": pareto_fronts(a),
            "inference_cost_failures": [{"run": rid, "error": e} for rid, e in not_measured(a.done)]}


def write_report(study_dir: str | Path, all_runs: bool = False) -> dict:
    """Write report.md, report.html, the figures and split.json into ``study_dir``; works on a partly finished
    study. Returns the JSON summary with the paths written."""
    study_dir = Path(study_dir)
    a = analyse(study_dir, all_runs)
    written = figures(study_dir, a) if a.done else []
    parts = blocks(a, study_dir, written)
    md, page = study_dir / "report.md", study_dir / "report.html"
    _write(md, to_markdown(parts))
    _write(page, to_html(parts, study_dir))
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
