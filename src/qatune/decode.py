"""Decoding: start/end logits of every window -> the best answer span per question, with an n-best list.

The search is the usual one (top-``n_best`` start tokens x top-``n_best`` end tokens of each window,
context tokens only, ``start <= end``, at most ``max_answer_length`` tokens, best over all windows of a
question) but done as array operations over all windows at once: a (windows, n, n) score grid, then a
grouped sort to pick each question's candidates. Only the final answers are touched in Python.
SQuAD v2: the null score of a question is its smallest CLS score over windows; it answers "" when
``null - best_span > null_threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

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
    n_ex = len(examples)
    example_index = np.asarray(example_index)
    valid_np = offsets[:, :, 0] >= 0
    both = torch.stack([torch.as_tensor(np.asarray(x, dtype=np.float32)[:, :width]) for x in (start_logits, end_logits)])
    k = min(n_best, width)
    # Top-k in float32 over the logits; candidate sums in float64, where adding two float32 values is exact.
    # Windows are bucketed by their last context token, so the search skips most of the padding.
    last = width - np.argmax(valid_np[:, ::-1], axis=1)
    bucket = np.minimum(width, np.maximum(k, -(-last // 64) * 64))
    val = torch.empty((2, n_win, k), dtype=torch.float32)
    idx = torch.empty((2, n_win, k), dtype=torch.int64)
    for w in np.unique(bucket).tolist():
        rows = torch.from_numpy(np.flatnonzero(bucket == w))
        sub = both[:, rows, :w].masked_fill(~torch.from_numpy(valid_np[rows.numpy(), :w]), -math.inf)
        val[:, rows], idx[:, rows] = torch.topk(sub, k, dim=2, sorted=False)
    s_idx, e_idx = idx[0], idx[1]
    small = idx.to(torch.int16)
    length = small[1][:, None, :] - small[0][:, :, None]
    ok = (length >= 0) & (length < max_answer_length)
    val = val.double()
    score = (val[0][:, :, None] + val[1][:, None, :]).masked_fill_(~ok, -math.inf).reshape(n_win, k * k)
    # Each window's best candidates (enough for the n-best), then one grouped sort over all of them.
    if nbest_size > 1:
        c_score, top = torch.topk(score, min(nbest_size, k * k), dim=1)
    else:
        c_score, top = score.max(dim=1, keepdim=True)
    c_win = np.repeat(np.arange(n_win), top.shape[1])
    top = top.numpy().ravel()
    c_s = s_idx.numpy()[c_win, top // k]
    c_e = e_idx.numpy()[c_win, top % k]
    c_score = c_score.numpy().ravel()
    c_ex = example_index[c_win]
    null = np.full(n_ex, np.inf)
    cls = np.asarray(start_logits, dtype=np.float32)[:, 0].astype(np.float64) + \
        np.asarray(end_logits, dtype=np.float32)[:, 0].astype(np.float64)
    np.minimum.at(null, example_index, cls)
    if version_2 and nbest_size > 0:  # the null answer competes in the n-best list as the empty span
        has = np.isfinite(null)
        c_ex = np.concatenate([c_ex, np.flatnonzero(has)])
        c_win = np.concatenate([c_win, np.full(has.sum(), -1)])
        c_s = np.concatenate([c_s, np.full(has.sum(), -1)])
        c_e = np.concatenate([c_e, np.full(has.sum(), -1)])
        c_score = np.concatenate([c_score, null[has]])
    order = np.lexsort((c_win, -c_score, c_ex))  # by example, best score first, earlier window on ties
    c_score, c_win, c_s, c_e, c_ex = c_score[order], c_win[order], c_s[order], c_e[order], c_ex[order]
    first = np.flatnonzero(np.r_[True, c_ex[1:] != c_ex[:-1]])
    rank = np.arange(len(c_ex)) - np.repeat(first, np.diff(np.r_[first, len(c_ex)]))
    # character spans of every candidate (the null answer has none)
    span = c_win >= 0
    a = np.where(span, offsets[np.maximum(c_win, 0), np.maximum(c_s, 0), 0], -1)
    b = np.where(span, offsets[np.maximum(c_win, 0), np.maximum(c_e, 0), 1], -1)

    # each example's best real span: its first finite, non-null candidate in sorted order
    cand = np.flatnonzero(span & np.isfinite(c_score))
    _, first_span = np.unique(c_ex[cand], return_index=True)
    best_pos = np.full(n_ex, -1)
    best_pos[c_ex[cand[first_span]]] = cand[first_span]
    best_score = np.where(best_pos >= 0, c_score[np.maximum(best_pos, 0)], -np.inf)
    diff = np.where(np.isfinite(best_score), null - best_score, np.inf)
    answered = (best_pos >= 0) & ~(version_2 & (diff > null_threshold))
    ids = [ex.id for ex in examples]
    a_l, b_l = a.tolist(), b.tolist()
    predictions = {i: "" for i in ids}
    for j in np.flatnonzero(answered).tolist():
        p = int(best_pos[j])
        predictions[ids[j]] = examples[j].context[a_l[p] : b_l[p]]
    null_odds = dict(zip(ids, diff.tolist()))

    nbest: dict[str, list[dict]] = {}
    if nbest_size > 0:
        sel = np.flatnonzero((rank < nbest_size) & np.isfinite(c_score))
        ex_sel, sc_sel = c_ex[sel], c_score[sel]
        groups = np.flatnonzero(np.r_[True, ex_sel[1:] != ex_sel[:-1]])
        shifted = np.exp(sc_sel - np.repeat(np.maximum.reduceat(sc_sel, groups), np.diff(np.r_[groups, len(sel)])))
        prob = shifted / np.repeat(np.add.reduceat(shifted, groups), np.diff(np.r_[groups, len(sel)]))
        nbest = {i: [] for i in ids}
        for j, x, y, sc, pr in zip(ex_sel.tolist(), a[sel].tolist(), b[sel].tolist(), sc_sel.tolist(),
                                   prob.tolist()):
            nbest[ids[j]].append({"text": examples[j].context[x:y] if x >= 0 else "", "start": x, "end": y,
                                  "score": sc, "probability": pr})
    return Decoded(predictions, null_odds, nbest)
