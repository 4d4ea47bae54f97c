"""The effects a report tests beyond the headline: model and method as two factors, LoRA rank (and any method's
rank) within an arm, and whether each tuning choice stands above the validation noise."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from qatune.config import model_name
from qatune.methods import REFERENCE
from qatune.report.configs import Config, Scores, choose_on, pick
from qatune.report.stats import Contrast, contrast, equality_test, holm
from qatune.rundir import RunDir


def separability(tuning: list[dict], rows: list[dict]) -> None:
    """Whether each tuning choice stands above the noise: the chosen candidate against the runner-up at the last
    rung where both were scored, paired over the validation questions (their per-question F1 saved by the runs).
    Adds ``margin`` (validation F1 points), ``runner_up``, ``separable`` (the paired 95% interval excludes zero;
    None when the per-question scores are not there) and ``margin_ci`` to each decided entry."""
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("grp"):
            by_group[r["grp"]].append(r)
    for t in tuning:
        t.update(margin=None, runner_up=None, separable=None, margin_ci=None)
        members = by_group.get(t["configuration"], [])
        if t["chosen"] is None or len(members) < 2:
            continue
        values = [x["value"] for x in t["tried"]]
        winner = next((m for m, v in zip(members, values) if v == t["chosen"]), None)
        if winner is None:
            continue
        rung_scores = {m["id"]: {s["rung"]: s for s in m.get("scores") or [] if "rung" in s} for m in members}
        shared = [k for k in rung_scores[winner["id"]]
                  if sum(k in rung_scores[m["id"]] for m in members) >= 2]
        if not shared:
            continue
        rung = max(shared)
        others = [(m, v) for m, v in zip(members, values) if m is not winner and rung in rung_scores[m["id"]]]
        runner, runner_value = max(others, key=lambda mv: rung_scores[mv[0]["id"]][rung]["f1"])
        a, b = rung_scores[winner["id"]][rung], rung_scores[runner["id"]][rung]
        t.update(margin=a["f1"] - b["f1"], runner_up=runner_value)
        qa, qb = (question_scores(m, s) for m, s in ((winner, a), (runner, b)))
        common = sorted(set(qa) & set(qb))
        if len(common) >= 2:
            c = contrast([np.array([[qa[q] for q in common]]), np.array([[qb[q] for q in common]])], [1.0, -1.0])
            t.update(separable=c.excludes_zero(), margin_ci=[c.ci_low, c.ci_high], margin_questions=len(common))


def question_scores(row: dict, rung: dict) -> dict[str, float]:
    """A candidate's per-question validation F1 behind its score at a rung: of the saved steps up to the rung's,
    the one whose mean is the score (the kept model's step: the best so far under keep = best)."""
    saved = {s: q for s, q in RunDir(row["output_dir"]).read_question_scores().items() if s <= rung["step"] and q}
    if not saved:
        return {}
    step = min(saved, key=lambda s: abs(np.mean(list(saved[s].values())) - rung["f1"]))
    return saved[step]


def factorial(configs: list[Config], questions: list[str], scores: Scores,
               declared: list[tuple[str, str]]) -> tuple[list[dict], str | None]:
    """Model and fine-tuning method as two factors: the study's models (one or two) crossed with its methods, one
    of them the reference (:data:`qatune.methods.REFERENCE` when the study has it, else its first method).

    ``declared``: the (model, method) of every run the study declares, in study order. Per data volume each cell is
    its arm(s) at the configuration chosen as the headline chooses (:func:`choose_on`), and every effect is a contrast
    on the test questions with its interval (:func:`qatune.report.stats.contrast`): each method against the reference
    within each model (reference - method); with two models, the model effect within each method (first - second)
    and each method's interaction with the model ((reference - method) on the first - on the second). One model
    needs three methods or more (two are the headline's comparison)."""
    models = list(dict.fromkeys(m for m, _ in declared))
    kinds = list(dict.fromkeys(s for _, s in declared))
    if len(models) > 2 or len(kinds) < 2 or len(kinds) < 4 - len(models):
        return [], None
    ref = REFERENCE if REFERENCE in kinds else kinds[0]
    kinds = [ref] + [k for k in kinds if k != ref]
    cells: dict[tuple, list[Config]] = defaultdict(list)
    for c in configs:
        cells[(model_name(c.runs[0]["config"]), c.strategy, c.volume)].append(c)
    present = {(m, s) for m, s, _ in cells}
    design = {(m, s) for m in models for s in kinds}
    if not design <= set(declared):
        return [], (f"The model and method effects are confounded: the arms cover only "
                    f"{' and '.join(f'{m} {s}' for m, s in sorted(set(declared)))}; add the other cells (each model "
                    f"with each method) to tell them apart.")
    if not design <= present:
        missing = " and ".join(f"{m} {s}" for m, s in sorted(design - present))
        return [], (f"The model and method effects need all {len(design)} cells, and {missing} has no finished run "
                    f"yet (see the runs without results above).")
    out = []
    for v in sorted({c.volume for c in configs}, reverse=True):
        if any((m, s, v) not in cells for m, s in design) or not questions:
            continue
        on, selection, test = choose_on([cells[(m, s, v)] for m, s in sorted(design)], questions)
        cell = {(m, s): pick(cells[(m, s, v)], selection, scores, on) for m, s in design}

        def effect(*terms: tuple[tuple[str, str], float], cell=cell, test=test) -> Contrast:
            return scores.contrast([(cell[k], w) for k, w in terms], test, "f1")

        others = kinds[1:]
        two = len(models) == 2
        out.append({"volume": v, "models": models, "methods": kinds, "reference": ref, "cells": cell,
                    "test_questions": len(test), "test_ids": test,
                    "selection_questions": len(selection),
                    "method_effect": {m: {s: effect(((m, ref), 1.0), ((m, s), -1.0)) for s in others}
                                      for m in models},
                    "model_effect": {s: effect(((models[0], s), 1.0), ((models[-1], s), -1.0)) for s in kinds}
                    if two else {},
                    "interaction": {s: effect(((models[0], ref), 1.0), ((models[0], s), -1.0),
                                              ((models[-1], ref), -1.0), ((models[-1], s), 1.0)) for s in others}
                    if two else {},
                    "f1": {k: float(scores.matrix(c, test, "f1").mean()) for k, c in cell.items()}})
    return out, None


def rank_tests(configs: list[Config], qids: list[str], scores: Scores, tuned: dict[str, set]) -> list[dict]:
    """Per arm whose method has a rank, volume and everything else fixed: does rank change F1? One family,
    Holm-adjusted. Options an arm tunes (``tuned``) are not held fixed: each rank is compared at its own chosen
    value (``tuned_values``)."""
    groups: dict[tuple, dict[int, Config]] = defaultdict(dict)
    for c in configs:
        if c.rank is not None:
            rest = tuple((k, v) for k, v in c.point.items() if k != c.method.rank and k not in tuned.get(c.arm, ()))
            groups[(c.arm, c.volume, rest)][c.rank] = c
    tests = []
    for (arm, volume, rest), by_rank in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], str(kv[0][2]))):
        if len(by_rank) < 2 or not qids:
            continue
        ranks = sorted(by_rank)
        cells = [scores.matrix(by_rank[r], qids, "f1") for r in ranks]
        p = equality_test(cells, scores.groups(qids))
        how = ("t-test of the rank pair" if len(ranks) == 2 else
                  f"t-tests of the {len(ranks) * (len(ranks) - 1) // 2} rank pairs, Bonferroni")
        how += (", seeds and articles sampled" if min(c.shape[0] for c in cells) >= 2
                   else ", articles sampled (one seed: run-to-run variation not covered)")
        own = sorted(tuned.get(arm, ()))
        tests.append({"arm": arm, "volume": volume, "fixed": dict(rest), "ranks": ranks,
                      "configs": [by_rank[r].id for r in ranks], "f1": [float(c.mean()) for c in cells],
                      "p": p, "method": how, "tuned": own,
                      "tuned_values": [{k: by_rank[r].point.get(k) for k in own} for r in ranks]})
    for t, adj in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adj
    return tests
