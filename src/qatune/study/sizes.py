"""How big a data selection is, without tokenising it: windows from the questions' lengths, and the optimizer steps a
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
# Context lengths of SQuAD v1.1 dev in wordpiece tokens (the uncased BERT vocab): the 1st, 3rd, ..., 99th
# percentile of its 10,570 questions' contexts, and the mean question length. With them a hub data set of known
# size is sized at any window setting without downloading it (measured: within 2% of the real windows per
# question from 384/128 down to 64/16).
SQUAD_CONTEXT_TOKENS = (39, 60, 73, 81, 93, 98, 101, 104, 108, 110, 113, 115, 117, 119, 121, 123, 126, 128, 130,
                        133, 135, 137, 140, 142, 145, 149, 152, 154, 157, 160, 162, 166, 169, 173, 178, 181, 185,
                        188, 194, 199, 204, 210, 220, 230, 241, 251, 267, 284, 319, 432)
SQUAD_QUESTION_TOKENS = 13
# Wordpiece tokens per whitespace-separated word on SQuAD (contexts, questions): local data is sized from its
# word counts without a tokenizer (measured: within 3% of the real windows from 384/128 down to 64/16).
TOKENS_PER_WORD = (1.29, 1.2)


def windows_of(context_tokens: float, question_tokens: float, max_seq_length: int, doc_stride: int) -> int:
    """How many windows one question becomes: each holds ``max_seq_length`` minus the question and three special
    tokens of context, and the next starts ``doc_stride`` tokens before the previous one ends (the fast
    tokenizer's overflow rule)."""
    room = max(1, max_seq_length - 3 - math.ceil(question_tokens))
    return 1 + math.ceil(max(0, math.ceil(context_tokens) - room) / max(1, room - doc_stride))


def windows_per_question(max_seq_length: int = 384, doc_stride: int = 128) -> float:
    """Mean windows per SQuAD question at a window setting (1.02 at 384/128)."""
    return sum(windows_of(c, SQUAD_QUESTION_TOKENS, max_seq_length, doc_stride)
               for c in SQUAD_CONTEXT_TOKENS) / len(SQUAD_CONTEXT_TOKENS)


def estimate_windows(source: str, split: str, articles: str | None, questions, seed: int, role: str = "train",
                     max_seq_length: int = 384, doc_stride: int = 128, held_out: float = 0.0) -> float:
    """Windows of a data selection at a window setting, without tokenising it. Hub data sets of known size are
    not downloaded for this (a dry run works offline): their count times SQuAD's windows per question; other
    sources are loaded once, selected as a run selects them (``held_out``: the validation_share of the articles
    held out before the questions are drawn) and sized from their word counts. ``role`` (train, eval, validation)
    names the options a bad selection comes from."""
    name, _, named_split = source.partition(":") if not Path(source).exists() else (source, "", "")
    total = KNOWN_SIZES.get((name, named_split or split))
    if total is not None and not articles:
        total = round(total * (1 - held_out))
        n = total if questions is None else (round(questions * total) if isinstance(questions, float) else questions)
        return min(n, total) * windows_per_question(max_seq_length, doc_stride)
    return _window_count(source, split, articles, json.dumps(questions), seed, role, max_seq_length, doc_stride,
                         held_out)


@functools.lru_cache(maxsize=64)
def _window_count(source: str, split: str, articles: str | None, questions: str, seed: int, role: str,
                  max_seq_length: int, doc_stride: int, held_out: float) -> int:
    from qatune.data.splits import hold_out, load_split, subsample

    if held_out:
        rest, _ = hold_out(load_split(source, split, articles, None, seed, repair=False, role=role), held_out)
        examples = subsample(rest.examples, json.loads(questions), seed)
    else:
        examples = load_split(source, split, articles, json.loads(questions), seed, repair=False, role=role).examples
    per_context, per_question = TOKENS_PER_WORD
    return sum(windows_of(per_context * len(e.context.split()), per_question * len(e.question.split()),
                          max_seq_length, doc_stride) for e in examples)


def train_windows(cfg: TrainConfig) -> float:
    """The training windows of a run (estimated from its questions' lengths)."""
    return estimate_windows(cfg.train_data, cfg.train_split, cfg.train_articles, cfg.train_questions, cfg.seed,
                            "train", cfg.max_seq_length, cfg.doc_stride,
                            0.0 if cfg.validation_data else cfg.validation_share or 0.0)


def optimizer_steps(cfg: TrainConfig, windows: float | None = None) -> int:
    """The optimizer steps of a run: ``max_steps``, else those its FLOPs budget buys, else its epochs over the
    (estimated) training windows."""
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.max_train_flops:
        return budget_steps(cfg)
    batches = math.ceil((train_windows(cfg) if windows is None else windows) / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * max(1, batches // cfg.grad_accum)))


def budget_steps(cfg: TrainConfig) -> int:
    """The optimizer steps ``max_train_flops`` buys, estimated at a typical batch's padded width (the run itself
    counts its own batches, which it knows in advance, and stops at the exact step)."""
    from qatune.model.flops import for_config
    from qatune.study.calibrate import StepKey

    per_step = cfg.grad_accum * for_config(cfg).train(cfg.batch_size, StepKey.from_config(cfg).width)
    return max(1, math.ceil(cfg.max_train_flops / per_step))
