"""Reports: a study's results -> report.md, report.html (one self-contained page), figures and a JSON summary.

What a reviewer needs to trust each sentence:

* **What one configuration is**: a run's resolved configuration without its seed (:func:`study.config_id`),
  so only seeds are averaged. The report covers the study file's latest registered grid; rows of earlier
  grids stay in ``study.sqlite`` and are reported only when asked (``all_runs``).
* **Every number carries its uncertainty**: 95% intervals from a two-level bootstrap (seeds within each
  configuration, questions shared by all; :mod:`qatune.stats`), scored per question with the official rules
  of the data's SQuAD version.
* **No winner's curse**: when an arm of the headline has several configurations, the best is chosen on a
  fixed *selection* part of the evaluation questions and the difference is tested on the disjoint rest.
* **Families are corrected**: the "rank makes no difference" tests get Holm-adjusted p-values.
* **Findings claim only what an interval supports**: a difference is stated only when its interval
  excludes zero.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from qatune.errors import QatuneError
from qatune.metrics import squad_v1_scores, squad_v2_scores
from qatune.stats import Contrast, bootstrap_contrast, equality_test, holm, pareto_front
from qatune.store import connect, latest_grid, rows

CURVE_GAIN = 1.0  # F1 points: a run whose last learning-curve interval still raised F1 by more is "not converged"
SPLIT_SEED = 0
SELECTION_SHARE = 0.5  # of the evaluation questions, by a hash of their id, for choosing configurations
N_TABLE = 2000  # bootstrap resamples for the per-configuration intervals (comparisons use N_BOOT)
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


def _volume(row: dict) -> float:
    return float(row["costs"]["train_questions"])


def _label(arm: str, point: dict) -> str:
    parts = []
    for k, v in point.items():
        if k in ("seed", "train_questions"):
            continue
        parts.append(str(v) if k == "alpha_policy" else f"{SHORT.get(k, k)}={v}")
    return " ".join([arm, *parts])


def configurations(done: list[dict]) -> list[Config]:
    """Group finished runs by configuration id; labels say what differs (made unique with the id if needed)."""
    from qatune.study import config_id

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in done:
        groups[config_id(r["config"])].append(r)
    configs = []
    for cid, rs in groups.items():
        rs.sort(key=lambda r: r["config"]["seed"])
        point = {k: v for k, v in rs[0]["point"].items() if k != "seed"}
        configs.append(Config(cid, rs[0]["arm"], point, _volume(rs[0]), rs, _label(rs[0]["arm"], point)))
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
        self.version = "1.1"

    def refs(self, cfg: dict) -> tuple[dict, str]:
        from qatune.train import load_split

        key = (cfg["eval_data"], cfg["eval_split"], cfg["eval_articles"], json.dumps(cfg["eval_questions"]),
               cfg["seed"] if cfg["eval_questions"] is not None else None, cfg["repair_answers"])
        if key not in self._refs:
            data = load_split(cfg["eval_data"], cfg["eval_split"], cfg["eval_articles"], cfg["eval_questions"],
                              cfg["seed"], cfg["repair_answers"])
            self._refs[key] = (data.references(), data.version)
        return self._refs[key]

    def run(self, row: dict) -> dict[str, tuple[float, float]]:
        if row["id"] not in self._runs:
            path = Path(row["output_dir"]) / "predictions.json"
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


def _convergence(c: Config) -> str:
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
    from qatune.study import count_params, rank_note
    from qatune.train import TrainConfig

    for c in configs:
        if c.strategy != "lora":
            continue
        cfg = {k: v for k, v in c.runs[0]["config"].items() if k in TrainConfig.__dataclass_fields__}
        try:
            note = rank_note(count_params(TrainConfig.from_dict(cfg)), c.rank)
        except Exception:  # noqa: BLE001 - the model's config may not be reachable here; the note is optional
            note = ""
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


def _pair(cfgs: list[Config], qids: list[str], scores: Scores, choose: bool) -> Config:
    """The configuration of an arm to compare: the only one, or the best on the selection questions."""
    if len(cfgs) == 1 or not choose:
        return cfgs[0]
    return max(cfgs, key=lambda c: scores.matrix(c, qids, "f1").mean())


def _contrast(cells: list[tuple[Config, float]], qids: list[str], scores: Scores, seed: int) -> dict[str, Contrast]:
    return {m: bootstrap_contrast([scores.matrix(c, qids, m) for c, _ in cells], [w for _, w in cells], seed=seed)
            for m in ("f1", "em")}


def analyse(study_dir: Path, all_runs: bool = False) -> Analysis:
    """Everything the report says, computed once: configurations, intervals, comparisons and tests."""
    if not (study_dir / "study.sqlite").exists():
        raise ReportError(f"{study_dir}: no study.sqlite here (run `qatune study FILE` first, or pass the "
                          f"study's directory)")
    db = connect(study_dir)
    every = rows(db)
    grid = latest_grid(db)
    db.close()
    for r in every:  # a finished run whose files were deleted is reported as such, not read
        if r["status"] == "finished" and not (Path(r["output_dir"]) / "predictions.json").is_file():
            r["status"], r["error"] = "finished, files missing", (
                f"{r['output_dir']} has no predictions.json; `qatune study FILE` trains the run again")
    if grid is not None and not all_runs:
        wanted = set(grid["run_ids"])
        covered = [r for r in every if r["id"] in wanted]
    else:
        covered = every
    done = [r for r in covered if r["status"] == "finished" and r["metrics"]]
    configs = configurations(done)
    scores = Scores()
    _rank_notes(configs)
    intervals = {}
    for c in configs:
        qids = scores.questions(c.runs)
        intervals[c.id] = {m: bootstrap_contrast([scores.matrix(c, qids, m)], [1.0], n_resamples=N_TABLE)
                           for m in ("em", "f1")}
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
        choose = any(len(by[(a, v)]) > 1 for a in headline for v in volumes)
        selection = [q for q in questions if selection_part(q)] if choose else []
        test = [q for q in questions if not selection_part(q)] if choose else questions
        split = {"seed": SPLIT_SEED, "selection_share": SELECTION_SHARE, "selection": len(selection),
                 "test": len(test), "chosen": choose, "selection_ids": selection, "test_ids": test}
        pairs = {}
        for v in volumes:
            if not test:
                break
            a, b = (_pair(by[(arm, v)], selection, scores, choose) for arm in headline)
            pairs[v] = (a, b)
            comparisons.append({"volume": v, "a": a, "b": b, "candidates": [len(by[(arm, v)]) for arm in headline],
                                **_contrast([(a, 1.0), (b, -1.0)], test, scores, seed=int(v))})
        if len(pairs) >= 2:
            lo, hi = min(pairs), max(pairs)
            cells = [(pairs[hi][0], 1.0), (pairs[hi][1], -1.0), (pairs[lo][0], -1.0), (pairs[lo][1], 1.0)]
            interaction = {"volumes": (lo, hi), "pairs": (pairs[lo], pairs[hi]),
                           **_contrast(cells, test, scores, seed=1)}
    rank_tests = _rank_tests(configs, questions, scores)
    return Analysis(covered, done, grid, len(every) - len(covered), configs, scores, intervals, questions,
                    comparisons, rank_tests, interaction, headline, split)


def _rank_tests(configs: list[Config], qids: list[str], scores: Scores) -> list[dict]:
    """Per LoRA arm, volume and everything else fixed: does rank change F1? One family, Holm-adjusted."""
    groups: dict[tuple, dict[int, Config]] = defaultdict(dict)
    for c in configs:
        if c.strategy == "lora":
            rest = tuple((k, v) for k, v in c.point.items() if k != "lora_rank")
            groups[(c.arm, c.volume, rest)][c.rank] = c
    tests = []
    for (arm, volume, rest), by_rank in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], str(kv[0][2]))):
        if len(by_rank) < 2 or not qids:
            continue
        ranks = sorted(by_rank)
        cells = [scores.matrix(by_rank[r], qids, "f1") for r in ranks]
        p, method = equality_test(cells)
        tests.append({"arm": arm, "volume": volume, "fixed": dict(rest), "ranks": ranks,
                      "configs": [by_rank[r].id for r in ranks], "f1": [float(c.mean()) for c in cells],
                      "p": p, "method": method})
    for t, adj in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adj
    return tests


# ---------------------------------------------------------------------------------------------- text blocks
# The report is a list of blocks rendered twice, as markdown and as HTML, so the two never disagree.
def _ci(c: Contrast, digits: int = 1, signed: bool = False) -> str:
    f = f"+.{digits}f" if signed else f".{digits}f"
    return f"{c.estimate:{f}} [{c.ci_low:{f}}, {c.ci_high:{f}}]"


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 0.0001 else "< 0.0001"


def _findings(a: Analysis) -> list[str]:
    out = []
    for comp in a.comparisons[-1:]:  # the headline: the largest volume both arms trained on
        f1, x, y = comp["f1"], comp["a"], comp["b"]
        where = _where(comp, a.split)
        if f1.excludes_zero():
            win, lose = (x, y) if f1.estimate > 0 else (y, x)
            lo, hi = sorted((abs(f1.ci_low), abs(f1.ci_high)))
            out.append(f"**{win.label}** beats **{lose.label}** by {abs(f1.estimate):.2f} F1 points (95% CI {lo:.2f} "
                       f"to {hi:.2f}, p = {_p(f1.p)}) at {int(comp['volume'])} training questions{where}, training "
                       f"{win.runs[0]['costs']['trainable_percent']:.2f}% vs "
                       f"{lose.runs[0]['costs']['trainable_percent']:.2f}% of the weights.")
        else:
            out.append(f"**{x.label}** and **{y.label}** are not distinguishable at {int(comp['volume'])} training "
                       f"questions: F1 difference {_ci(f1, 2, True)} (95% CI), p = {_p(f1.p)}{where}.")
    for t in a.rank_tests:
        means = np.array(t["f1"])
        lo_r, hi_r = t["ranks"][int(np.argmin(means))], t["ranks"][int(np.argmax(means))]
        verdict = "rank matters" if t["p_holm"] < 0.05 else "no detectable effect of rank"
        fixed = ", ".join(f"{v}" if k == "alpha_policy" else f"{SHORT.get(k, k)}={v}" for k, v in t["fixed"].items()
                          if k not in ("train_questions",))
        out.append(f"{t['arm']} ({fixed or 'one setting'}) at {int(t['volume'])} questions: F1 goes from "
                   f"{means.min():.2f} (r={lo_r}) to {means.max():.2f} (r={hi_r}) across ranks "
                   f"{t['ranks'][0]}–{t['ranks'][-1]}; Holm-adjusted p = {_p(t['p_holm'])} over {len(a.rank_tests)} "
                   f"test(s): {verdict} at the 5% level.")
    if a.interaction:
        it, (lo, hi) = a.interaction["f1"], a.interaction["volumes"]
        (alo, blo), (ahi, bhi) = a.interaction["pairs"]
        gap = f"gap {ahi.arm} − {bhi.arm}"
        if it.excludes_zero():
            more = ahi.arm if it.estimate > 0 else bhi.arm
            out.append(f"More data helps **{more}** more: the F1 {gap} changes by {it.estimate:+.2f} points from "
                       f"{int(lo)} to {int(hi)} training questions (95% CI {it.ci_low:+.2f} to {it.ci_high:+.2f}, "
                       f"p = {_p(it.p)}).")
        else:
            out.append(f"No detectable change of the F1 {gap} between {int(lo)} and {int(hi)} training questions: "
                       f"{_ci(it, 2, True)} (95% CI), p = {_p(it.p)}.")
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


def _where(comp: dict, split: dict | None) -> str:
    if split and split["chosen"]:
        return (f" (tested on {split['test']} questions; the configurations were chosen on the other "
                f"{split['selection']})")
    return f" (on {comp['f1'].questions} questions)"


def _blocks(a: Analysis, study_dir: Path, figures: list[str]) -> list[tuple]:
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
        b.append(("ul", [f"`{r['id']}` {_label(r['arm'], r['point'])}, "
                         f"{r['point'].get('train_questions', 'all')} training questions, seed {r['config']['seed']}: "
                         f"{r['status']}" + (f" ({r['error'].splitlines()[0]})" if r["error"] else "")
                         for r in missing]))
    if not a.done:
        b.append(("p", "No finished runs yet."))
        return b
    v2 = a.scores.version.startswith("2")
    seeds = sorted({len(c.runs) for c in a.configs})
    b += [("h2", "How to read the numbers"),
          ("ul", [f"Evaluation: SQuAD v{a.scores.version} rules, {len(a.questions)} questions scored in every run"
                  + (" (unanswerable questions score 1 only for an empty answer; HasAns/NoAns columns split them)"
                     if v2 else "") + ".",
                  "A configuration is a run's full configuration without its seed: only seeds are averaged. "
                  f"Seeds per configuration: {', '.join(map(str, seeds))}.",
                  "Intervals are 95% percentile intervals of a two-level bootstrap: each configuration's seeds "
                  "are resampled, and so are the evaluation questions (the same draw for every configuration in a "
                  "comparison, so comparisons are paired)"
                  + ("; with one seed they cover question sampling only." if seeds == [1] else "."),
                  ("Headline: no comparison yet (an arm of the headline has no finished run)." if not a.comparisons
                   else f"Headline choice without bias: where an arm of the headline has several configurations, the "
                   f"best is chosen on a fixed selection part of the evaluation questions ({a.split['selection']} "
                   f"questions: a hash of the question id with seed {SPLIT_SEED}, share {SELECTION_SHARE:.0%}) "
                   f"and the difference is tested on the other {a.split['test']} (listed in `split.json`)."
                   if a.split and a.split["chosen"] else
                   "Headline: each headline arm has a single configuration, so nothing is chosen and all "
                   "questions test the difference."),
                  f"Learning curves: a run is \"not converged\" when F1 on its curve questions still rose by more "
                  f"than {CURVE_GAIN:.1f} point over its last evaluation interval."])]
    marks = cost_marks(a.done)
    top = max(c.volume for c in a.configs)
    b += [("h2", f"Headline table ({int(top)} training questions)"),
          ("p", "Every configuration at the largest data volume; EM and F1: mean over seeds [95% interval]. "
                "‡ marks a LoRA rank at or beyond the width of the adapted layers, † runs slowed by other load.")]
    header = ["configuration", "train q", "seeds", "EM", "F1"]
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
               _ci(iv["f1"])]
        if v2:
            m = _v2_means(c)
            row += [f"{m['HasAns_f1']:.1f}" if "HasAns_f1" in m else "—", f"{m['NoAns_f1']:.1f}" if "NoAns_f1" in m
                    else "—", f"{m['best_f1']:.1f} ({m['best_f1_thresh']:.2f})" if "best_f1" in m else "—"]
        slowed = sum(r["id"] in marks for r in c.runs)
        row += [_convergence(c), f"{c.runs[0]['costs']['trainable_percent']:.2f}", _pflop(c.runs),
                f"{np.mean([r['costs']['train_s'] for r in c.runs]):.0f}" + (f" †{slowed}" if slowed else "")]
        body.append(row)
    b.append(("table", header, body))
    notes = sorted({n for c in a.configs for n in c.notes})
    if notes:
        b.append(("ul", notes))
    b.append(("h2", "Comparisons and tests"))
    if a.comparisons:
        rows_ = []
        for comp in a.comparisons:
            rows_.append([f"{int(comp['volume'])}", comp["a"].label, comp["b"].label,
                          " / ".join(map(str, comp["candidates"])), _ci(comp["f1"], 2, True), _p(comp["f1"].p),
                          _ci(comp["em"], 2, True), _p(comp["em"].p), str(comp["f1"].questions)])
        b += [("p", f"Headline arms `{a.headline[0]}` − `{a.headline[1]}` (from `[study] headline`), at each data "
                    f"volume; 'candidates' counts the configurations each arm had to choose from."),
              ("table", ["train q", "A", "B", "candidates", "F1 diff [95% CI]", "p", "EM diff [95% CI]", "p",
                         "test questions"], rows_)]
    if a.interaction:
        it, (lo, hi) = a.interaction["f1"], a.interaction["volumes"]
        b.append(("p", f"Data-volume interaction: change of the F1 difference A − B from {int(lo)} to {int(hi)} "
                       f"training questions = {_ci(it, 2, True)}, p = {_p(it.p)} (same test questions, bootstrap "
                       f"over seeds and questions)."))
    if a.rank_tests:
        b += [("p", "Does LoRA rank matter? A permutation test per arm and setting of 'F1 does not depend on rank' "
                    "(statistic: range of the rank means); p-values Holm-adjusted over the family. A large p-value "
                    "means no detectable effect, not proof that there is none."),
              ("table", ["arm", "train q", "setting", "F1 by rank", "p", "Holm p", "method"],
               [[t["arm"], f"{int(t['volume'])}", ", ".join(f"{k}={v}" for k, v in t["fixed"].items()
                                                            if k != "train_questions") or "—",
                 ", ".join(f"r={r}: {m:.2f}" for r, m in zip(t["ranks"], t["f1"])), _p(t["p"]), _p(t["p_holm"]),
                 t["method"]] for t in a.rank_tests])]
    b += [("h2", "Findings"), ("ul", _findings(a) or ["Not enough finished runs for a comparison yet."])]
    b += [("h2", "Figures")] + [("img", name) for name in figures]
    b += _cost_blocks(a.done, marks)
    from qatune.cost import COST_HEADER, COST_INTRO, cost_figure, cost_rows, not_measured

    def label(r: dict) -> str:
        return _label(r["arm"], r["point"])

    measured, failed = cost_rows(a.done, label), not_measured(a.done)
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
        body.append([f"`{r['id']}`", _label(r["arm"], r["point"]), f"{int(_volume(r))}", str(r["config"]["seed"]),
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


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out += [f"# {rest[0]}", ""]
        elif kind == "h2":
            out += [f"## {rest[0]}", ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "table":
            header, body = rest
            numeric = [all(_numeric(row[i]) for row in body) and body for i in range(len(header))]
            out += ["| " + " | ".join(header) + " |",
                    "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
            out += ["| " + " | ".join(str(x) for x in row) + " |" for row in body] + [""]
        elif kind == "img":
            out += [f"![{rest[0]}]({rest[0]})", ""]
    return "\n".join(out)


def _numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,.]+( †\d+)?|n/a", str(text)))


def _inline(text: str) -> str:
    """Markdown's bold and code spans as HTML, everything else escaped."""
    text = html.escape(str(text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2430; margin: 0;
       background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 12px; } h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #dde1e6;
  padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; display: block; overflow-x: auto; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e5e8ec; text-align: left; white-space: nowrap; vertical-align: top; }
