"""How big a data selection is, without tokenising it: windows from question counts, and the optimizer steps a
run will take. The dry run plans with these, and a tuned study places its rungs with them when a run is given in
epochs rather than steps."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from qatune.config import TrainConfig

# Question counts of hub data sets, for dry-run estimates when the data is not at hand (offline).
KNOWN_SIZES = {("rajpurkar/squad", "train"): 87599, ("rajpurkar/squad", "validation"): 10570,
               ("rajpurkar/squad_v2", "train"): 130319, ("rajpurkar/squad_v2", "validation"): 11873}
WINDOWS_PER_QUESTION = 1.02  # measured on SQuAD v1.1 dev at 384/128 (qatune data check)


def estimate_windows(source: str, split: str, articles: str | None, questions, seed: int,
                     role: str = "train") -> float:
    """Windows of a data selection: question count x windows per question. Hub data sets of known size are
    not downloaded for this (a dry run works offline); other sources are loaded once. ``role`` (train, eval,
    validation) names the options a bad selection comes from."""
    name, _, named_split = source.partition(":") if not Path(source).exists() else (source, "", "")
    total = KNOWN_SIZES.get((name, named_split or split))
    if total is not None and not articles:
        n = total if questions is None else (round(questions * total) if isinstance(questions, float) else questions)
        return n * WINDOWS_PER_QUESTION
    return _question_count(source, split, articles, json.dumps(questions), seed, role) * WINDOWS_PER_QUESTION


@functools.lru_cache(maxsize=64)
def _question_count(source: str, split: str, articles: str | None, questions: str, seed: int, role: str) -> int:
    from qatune.data import load_split

    return len(load_split(source, split, articles, json.loads(questions), seed, repair=False, role=role))


def train_windows(cfg: TrainConfig) -> float:
    """The training windows of a run (estimated from its question count)."""
    return estimate_windows(cfg.train_data, cfg.train_split, cfg.train_articles, cfg.train_questions, cfg.seed)


def optimizer_steps(cfg: TrainConfig, windows: float | None = None) -> int:
    """The optimizer steps of a run: ``max_steps``, else its epochs over the (estimated) training windows."""
    if cfg.max_steps:
        return cfg.max_steps
    batches = math.ceil((train_windows(cfg) if windows is None else windows) / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * max(1, batches // cfg.grad_accum)))
