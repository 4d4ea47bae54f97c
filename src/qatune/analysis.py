"""A study's results analysed once: configurations, per-question scores, intervals, the headline comparison and the
tests the report states (see :mod:`qatune.report` for what a reviewer needs to trust each sentence).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from qatune.config import model_name
from qatune.errors import QatuneError
from qatune.metrics import squad_v1_scores, squad_v2_scores
from qatune.record import exact_match
from qatune.rundir import PREDICTIONS, RunDir
from qatune.stats import Contrast, contrast, equality_test, holm
from qatune.store import connect, decisions, failed_decisions, latest_grid, rows
from qatune.store import exists as store_exists
from qatune.tuning import summarize

CURVE_GAIN = 1.0  # F1 points: a run whose last learning-curve interval still raised F1 by more is "not converged"
SPLIT_SEED = 0
SELECTION_SHARE = 0.5  # of the evaluation questions, by a hash of their id, for choosing configurations
SLOW_FRACTION = 0.8  # a run below this share of its configuration's isolated FLOP/s is marked
LOADED_CORES = 0.25  # other processes using this many cores on average while a run trained: "machine loaded"
SHORT = {"lora_rank": "r", "learning_rate": "lr"}


class ReportError(QatuneError, RuntimeError):
    """A study directory that cannot be reported; the message says what is missing."""


# ---------------------------------------------------------------------------------------------- configurations
@dataclass
class Config:
    """The runs of one configuration (they differ only in their seeds)."""

    id: str
    arm: str
    point: dict  # the grid point without the seed
    volume: float  # training questions
    runs: list[dict]
    label: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def strategy(self) -> str:
        return self.runs[0]["config"]["strategy"]

    @property
    def rank(self) -> int | None:
        return self.runs[0]["config"]["lora_rank"] if self.strategy == "lora" else None

    def seed_scores(self) -> list[dict]:
        """Each run's own test scores, so a reader sees the spread that the interval summarises."""
        return [{"seed": r["config"]["seed"], "f1": r["metrics"]["f1"], "em": exact_match(r["metrics"])}
                for r in self.runs]


def volume_of(row: dict) -> float:
    return float(row["costs"]["train_questions"])


def config_label(arm: str, point: dict) -> str:
    parts = []
    for k, v in point.items():
        if k in ("seed", "train_questions"):
            continue
        parts.append(str(v) if k == "alpha_policy" else f"{SHORT.get(k, k)}={v}")
    return " ".join([arm, *parts])


def configurations(done: list[dict]) -> list[Config]:
    """Group finished runs by configuration id; labels say what differs (made unique with the id if needed)."""
    from qatune.config import config_id

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in done:
        groups[config_id(r["config"])].append(r)
    configs = []
    for cid, rs in groups.items():
        rs.sort(key=lambda r: r["config"]["seed"])
        point = {k: v for k, v in rs[0]["point"].items() if k != "seed"}
        configs.append(Config(cid, rs[0]["arm"], point, volume_of(rs[0]), rs, config_label(rs[0]["arm"], point)))
    seen = defaultdict(list)
    for c in configs:
        seen[(c.label, c.volume)].append(c)
    for same in seen.values():
        if len(same) > 1:
            for c in same:
                c.label += f" [{c.id[:6]}]"
    return sorted(configs, key=lambda c: (-c.volume, c.arm, c.label))


