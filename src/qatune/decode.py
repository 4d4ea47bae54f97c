"""Decoding: start/end logits of every window -> the best answer span per question, with an n-best list.

The search is the usual one (top-``n_best`` start tokens x top-``n_best`` end tokens of each window,
context tokens only, ``start <= end``, at most ``max_answer_length`` tokens, best over all windows of a
question) but done as array operations over all windows at once: a (windows, n, n) score grid, then a
grouped sort to pick each question's candidates. Only the final answers are touched in Python.
SQuAD v2: the null score of a question is its smallest CLS score over windows; it answers "" when
``null - best_span > null_threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qatune.data import QAExample


@dataclass
class Decoded:
    predictions: dict[str, str]  # official {id: answer text}
    null_odds: dict[str, float]  # null score - best span score (SQuAD v2 "na_probs"; -inf-safe)
    nbest: dict[str, list[dict]] = field(default_factory=dict)


def decode(
    examples: Sequence[QAExample],
    example_index: np.ndarray,
    offsets: np.ndarray,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
    nbest_size: int = 0,
) -> Decoded:
    """Pick answers for ``examples`` from window logits.

    ``offsets`` is (windows, len, 2) with -1 outside the context (``Features.padded_offsets()``), the
    logits are (windows, len') with len' >= len (extra columns are ignored), ``example_index`` maps each
    window to its example. ``nbest_size`` > 0 also returns that many candidates per question with
    scores and softmax probabilities (the null answer included for v2).
    """
    n_win, width = offsets.shape[:2]
    start = np.asarray(start_logits, dtype=np.float64)[:, :width]
    end = np.asarray(end_logits, dtype=np.float64)[:, :width]
    valid = offsets[:, :, 0] >= 0
    s = np.where(valid, start, -np.inf)
    e = np.where(valid, end, -np.inf)
    k = min(n_best, width)
    s_idx = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < width else np.tile(np.arange(width), (n_win, 1))
    e_idx = np.argpartition(-e, k - 1, axis=1)[:, :k] if k < width else np.tile(np.arange(width), (n_win, 1))
    s_val = np.take_along_axis(s, s_idx, 1)
    e_val = np.take_along_axis(e, e_idx, 1)
    length = e_idx[:, None, :] - s_idx[:, :, None]
    score = s_val[:, :, None] + e_val[:, None, :]
    score = np.where((length >= 0) & (length < max_answer_length), score, -np.inf).reshape(n_win, k * k)

    # Each window's candidates (enough for the n-best), then one grouped sort over all of them.
    keep = max(1, nbest_size)
    if keep < k * k:
        top = np.argpartition(-score, keep - 1, axis=1)[:, :keep]
    else:
        top = np.tile(np.arange(k * k), (n_win, 1))
    c_score = np.take_along_axis(score, top, 1).ravel()
    c_win = np.repeat(np.arange(n_win), top.shape[1])
    c_s = s_idx[c_win, top.ravel() // k]
    c_e = e_idx[c_win, top.ravel() % k]
    c_ex = example_index[c_win]
    order = np.lexsort((c_win, -c_score, c_ex))  # by example, best score first, earlier window on ties
    c_score, c_win, c_s, c_e, c_ex = c_score[order], c_win[order], c_s[order], c_e[order], c_ex[order]
    first = np.flatnonzero(np.r_[True, c_ex[1:] != c_ex[:-1]])
    rank = np.arange(len(c_ex)) - np.repeat(first, np.diff(np.r_[first, len(c_ex)]))

    null = np.full(len(examples), np.inf)
    np.minimum.at(null, example_index, start[:, 0] + end[:, 0])

    predictions: dict[str, str] = {ex.id: "" for ex in examples}
    null_odds: dict[str, float] = {}
    best = np.flatnonzero(rank == 0)
    best_score = np.full(len(examples), -np.inf)
    best_score[c_ex[best]] = c_score[best]
    for i in best:
        if np.isfinite(c_score[i]):
            ex = examples[c_ex[i]]
            w = c_win[i]
            predictions[ex.id] = ex.context[offsets[w, c_s[i], 0] : offsets[w, c_e[i], 1]]
    for j, ex in enumerate(examples):
        diff = float(null[j] - best_score[j]) if np.isfinite(best_score[j]) else float("inf")
        null_odds[ex.id] = diff
        if version_2 and diff > null_threshold:
            predictions[ex.id] = ""

    nbest: dict[str, list[dict]] = {}
    if nbest_size > 0:
        sel = np.flatnonzero((rank < nbest_size) & np.isfinite(c_score))
        for i in sel:
            ex = examples[c_ex[i]]
            w = c_win[i]
            a, b = int(offsets[w, c_s[i], 0]), int(offsets[w, c_e[i], 1])
            nbest.setdefault(ex.id, []).append(
                {"text": ex.context[a:b], "start": a, "end": b, "score": float(c_score[i])})
        for j, ex in enumerate(examples):
            cands = nbest.setdefault(ex.id, [])
            if version_2 and np.isfinite(null[j]):
                cands.append({"text": "", "start": -1, "end": -1, "score": float(null[j])})
                cands.sort(key=lambda c: -c["score"])
                del cands[nbest_size:]
            if cands:
                sc = np.array([c["score"] for c in cands])
                p = np.exp(sc - sc.max())
                p /= p.sum()
                for c, pr in zip(cands, p):
                    c["probability"] = float(pr)
    return Decoded(predictions, null_odds, nbest)
