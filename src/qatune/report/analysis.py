"""A study's results analysed once: configurations, per-question scores, intervals, the headline comparison and the
tests the report states (see :mod:`qatune.report.write` for what a reviewer needs to trust each sentence).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qatune.config import model_name
from qatune.methods import method
from qatune.report import effects
from qatune.report.configs import (
    SELECTION_SHARE,
    SPLIT_SEED,
    Config,
    ReportError,
    Scores,
    choose_on,
    configurations,
    contrast_of,
    pick,
)
from qatune.report.convergence import Ending, ending
from qatune.report.stats import Contrast, holm, pareto_front
from qatune.report.tuningsummary import summarize
from qatune.rundir import PREDICTIONS, RunDir
from qatune.study.store import connect, latest_grid, rows
from qatune.study.store import exists as store_exists
from qatune.study.tuningstate import decisions, failed_decisions

SLOW_FRACTION = 0.8  # a run below this share of its configuration's isolated FLOP/s is marked
LOADED_CORES = 0.25  # other processes using this many cores on average while a run trained: "machine loaded"


# ---------------------------------------------------------------------------------------------- configurations


# ---------------------------------------------------------------------------------------------- per question


# ---------------------------------------------------------------------------------------------- costs
def _shape(row: dict) -> tuple:
    """What sets a run's speed (not its data volume or seed): runs of one shape should train at one FLOP/s."""
    c = row["config"]
    m = method(c["strategy"])
    return (c["model"], c["strategy"], tuple(str(c.get(k)) for k in m.cost_options), c["max_seq_length"],
            c["batch_size"], row["costs"].get("precision"), c.get("pad_to_max_length"), c.get("compile"))


def cost_marks(runs: list[dict]) -> dict[str, str]:
    """Runs that trained markedly slower (counted FLOP/s) than their shape's runs that had the machine to
    themselves, with the evidence recorded: other runs on the same device, or other load on the machine."""
    by_shape: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if r["costs"].get("train_flop_per_s"):
            by_shape[_shape(r)].append(r)
    marks = {}
    for rs in by_shape.values():
        alone = [r for r in rs if not r["costs"].get("shared_runs") and
                 (r["costs"].get("others_cores") or 0) < LOADED_CORES]
        reference = max(r["costs"]["train_flop_per_s"] for r in (alone or rs))
        for r in rs:
            c = r["costs"]
            if c["train_flop_per_s"] >= SLOW_FRACTION * reference:
                continue
            why = []
            if c.get("shared_runs"):
                why.append(f"shared device with {c['shared_runs']} run(s)")
            if (c.get("others_cores") or 0) >= LOADED_CORES:
                why.append(f"machine loaded ({c['others_cores']:.1f} cores busy elsewhere)")
            marks[r["id"]] = (", ".join(why) or "slower than its configuration alone") + \
                f": {c['train_flop_per_s'] / reference:.0%} of the isolated rate"
    return marks


def _rank_notes(configs: list[Config]) -> None:
    """Note the LoRA configurations whose rank reaches min(d_in, d_out) of adapted layers."""
    from qatune.config import TrainConfig
    from qatune.study.plan import count_params, rank_note

    for c in configs:
        if c.rank is None:
            continue
        widths = c.runs[0]["costs"]  # recorded by the run (its params); runs of older versions: from the config
        if "lora_layers" not in widths:
            cfg = {k: v for k, v in c.runs[0]["config"].items() if k in TrainConfig.__dataclass_fields__}
            try:
                widths = count_params(TrainConfig.from_dict(cfg))
            except Exception:  # noqa: BLE001 - the model's config may not be reachable here; the note is optional
                widths = {}
        note = rank_note(widths, c.rank)
        if note:
            c.notes.append("‡ " + note)


# ---------------------------------------------------------------------------------------------- analysis
@dataclass
class Analysis:
    covered: list[dict]
    done: list[dict]
    grid: dict | None
    other_rows: int
    configs: list[Config]
    scores: Scores
    intervals: dict[str, dict[str, Contrast]]  # config id -> em/f1
    questions: list[str]
    comparisons: list[dict]
    rank_tests: list[dict]
    interaction: dict | None
    headline: tuple[str, str] | None
    split: dict | None
    factorial: list[dict]  # per data volume: the models x fine-tuning methods (see :func:`factorial`)
    factorial_note: str | None  # why there is none (the factors are confounded, or a cell is missing)
    tuning: list[dict]  # per tuned configuration: values tried, validation F1, chosen (qatune.report.tuningsummary.summarize)
    family: list[str]  # the claims adjusted together by Holm (each F1 Contrast of them has p_holm)
    endings: dict[str, Ending | None]  # run id -> how its learning curve ended (qatune.report.convergence)


