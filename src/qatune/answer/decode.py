"""Decoding: start/end logits of every window -> the best answer span per question, with an n-best list.

The search is the usual one (top-``n_best`` start tokens x top-``n_best`` end tokens of each window,
context tokens only, ``start <= end``, at most ``max_answer_length`` tokens, best over all windows of a
question) but done as array operations over all windows at once: a (windows, n, n) score grid, each
window's best candidates, then a sort of only the questions whose candidates come from several windows.
Only the final answers are touched in Python; the n-best lists stay arrays until a question is looked up.
SQuAD v2: the null score of a question is its smallest CLS score over windows; it answers "" when
``null - best_span > null_threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from qatune.data.squad import QAExample


@dataclass(frozen=True, eq=False)  # Mapping's equality: same ids, same lists
class NBest(Mapping):
    """The n-best candidates of every question, kept as arrays: rows ``bounds[j]:bounds[j + 1]`` are question
    ``j``'s, best first. Looking a question id up builds its list of dicts (text, start, end, score,
    probability; the v2 null answer has text "" and start = end = -1), so only lists that are used cost Python
    objects; ``dict(nbest)`` builds all of them (e.g. for writing ``nbest.json``)."""

    ids: list[str]
    contexts: list[str]
    bounds: np.ndarray  # (questions + 1,) row offsets
    start: np.ndarray  # character offsets into the context
    end: np.ndarray
    score: np.ndarray  # start + end logit, float64
    probability: np.ndarray  # softmax of the scores within the question's list

    @cached_property
    def _position(self) -> dict[str, int]:
        return {qid: j for j, qid in enumerate(self.ids)}

    def __getitem__(self, qid: str) -> list[dict]:
        j = self._position[qid]
        lo, hi = int(self.bounds[j]), int(self.bounds[j + 1])
        ctx = self.contexts[j]
        return [{"text": ctx[a:b] if a >= 0 else "", "start": a, "end": b, "score": s, "probability": p}
                for a, b, s, p in zip(self.start[lo:hi].tolist(), self.end[lo:hi].tolist(),
                                      self.score[lo:hi].tolist(), self.probability[lo:hi].tolist())]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Decoded:
    predictions: dict[str, str]  # official {id: answer text}
    null_odds: dict[str, float]  # null score - best span score (SQuAD v2 "na_probs"; -inf-safe)
    nbest: Mapping[str, list[dict]] = field(default_factory=dict)  # an NBest when asked for


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
    scores and softmax probabilities (the null answer included for v2). Equal scores: earlier window first.
    """
    n_win, width = offsets.shape[:2]
    n_ex = len(examples)
    example_index = np.asarray(example_index, dtype=np.int64)
    start = np.asarray(start_logits, dtype=np.float32)[:, :width]
    end = np.asarray(end_logits, dtype=np.float32)[:, :width]
    k = min(n_best, width)
    val, idx = _top_context_tokens(offsets, start, end, k)
    keep = max(1, min(nbest_size, k * k))
    c_score, c_s, c_e = _best_pairs(val, idx, keep, max_answer_length)

    # Candidates in window order, each window's best first, then grouped by example, best first.
    c_win = np.repeat(np.arange(n_win), keep)
    c_ex = example_index[c_win]
    order = np.argsort(c_ex, kind="stable")  # ~linear: windows normally come grouped by example
    blocks = np.bincount(example_index, minlength=n_ex)  # sorted candidate blocks (windows) per example
    merge = np.flatnonzero(blocks[c_ex[order]] > 1)  # only these examples mix several blocks
    if len(merge):
        sub = order[merge]
        order[merge] = sub[np.lexsort((-c_score[sub], c_ex[sub]))]  # stable: earlier window first on ties
    c_score, c_win, c_s, c_e, c_ex = c_score[order], c_win[order], c_s[order], c_e[order], c_ex[order]
    null = np.full(n_ex, np.inf)
    np.minimum.at(null, example_index, start[:, 0].astype(np.float64) + end[:, 0])
    if version_2 and nbest_size > 0:  # the null answer competes in the n-best list
        c_score, c_win, c_s, c_e, c_ex = _insert_nulls(null, c_score, c_win, c_s, c_e, c_ex)

    # each example's best real span: its first finite, non-null candidate in sorted order
    span = c_win >= 0
    cand = np.flatnonzero(span & np.isfinite(c_score))
    first = cand[np.r_[True, c_ex[cand][1:] != c_ex[cand][:-1]]] if len(cand) else cand
    best_pos = np.full(n_ex, -1)
    best_pos[c_ex[first]] = first
    best_score = np.where(best_pos >= 0, c_score[np.maximum(best_pos, 0)], -np.inf)
    diff = np.where(np.isfinite(best_score), null - best_score, np.inf)
    answered = np.flatnonzero((best_pos >= 0) & ~(version_2 & (diff > null_threshold)))
    ids = [ex.id for ex in examples]
    predictions = dict.fromkeys(ids, "")
    p = best_pos[answered]
    for j, a, b in zip(answered.tolist(), offsets[c_win[p], c_s[p], 0].tolist(), offsets[c_win[p], c_e[p], 1].tolist()):
        predictions[ids[j]] = examples[j].context[a:b]
    null_odds = dict(zip(ids, diff.tolist()))
    if nbest_size <= 0:
        return Decoded(predictions, null_odds)

    group_start = np.flatnonzero(np.r_[True, c_ex[1:] != c_ex[:-1]])
    rank = np.arange(len(c_ex)) - np.repeat(group_start, np.diff(np.r_[group_start, len(c_ex)]))
    sel = np.flatnonzero((rank < nbest_size) & np.isfinite(c_score))
    ex_sel, sc_sel, win_sel = c_ex[sel], c_score[sel], c_win[sel]
    counts = np.bincount(ex_sel, minlength=n_ex)
    heads = np.flatnonzero(np.r_[True, ex_sel[1:] != ex_sel[:-1]]) if len(sel) else sel
    sizes = np.diff(np.r_[heads, len(sel)])
    shifted = np.exp(sc_sel - np.repeat(sc_sel[heads], sizes))  # the head is each list's maximum
    prob = shifted / np.repeat(np.add.reduceat(shifted, heads), sizes) if len(sel) else shifted
    is_span = win_sel >= 0
    w = np.where(is_span, win_sel, 0)
    a = np.where(is_span, offsets[w, np.maximum(c_s[sel], 0), 0], -1)
    b = np.where(is_span, offsets[w, np.maximum(c_e[sel], 0), 1], -1)
    nbest = NBest(ids, [ex.context for ex in examples], np.r_[0, np.cumsum(counts)], a, b, sc_sel, prob)
    return Decoded(predictions, null_odds, nbest)


