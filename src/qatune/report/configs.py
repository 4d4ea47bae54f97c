"""Configurations and their per-question scores: what one configuration is (a run's configuration without its
seed), its scores question by question, and how one configuration per arm is chosen (validation F1, or a fixed
selection part of the questions) without a winner's curse."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from qatune.answer.metrics import squad_v1_scores, squad_v2_scores
from qatune.errors import QatuneError
from qatune.methods import Method, method
from qatune.record import exact_match
from qatune.report.stats import Contrast, contrast
from qatune.rundir import RunDir

SPLIT_SEED = 0
SELECTION_SHARE = 0.5  # of the evaluation questions, by a hash of their id, for choosing configurations
SHORT = {"lora_rank": "r", "learning_rate": "lr"}


class ReportError(QatuneError, RuntimeError):
    """A study directory that cannot be reported; the message says what is missing."""



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
    def method(self) -> Method:
        return method(self.strategy)

    @property
    def rank(self) -> int | None:
        """The rank of a method that has one (a LoRA rank), else None."""
        return self.runs[0]["config"][self.method.rank] if self.method.rank else None

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


class Scores:
    """Per-question (EM, F1) x 100 of every run, with the rules of its data's SQuAD version; loaded once."""

    def __init__(self):
        self._refs: dict[tuple, tuple[dict, str]] = {}
        self._runs: dict[str, dict[str, tuple[float, float]]] = {}
        self.articles: dict[str, str] = {}  # question id -> its article's title: the clusters of the question sample
        self.version = "1.1"

    def refs(self, cfg: dict) -> tuple[dict, str]:
        from qatune.data.splits import load_role

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
        """A linear combination of configurations' means on ``qids`` (:func:`qatune.report.stats.contrast`)."""
        return contrast([self.matrix(c, qids, metric) for c, _ in cells], [w for _, w in cells], self.groups(qids))

    def matrix(self, config: Config, qids: list[str], metric: str) -> np.ndarray:
        """(seeds, questions) scores of one configuration."""
        k = 0 if metric == "em" else 1
        return np.array([[self.run(r)[q][k] for q in qids] for r in config.runs])


def selection_part(qid: str) -> bool:
    """A fixed, seeded split: the question's share from a hash of its id, so it is the same in every run."""
    h = int(hashlib.sha256(f"{SPLIT_SEED}:{qid}".encode()).hexdigest()[:8], 16) / 2**32
    return h < SELECTION_SHARE


def validation_f1(c: Config) -> float | None:
    """Mean validation F1 of a configuration's runs (run.json ``validation``), None unless every run has one."""
    values = [(r["costs"].get("validation") or {}).get("f1") for r in c.runs]
    return float(np.mean(values)) if values and all(v is not None for v in values) else None


def choose_on(groups: list[list[Config]], questions: list[str]) -> tuple[str | None, list[str], list[str]]:
    """How one configuration per group is chosen, and on which questions the result is tested: nothing to choose
    (all questions test); validation F1, when every candidate has it (all questions test: none chose); else a
    fixed selection part of the questions chooses and the rest tests."""
    if not any(len(g) > 1 for g in groups):
        return None, [], questions
    if all(validation_f1(c) is not None for g in groups for c in g):
        return "validation", [], questions
    return ("selection", [q for q in questions if selection_part(q)],
            [q for q in questions if not selection_part(q)])


def pick(cfgs: list[Config], qids: list[str], scores: Scores, on: str | None) -> Config:
    """The configuration of an arm to compare: the only one, or the best on validation data or on the selection
    questions (``on``, from :func:`choose_on`)."""
    if len(cfgs) == 1 or on is None:
        return cfgs[0]
    if on == "validation":
        return max(cfgs, key=validation_f1)
    return max(cfgs, key=lambda c: scores.matrix(c, qids, "f1").mean())


def contrast_of(cells: list[tuple[Config, float]], qids: list[str], scores: Scores) -> dict[str, Contrast]:
    return {m: scores.contrast(cells, qids, m) for m in ("f1", "em")}