def analyse(study_dir: Path, all_runs: bool = False) -> Analysis:
    """Everything the report says, computed once: configurations, intervals, comparisons and tests."""
    if not Path(study_dir).is_dir():
        raise ReportError(f"{study_dir}: no such directory; give a study directory (where `qatune study` wrote "
                          f"study.sqlite and runs/)")
    if not store_exists(study_dir):
        raise ReportError(f"{study_dir}: no study.sqlite here (run `qatune study FILE` first, or pass the "
                          f"study's directory)")
    db = connect(study_dir)
    every = rows(db)
    grid = latest_grid(db)
    chosen, failed = decisions(db), failed_decisions(db)
    db.close()
    for r in every:  # tuning candidates waiting for their rung, or dropped: not results
        if r.get("stage") in ("paused", "pruned", "winner"):
            r["status"] = r["stage"]
    for r in every:  # a finished run whose files were deleted is reported as such, not read
        if r["status"] == "finished" and not RunDir(r["output_dir"]).predictions.is_file():
            r["status"], r["error"] = "finished, files missing", (
                f"{r['output_dir']} has no {PREDICTIONS}; `qatune study FILE` trains the run again")
    if grid is not None and not all_runs:
        wanted = set(grid["run_ids"])
        covered = [r for r in every if r["id"] in wanted]
    else:
        covered = every
    tuning = summarize(covered, chosen, failed)
    effects.separability(tuning, covered)
    other_rows = len(every) - len(covered)
    covered = [r for r in covered if r["status"] not in ("pruned", "winner")]
    done = [r for r in covered if r["status"] == "finished" and r["metrics"]]
    configs = configurations(done)
    scores = Scores()
    _rank_notes(configs)
    intervals = {}
    for c in configs:
        qids = scores.questions(c.runs)
        intervals[c.id] = {m: scores.contrast([(c, 1.0)], qids, m) for m in ("em", "f1")}
    questions = scores.questions(done) if done else []
    arms = list(dict.fromkeys(c.arm for c in configs))
    headline = tuple(grid["headline"]) if grid and grid.get("headline") else (
        tuple(arms[:2]) if len(arms) >= 2 else None)
    comparisons, interaction, split = [], None, None
    if headline and all(a in arms for a in headline) and questions:
        by = defaultdict(list)
        for c in configs:
            by[(c.arm, c.volume)].append(c)
        volumes = sorted(v for v in {c.volume for c in configs}
                         if by.get((headline[0], v)) and by.get((headline[1], v)))
        on, selection, test = choose_on([by[(a, v)] for a in headline for v in volumes], questions)
        split = {"seed": SPLIT_SEED, "selection_share": SELECTION_SHARE, "selection": len(selection),
                 "test": len(test), "chosen": on is not None, "on": on, "selection_ids": selection,
                 "test_ids": test}
        pairs = {}
        for v in volumes:
            if not test:
                break
            a, b = (pick(by[(arm, v)], selection, scores, on) for arm in headline)
            pairs[v] = (a, b)
            comparisons.append({"volume": v, "a": a, "b": b, "candidates": [len(by[(arm, v)]) for arm in headline],
                                **contrast_of([(a, 1.0), (b, -1.0)], test, scores)})
        if len(pairs) >= 2:
            lo, hi = min(pairs), max(pairs)
            cells = [(pairs[hi][0], 1.0), (pairs[hi][1], -1.0), (pairs[lo][0], -1.0), (pairs[lo][1], 1.0)]
            interaction = {"volumes": (lo, hi), "pairs": (pairs[lo], pairs[hi]),
                           **contrast_of(cells, test, scores)}
    tuned_options: dict[str, set] = defaultdict(set)
    for t in tuning:
        tuned_options[t["arm"]].update([t["option"]] if isinstance(t["option"], str) else t["option"])
    ranks = effects.rank_tests(configs, questions, scores, tuned_options)
    crossed, note = effects.factorial(configs, questions, scores,
                                      [(model_name(r["config"]), r["config"]["strategy"]) for r in covered])
    family = _adjust(comparisons, split["test_ids"] if split else [], interaction, crossed)
    return Analysis(covered, done, grid, other_rows, configs, scores, intervals, questions,
                    comparisons, ranks, interaction, headline, split, crossed, note, tuning, family,
                    {r["id"]: ending(r) for r in done})