# ---------------------------------------------------------------------------------------------- per question
class Scores:
    """Per-question (EM, F1) x 100 of every run, with the rules of its data's SQuAD version; loaded once."""

    def __init__(self):
        self._refs: dict[tuple, tuple[dict, str]] = {}
        self._runs: dict[str, dict[str, tuple[float, float]]] = {}
        self.articles: dict[str, str] = {}  # question id -> its article's title: the clusters of the question sample
        self.version = "1.1"

    def refs(self, cfg: dict) -> tuple[dict, str]:
        from qatune.data import load_role

        key = (cfg["eval_data"], cfg["eval_split"], cfg["eval_articles"], json.dumps(cfg["eval_questions"]),
               cfg["seed"] if cfg["eval_questions"] is not None else None, cfg["repair_answers"])
        if key not in self._refs:
            data = load_role(cfg, "eval")
            self._refs[key] = (data.references(), data.version)
            self.articles.update((ex.id, ex.title) for ex in data.examples)
        return self._refs[key]

    def run(self, row: dict) -> dict[str, tuple[float, float]]:
        if row["id"] not in self._runs:
            path = RunDir(row["output_dir"]).predictions
            try:
                preds = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ReportError(f"{path}: the predictions of finished run {row['id']} cannot be read ({e}); "
                                  f"rerun the study to train it again") from e
            refs, version = self.refs(row["config"])
            v2 = version.startswith("2")
            self.version = version if v2 else self.version
            raw = squad_v2_scores(refs, preds) if v2 else squad_v1_scores(refs, preds)
            self._runs[row["id"]] = {q: (100 * em, 100 * f1) for q, (em, f1) in raw.items()}
        return self._runs[row["id"]]

    def questions(self, runs: list[dict]) -> list[str]:
        """Questions scored in every one of ``runs`` (sorted)."""
        common = None
        for r in runs:
            ids = set(self.run(r))
            common = ids if common is None else common & ids
        return sorted(common or ())

    def groups(self, qids: list[str]) -> list[str]:
        """The article of each question (questions are sampled in articles, so articles are a level of the sample)."""
        return [self.articles.get(q, q) for q in qids]

    def contrast(self, cells: list[tuple[Config, float]], qids: list[str], metric: str) -> Contrast:
        """A linear combination of configurations' means on ``qids`` (:func:`qatune.stats.contrast`)."""
        return contrast([self.matrix(c, qids, metric) for c, _ in cells], [w for _, w in cells], self.groups(qids))

    def matrix(self, config: Config, qids: list[str], metric: str) -> np.ndarray:
        """(seeds, questions) scores of one configuration."""
        k = 0 if metric == "em" else 1
        return np.array([[self.run(r)[q][k] for q in qids] for r in config.runs])


def selection_part(qid: str) -> bool:
    """A fixed, seeded split: the question's share from a hash of its id, so it is the same in every run."""
    h = int(hashlib.sha256(f"{SPLIT_SEED}:{qid}".encode()).hexdigest()[:8], 16) / 2**32
    return h < SELECTION_SHARE


# ---------------------------------------------------------------------------------------------- convergence
def converged(curve: list[dict] | None) -> bool | None:
    """False when the last learning-curve interval still raised F1 by more than CURVE_GAIN; None without a curve."""
    if not curve or len(curve) < 2:
        return None
    return curve[-1]["f1"] - curve[-2]["f1"] <= CURVE_GAIN


def convergence_text(c: Config) -> str:
    flags = [converged(r.get("curve")) for r in c.runs]
    known = [f for f in flags if f is not None]
    if not known:
        return "—"
    bad = sum(not f for f in known)
    return "yes" if not bad else f"**no** ({bad}/{len(known)})"