th { background: #eef1f5; white-space: normal; vertical-align: bottom; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td:last-child { white-space: normal; min-width: 160px; } tr:hover td { background: #f8fafc; } code { font-size: 12px; background: #f0f2f5; padding: 1px 4px; border-radius: 3px; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; border: 1px solid #e5e8ec; }
figcaption { font-size: 12px; color: #5b6573; } ul { padding-left: 22px; } li { margin: 4px 0; }
"""


def to_html(blocks: list[tuple], figure_dir: Path) -> str:
    """The report as one page: figures embedded as base64 PNG, so the file can be mailed or archived alone."""
    title = next((rest[0] for kind, *rest in blocks if kind == "h1"), "Study report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            header, body = rest
            numeric = [all(_numeric(row[i]) for row in body) and bool(body) for i in range(len(header))]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr></thead><tbody>")
            for row in body:
                out.append("<tr>" + "".join(f'<td class="num">{_inline(x)}</td>' if n else f"<td>{_inline(x)}</td>"
                                            for x, n in zip(row, numeric)) + "</tr>")
            out.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((figure_dir / rest[0]).read_bytes()).decode()
            out.append(f'<figure><img alt="{html.escape(rest[0])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(rest[0])}</figcaption></figure>")
    out.append("</main></body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- JSON
def summary(a: Analysis) -> dict:
    """The machine-readable report (``qatune report --json``)."""
    from qatune.cost import not_measured

    def interval(c: Contrast) -> dict:
        return {"mean": c.estimate, "ci_low": c.ci_low, "ci_high": c.ci_high}

    def contrast(c: Contrast) -> dict:
        return {"diff": c.estimate, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p, "questions": c.questions,
                "seeds": list(c.seeds)}

    configs = [{"id": c.id, "arm": c.arm, "label": c.label, "point": c.point, "train_questions": c.volume,
                "seeds": len(c.runs), "run_ids": [r["id"] for r in c.runs], "em": interval(a.intervals[c.id]["em"]),
                "f1": interval(a.intervals[c.id]["f1"]),
                "converged": [converged(r.get("curve")) for r in c.runs], "notes": c.notes,
                **({"squad_v2": _v2_means(c)} if a.scores.version.startswith("2") else {})} for c in a.configs]
    split = {k: v for k, v in (a.split or {}).items() if not k.endswith("_ids")}
    comparisons = [{"kind": "headline", "arms": list(a.headline), "train_questions": comp["volume"],
                    "a": comp["a"].id, "b": comp["b"].id, "a_label": comp["a"].label, "b_label": comp["b"].label,
                    "candidates": comp["candidates"], "selection_questions": split.get("selection", 0),
                    "test_questions": comp["f1"].questions, "split": {**split, "file": "split.json"},
                    "f1": contrast(comp["f1"]), "em": contrast(comp["em"])} for comp in a.comparisons]
    tests: dict = {"rank": [dict(t) for t in a.rank_tests], "volume_interaction": None}
    if a.interaction:
        (alo, blo), (ahi, bhi) = a.interaction["pairs"]
        tests["volume_interaction"] = {"train_questions": list(a.interaction["volumes"]),
                                       "a": [alo.id, ahi.id], "b": [blo.id, bhi.id],
                                       "f1": contrast(a.interaction["f1"]), "em": contrast(a.interaction["em"])}
    return {"squad_version": a.scores.version, "runs": len(a.covered), "finished": len(a.done),
            "other_rows": a.other_rows, "questions": len(a.questions), "configurations": configs,
            "comparisons": comparisons, "tests": tests,
            "inference_cost_failures": [{"run": rid, "error": e} for rid, e in not_measured(a.done)]}


# ---------------------------------------------------------------------------------------------- entry point
def write_report(study_dir: str | Path, all_runs: bool = False) -> dict:
    """Write report.md, report.html, the figures and split.json into ``study_dir``; works on a partly finished
    study. Returns the JSON summary with the paths written."""
    study_dir = Path(study_dir)
    a = analyse(study_dir, all_runs)
    figures = _figures(study_dir, a) if a.done else []
    blocks = _blocks(a, study_dir, figures)
    md, page = study_dir / "report.md", study_dir / "report.html"
    _write(md, to_markdown(blocks))
    _write(page, to_html(blocks, study_dir))
    if a.split and a.split["chosen"]:
        _write(study_dir / "split.json", json.dumps({k: a.split[k] for k in ("seed", "selection_share")}
                                                    | {"selection": a.split["selection_ids"],
                                                       "test": a.split["test_ids"]}, indent=1))
    else:  # nothing was chosen: a split from an earlier report would describe nothing here
        (study_dir / "split.json").unlink(missing_ok=True)
    return {"report": str(md), "html": str(page), "figures": figures, **summary(a)}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- figures
def _save(fig, study_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(study_dir / name, dpi=110)
    plt.close(fig)
    return name


def _figures(study_dir: Path, a: Analysis) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    top = max(c.volume for c in a.configs)
    err = lambda iv: [[iv.estimate - iv.ci_low], [iv.ci_high - iv.estimate]]  # noqa: E731

    # F1/EM vs LoRA rank at the largest volume, one line per arm and setting; full fine-tuning as a band
    lines = defaultdict(list)
    for c in a.configs:
        if c.volume == top and c.strategy == "lora":
            rest = " ".join(str(v) for k, v in c.point.items() if k not in ("lora_rank", "train_questions"))
            lines[f"{c.arm} {rest}".strip()].append(c)
    if lines:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric, title in [(axes[0], "f1", "F1"), (axes[1], "em", "Exact match")]:
            for c in a.configs:
                if c.volume == top and c.strategy == "full":
                    iv = a.intervals[c.id][metric]
                    ax.axhspan(iv.ci_low, iv.ci_high, alpha=0.15, color="grey")
                    ax.axhline(iv.estimate, color="grey", linestyle="--", label=f"{c.label} (full FT)")
            for name, cs in sorted(lines.items()):
                cs.sort(key=lambda c: c.rank)
                ivs = [a.intervals[c.id][metric] for c in cs]
                ax.errorbar([c.rank for c in cs], [iv.estimate for iv in ivs],
                            yerr=np.hstack([err(iv) for iv in ivs]), marker="o", capsize=3, label=name)
            ax.set_xscale("log", base=2)
            ranks = sorted({c.rank for cs in lines.values() for c in cs})
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.minorticks_off()
            ax.set_xlabel("LoRA rank")
            ax.set_ylabel(title)
            ax.set_title(f"{title} vs LoRA rank ({int(top)} questions, 95% intervals)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        names.append(_save(fig, study_dir, "rank_sweep.png"))

    # F1 vs training-data volume per configuration (label without the volume)
    by_label = defaultdict(list)
    for c in a.configs:
        by_label[c.label].append(c)
    if any(len(cs) > 1 for cs in by_label.values()):
        fig, ax = plt.subplots(figsize=(8, 4.4))
        for label, cs in sorted(by_label.items()):
            cs.sort(key=lambda c: c.volume)
            ivs = [a.intervals[c.id]["f1"] for c in cs]
            ax.errorbar([c.volume for c in cs], [iv.estimate for iv in ivs], yerr=np.hstack([err(iv) for iv in ivs]),
                        marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        volumes = sorted({c.volume for c in a.configs})
        ax.set_xticks(volumes, [f"{int(v):,}" for v in volumes])
        ax.minorticks_off()
        ax.set_xlabel("training questions")
        ax.set_ylabel("F1")
        ax.set_title("F1 vs training-data volume (95% intervals)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        names.append(_save(fig, study_dir, "data_volume.png"))

    # Learning curves: F1 vs training windows for the headline configurations (each seed a line)
    shown = {id(c): c for comp in a.comparisons for c in (comp["a"], comp["b"])} or \
        {id(c): c for c in a.configs if c.volume == top}
    curved = [c for c in shown.values() if any(r.get("curve") for r in c.runs)]
    if curved:
        fig, ax = plt.subplots(figsize=(8, 4.4))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, c in enumerate(sorted(curved, key=lambda c: (c.volume, c.label))):
            for j, r in enumerate(c.runs):
                pts = r.get("curve") or []
                if pts:
                    flag = "" if converged(pts) is not False else " (not converged)"
                    ax.plot([p["windows"] for p in pts], [p["f1"] for p in pts], marker=".",
                            color=colors[k % len(colors)], alpha=0.9 if j == 0 else 0.5,
                            label=f"{c.label}, {int(c.volume)} q{flag}" if j == 0 else None)
        ax.set_xlabel("training windows seen")
        ax.set_ylabel("F1 (learning-curve questions)")
        ax.set_title("Learning curves of the headline configurations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        names.append(_save(fig, study_dir, "learning_curves.png"))

    # Pareto: F1 vs trainable parameters and vs training compute (counted FLOPs; wall time for older runs)
    at_top = [c for c in a.configs if c.volume == top]
    counted = all(r["costs"].get("train_flops") for c in at_top for r in c.runs)
    cost_key, cost_label = (("train_flops", "training compute (counted PFLOP)") if counted
                            else ("train_s", "training wall time (s)"))
    scale = 1e15 if counted else 1.0
    pts = [(c.label, a.intervals[c.id]["f1"].estimate, np.mean([r["costs"]["trainable_params"] for r in c.runs]),
            np.mean([r["costs"][cost_key] for r in c.runs]) / scale) for c in at_top]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k, xlabel in [(axes[0], 2, "trainable parameters"), (axes[1], 3, cost_label)]:
        xs = np.array([p[k] for p in pts])
        ys = np.array([p[1] for p in pts])
        ax.scatter(xs, ys)
        for p in pts:
            ax.annotate(p[0], (p[k], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(list(xs), list(ys))
        ax.plot(xs[front], ys[front], "r--", label="Pareto front")
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.1)  # room for the labels of the outermost points
        ax.set_xlabel(xlabel)
        ax.set_ylabel("F1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"F1 vs trainable parameters ({int(top)} questions)")
    axes[1].set_title(f"F1 vs {cost_label.split(' (')[0]}")
    names.append(_save(fig, study_dir, "pareto.png"))
    return names