def _insert_nulls(null: np.ndarray, c_score, c_win, c_s, c_e, c_ex):
    """Put each example's null answer (window, start and end -1) into its best-first candidates, after those
    scoring at least as much. The candidates must be grouped by example in increasing order."""
    n_ex = len(null)
    has = np.isfinite(null)
    nulls_before = np.cumsum(has) - has  # shift from the null answers of earlier examples
    above = c_score >= null[c_ex]
    n_above = np.bincount(c_ex, weights=above, minlength=n_ex).astype(np.int64)
    head = np.searchsorted(c_ex, np.arange(n_ex))
    pos = np.arange(len(c_ex)) + nulls_before[c_ex] + (has[c_ex] & ~above)
    with_null = np.flatnonzero(has)
    null_pos = head[with_null] + nulls_before[with_null] + n_above[with_null]
    out = []
    for x, null_value in ((c_score, null[with_null]), (c_win, -1), (c_s, -1), (c_e, -1), (c_ex, with_null)):
        y = np.empty(len(x) + len(with_null), dtype=x.dtype)
        y[pos], y[null_pos] = x, null_value
        out.append(y)
    return out


def _top_context_tokens(offsets: np.ndarray, start: np.ndarray, end: np.ndarray, k: int):
    """Values (2, windows, k) float32 and token indices (2, windows, k) of each window's top-k start and end
    logits among its context tokens (-inf values where a window has fewer than k).

    Windows are ordered by their last context token and searched in buckets of 64 positions, so most of
    the padding is skipped; the masking and the reordering are one copy of the logits.
    """
    n_win, width = offsets.shape[:2]
    valid = offsets[:, :, 0] >= 0
    last = width - np.argmax(valid[:, ::-1], axis=1)  # one past the last context token
    bucket = np.minimum(width, np.maximum(k, -(-last // 64) * 64))
    perm = np.argsort(bucket, kind="stable")
    perm_t = torch.from_numpy(perm)
    outside = ~torch.from_numpy(valid)[perm_t]
    val = torch.empty((2, n_win, k), dtype=torch.float32)
    idx = torch.empty((2, n_win, k), dtype=torch.int64)
    b_sorted = bucket[perm]
    edges = np.flatnonzero(np.r_[True, b_sorted[1:] != b_sorted[:-1], True]).tolist()
    for i, x in enumerate((start, end)):
        logits = torch.from_numpy(np.ascontiguousarray(x))[perm_t].masked_fill_(outside, -math.inf)
        for lo, hi in zip(edges[:-1], edges[1:]):
            torch.topk(logits[lo:hi, : int(b_sorted[lo])], k, dim=1, sorted=False, out=(val[i, lo:hi], idx[i, lo:hi]))
    inverse = torch.from_numpy(np.argsort(perm))
    return val[:, inverse], idx[:, inverse]


def _best_pairs(val: torch.Tensor, idx: torch.Tensor, keep: int, max_answer_length: int):
    """Each window's ``keep`` best (start, end) pairs from its top-k starts x top-k ends, best first:
    exact float64 scores (-inf where fewer pairs are valid) and start/end token indices, each (windows * keep,).

    The grid is scored in float32. Rounding is monotonic, so float32 can only misorder pairs whose float32
    scores are equal; windows with such a tie among their ``keep + 1`` best are scored again in float64.
    """
    k = val.shape[2]
    kk = min(keep + 1, k * k)
    top_score, top = _grid_topk(val, idx, kk, max_answer_length)
    tied = ((top_score[:, 1:] == top_score[:, :-1]) & torch.isfinite(top_score[:, 1:])).any(dim=1)
    rows = torch.nonzero(tied).flatten()
    if len(rows):
        exact_score, exact_top = _grid_topk(val[:, rows].double(), idx[:, rows], kk, max_answer_length)
        top_score[rows], top[rows] = exact_score.float(), exact_top
    top, invalid = top[:, :keep], ~torch.isfinite(top_score[:, :keep])
    si, ei = torch.div(top, k, rounding_mode="floor"), top % k
    v = val.double()
    score = (v[0].gather(1, si) + v[1].gather(1, ei)).masked_fill_(invalid, -math.inf)
    return score.numpy().ravel(), idx[0].gather(1, si).numpy().ravel(), idx[1].gather(1, ei).numpy().ravel()


def _grid_topk(val: torch.Tensor, idx: torch.Tensor, kk: int, max_answer_length: int):
    """Best ``kk`` scores (sorted) and flat grid positions of every window's start x end grid."""
    n_win, k = val.shape[1:]
    small = idx.to(torch.int16)
    length = small[1][:, None, :] - small[0][:, :, None]
    ok = (length >= 0) & (length < max_answer_length)
    score = (val[0][:, :, None] + val[1][:, None, :]).masked_fill_(~ok, -math.inf).reshape(n_win, k * k)
    return torch.topk(score, kk, dim=1)