# ---------------------------------------------------------------------------------------------- costs
def _shape(row: dict) -> tuple:
    """What sets a run's speed (not its data volume or seed): runs of one shape should train at one FLOP/s."""
    c = row["config"]
    return (c["model"], c["strategy"], c.get("lora_rank") if c["strategy"] == "lora" else None, c["max_seq_length"],
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
    from qatune.plan import count_params, rank_note

    for c in configs:
        if c.strategy != "lora":
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
    factorial: list[dict]  # per data volume: the 2x2 of model x strategy (see :func:`_factorial`)
    factorial_note: str | None  # why there is none (the factors are confounded, or a cell is missing)
    tuning: list[dict]  # per tuned configuration: values tried, validation F1, chosen (qatune.tuning.summarize)
    family: list[str]  # the claims adjusted together by Holm (each F1 Contrast of them has p_holm)


def validation_f1(c: Config) -> float | None:
    """Mean validation F1 of a configuration's runs (run.json ``validation``), None unless every run has one."""
    values = [(r["costs"].get("validation") or {}).get("f1") for r in c.runs]
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def _choice(groups: list[list[Config]], questions: list[str]) -> tuple[str | None, list[str], list[str]]:
    """How one configuration per group is chosen, and on which questions the result is tested: nothing to choose
    (all questions test); validation F1, when every candidate has it (all questions test: none chose); else a
    fixed selection part of the questions chooses and the rest tests."""
    if not any(len(g) > 1 for g in groups):
        return None, [], questions
    if all(validation_f1(c) is not None for g in groups for c in g):
        return "validation", [], questions
    return ("selection", [q for q in questions if selection_part(q)],
            [q for q in questions if not selection_part(q)])


def _pair(cfgs: list[Config], qids: list[str], scores: Scores, on: str | None) -> Config:
    """The configuration of an arm to compare: the only one, or the best on validation data or on the selection
    questions (``on``, from :func:`_choice`)."""
    if len(cfgs) == 1 or on is None:
        return cfgs[0]
    if on == "validation":
        return max(cfgs, key=validation_f1)
    return max(cfgs, key=lambda c: scores.matrix(c, qids, "f1").mean())


def _contrast(cells: list[tuple[Config, float]], qids: list[str], scores: Scores) -> dict[str, Contrast]:
    return {m: scores.contrast(cells, qids, m) for m in ("f1", "em")}


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
    _separability(tuning, covered)
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
        on, selection, test = _choice([by[(a, v)] for a in headline for v in volumes], questions)
        split = {"seed": SPLIT_SEED, "selection_share": SELECTION_SHARE, "selection": len(selection),
                 "test": len(test), "chosen": on is not None, "on": on, "selection_ids": selection,
                 "test_ids": test}
        pairs = {}
        for v in volumes:
            if not test:
                break
            a, b = (_pair(by[(arm, v)], selection, scores, on) for arm in headline)
            pairs[v] = (a, b)
            comparisons.append({"volume": v, "a": a, "b": b, "candidates": [len(by[(arm, v)]) for arm in headline],
                                **_contrast([(a, 1.0), (b, -1.0)], test, scores)})
        if len(pairs) >= 2:
            lo, hi = min(pairs), max(pairs)
            cells = [(pairs[hi][0], 1.0), (pairs[hi][1], -1.0), (pairs[lo][0], -1.0), (pairs[lo][1], 1.0)]
            interaction = {"volumes": (lo, hi), "pairs": (pairs[lo], pairs[hi]),
                           **_contrast(cells, test, scores)}
    tuned_options: dict[str, set] = defaultdict(set)
    for t in tuning:
        tuned_options[t["arm"]].update([t["option"]] if isinstance(t["option"], str) else t["option"])
    rank_tests = _rank_tests(configs, questions, scores, tuned_options)
    factorial, note = _factorial(configs, questions, scores, [model_name(r["config"]) for r in done],
                                 {(model_name(r["config"]), r["config"]["strategy"]) for r in covered})
    family = _adjust(comparisons, interaction, factorial)
    return Analysis(covered, done, grid, other_rows, configs, scores, intervals, questions,
                    comparisons, rank_tests, interaction, headline, split, factorial, note, tuning, family)


def _adjust(comparisons: list[dict], interaction: dict | None, factorial: list[dict]) -> list[str]:
    """Holm's adjustment over the F1 claims a reader takes as the study's verdict: the headline at each volume, the
    volume interaction and every factorial effect (each Contrast gains ``p_holm``). Returns the family's names."""
    slots: list[tuple[str, dict, str]] = []  # (name, holder, key): where each contrast lives
    for comp in comparisons:
        slots.append((f"headline at {int(comp['volume'])} questions", comp, "f1"))
    if interaction:
        slots.append(("data-volume interaction", interaction, "f1"))
    for f in factorial:
        v = int(f["volume"])
        slots += [(f"full − LoRA on {m} at {v}", f["strategy_effect"], m) for m in f["models"]]
        slots += [(f"model effect with {s} at {v}", f["model_effect"], s) for s in f["strategies"]]
        slots.append((f"model × strategy interaction at {v}", f, "interaction"))
    adjusted = holm([holder[key].p for _, holder, key in slots])
    for (_, holder, key), p in zip(slots, adjusted):
        holder[key] = replace(holder[key], p_holm=p)
    return [name for name, _, _ in slots]


def _separability(tuning: list[dict], rows: list[dict]) -> None:
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
        qa, qb = (_question_scores(m, s) for m, s in ((winner, a), (runner, b)))
        common = sorted(set(qa) & set(qb))
        if len(common) >= 2:
            c = contrast([np.array([[qa[q] for q in common]]), np.array([[qb[q] for q in common]])], [1.0, -1.0])
            t.update(separable=c.excludes_zero(), margin_ci=[c.ci_low, c.ci_high], margin_questions=len(common))


def _question_scores(row: dict, rung: dict) -> dict[str, float]:
    """A candidate's per-question validation F1 behind its score at a rung: of the saved steps up to the rung's,
    the one whose mean is the score (the kept model's step: the best so far under keep = best)."""
    saved = {s: q for s, q in RunDir(row["output_dir"]).read_question_scores().items() if s <= rung["step"] and q}
    if not saved:
        return {}
    step = min(saved, key=lambda s: abs(np.mean(list(saved[s].values())) - rung["f1"]))
    return saved[step]


def _factorial(configs: list[Config], questions: list[str], scores: Scores, order: list[str],
               declared: set[tuple[str, str]]) -> tuple[list[dict], str | None]:
    """Model size and fine-tuning strategy as two factors, when the arms cross two models with full and LoRA.

    Per data volume each cell is its arm(s) at the configuration chosen as the headline chooses (:func:`_choice`),
    and every effect is a contrast on the test questions with its interval (:func:`qatune.stats.contrast`): strategy
    (full - LoRA) within each model, model (first - second, in the order the arms name them)
    within each strategy, and their interaction ((full - LoRA) of the first model - that of the second).
    ``order`` is the runs' models in study order."""
    models = list(dict.fromkeys(order))
    strategies = sorted({c.strategy for c in configs})
    if len(models) != 2 or strategies != ["full", "lora"]:
        return [], None
    cells: dict[tuple, list[Config]] = defaultdict(list)
    for c in configs:
        cells[(model_name(c.runs[0]["config"]), c.strategy, c.volume)].append(c)
    present = {(m, s) for m, s, _ in cells}
    if len(present) < 4:  # the study declares the four cells and one has no result yet, or it lacks cells
        cells_named = " and ".join(f"{m} {s}" for m, s in sorted(declared - present if len(declared) == 4 else present))
        return [], (f"The model and strategy effects need all four cells, and {cells_named} has no finished run yet "
                    f"(see the runs without results above)." if len(declared) == 4 else
                    f"The model and strategy effects are confounded: the arms cover only {cells_named}; add the "
                    f"other cells (each model with each strategy) to tell them apart.")
    out = []
    for v in sorted({c.volume for c in configs}, reverse=True):
        if any((m, s, v) not in cells for m in models for s in ("full", "lora")) or not questions:
            continue
        on, selection, test = _choice([cells[(m, s, v)] for m in models for s in ("full", "lora")], questions)
        cell = {(m, s): _pair(cells[(m, s, v)], selection, scores, on) for m in models for s in ("full", "lora")}
        (a, b) = models

        def effect(*terms: tuple[tuple[str, str], float], cell=cell, test=test) -> Contrast:
            return scores.contrast([(cell[k], w) for k, w in terms], test, "f1")

        out.append({"volume": v, "models": models, "strategies": ["full", "lora"], "cells": cell,
                    "test_questions": len(test), "selection_questions": len(selection),
                    "strategy_effect": {m: effect(((m, "full"), 1.0), ((m, "lora"), -1.0)) for m in models},
                    "model_effect": {s: effect(((a, s), 1.0), ((b, s), -1.0)) for s in ("full", "lora")},
                    "interaction": effect(((a, "full"), 1.0), ((a, "lora"), -1.0), ((b, "full"), -1.0),
                                          ((b, "lora"), 1.0)),
                    "f1": {k: float(scores.matrix(c, test, "f1").mean()) for k, c in cell.items()}})
    return out, None


def _rank_tests(configs: list[Config], qids: list[str], scores: Scores, tuned: dict[str, set]) -> list[dict]:
    """Per LoRA arm, volume and everything else fixed: does rank change F1? One family, Holm-adjusted. Options an
    arm tunes (``tuned``) are not held fixed: each rank is compared at its own chosen value (``tuned_values``)."""
    groups: dict[tuple, dict[int, Config]] = defaultdict(dict)
    for c in configs:
        if c.strategy == "lora":
            rest = tuple((k, v) for k, v in c.point.items() if k != "lora_rank" and k not in tuned.get(c.arm, ()))
            groups[(c.arm, c.volume, rest)][c.rank] = c
    tests = []
    for (arm, volume, rest), by_rank in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], str(kv[0][2]))):
        if len(by_rank) < 2 or not qids:
            continue
        ranks = sorted(by_rank)
        cells = [scores.matrix(by_rank[r], qids, "f1") for r in ranks]
        p = equality_test(cells, scores.groups(qids))
        method = ("t-test of the rank pair" if len(ranks) == 2 else
                  f"t-tests of the {len(ranks) * (len(ranks) - 1) // 2} rank pairs, Bonferroni")
        method += (", seeds and articles sampled" if min(c.shape[0] for c in cells) >= 2
                   else ", articles sampled (one seed: run-to-run variation not covered)")
        own = sorted(tuned.get(arm, ()))
        tests.append({"arm": arm, "volume": volume, "fixed": dict(rest), "ranks": ranks,
                      "configs": [by_rank[r].id for r in ranks], "f1": [float(c.mean()) for c in cells],
                      "p": p, "method": method, "tuned": own,
                      "tuned_values": [{k: by_rank[r].point.get(k) for k in own} for r in ranks]})
    for t, adj in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adj
    return tests