def _adjust(comparisons: list[dict], test: list[str], interaction: dict | None, factorial: list[dict]) -> list[str]:
    """Holm's adjustment over the F1 claims a reader takes as the study's verdict: the headline at each volume, the
    volume interaction and every factorial effect (each Contrast gains ``p_holm``). A claim made twice (the headline
    is also a factorial effect: the same configurations on the same test questions) counts once in the family, under
    both its names. Returns the family's names."""
    claims: dict[tuple, list[tuple[str, dict, str]]] = {}  # the contrast's identity -> where it lives, named

    def add(name: str, holder: dict, key: str, terms: list[tuple[Config, float]], questions: list[str]) -> None:
        signed = sorted((c.id, w) for c, w in terms)
        flipped = sorted((c.id, -w) for c, w in terms)  # a - b and b - a are one two-sided claim
        claims.setdefault((tuple(min(signed, flipped)), tuple(questions)), []).append((name, holder, key))

    for comp in comparisons:
        add(f"headline at {int(comp['volume'])} questions", comp, "f1", [(comp["a"], 1.0), (comp["b"], -1.0)], test)
    if interaction:
        (la, lb), (ha, hb) = interaction["pairs"]
        add("data-volume interaction", interaction, "f1", [(ha, 1.0), (hb, -1.0), (la, -1.0), (lb, 1.0)], test)
    for f in factorial:
        v, cell, ref_key, (first, last) = int(f["volume"]), f["cells"], f["reference"], (f["models"][0], f["models"][-1])
        ref = method(ref_key).label
        for m in f["models"]:
            for s in f["method_effect"][m]:
                add(f"{ref} − {method(s).label} on {m} at {v}", f["method_effect"][m], s,
                    [(cell[(m, ref_key)], 1.0), (cell[(m, s)], -1.0)], f["test_ids"])
        for s in f["model_effect"]:
            add(f"model effect with {method(s).label} at {v}", f["model_effect"], s,
                [(cell[(first, s)], 1.0), (cell[(last, s)], -1.0)], f["test_ids"])
        for s in f["interaction"]:
            add(f"model × method interaction ({ref} − {method(s).label}) at {v}", f["interaction"], s,
                [(cell[(first, ref_key)], 1.0), (cell[(first, s)], -1.0), (cell[(last, ref_key)], -1.0),
                 (cell[(last, s)], 1.0)], f["test_ids"])
    places = list(claims.values())
    adjusted = holm([holder[key].p for (_, holder, key), *_ in places])
    for same, p in zip(places, adjusted):
        for _, holder, key in same:
            holder[key] = replace(holder[key], p_holm=p)
    return [" = ".join(name for name, _, _ in same) for same in places]


FRONT_COSTS = {"trainable_params": "trainable parameters", "train_flops": "training FLOPs (counted)",
               "latency_ms": "inference latency, p50 ms per question (batch 1, 1 thread, PyTorch fp32)"}


def pareto_fronts(a: Analysis) -> dict[str, list[dict]]:
    """Per cost, the configurations at the largest data volume that no other beats (cheaper or as cheap and higher
    test F1), cheapest first, across every method: which method buys F1 most cheaply. A cost some configuration
    lacks (latency without the inference-cost measurement) has no front."""
    if not a.configs:
        return {}
    top = max(c.volume for c in a.configs)
    at_top = [c for c in a.configs if c.volume == top]

    def cost(c: Config, key: str) -> float | None:
        values = [((r["costs"].get("inference") or {}).get("torch") or {}).get("p50_ms_1_thread")
                  if key == "latency_ms" else r["costs"].get(key) for r in c.runs]
        return float(np.mean(values)) if values and all(v is not None for v in values) else None

    fronts = {}
    for key in FRONT_COSTS:
        costs = [cost(c, key) for c in at_top]
        if any(x is None for x in costs):
            continue
        f1 = [a.intervals[c.id]["f1"].estimate for c in at_top]
        fronts[key] = [{"id": at_top[i].id, "label": at_top[i].label, "method": at_top[i].strategy,
                        "cost": costs[i], "f1": f1[i]} for i in pareto_front(costs, f1)]
    return fronts


