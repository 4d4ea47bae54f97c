"""SQuAD v1.1 and v2.0 evaluation metrics, computed offline.

Scores reported for SQuAD are only comparable with published numbers if they come
from the exact rules of the official evaluation scripts (``evaluate-v1.1.py`` and
``evaluate-v2.0.py``).  This module reimplements those rules without any download,
and keeps every quirk that changes a number:

* normalisation lower-cases, drops ASCII punctuation only (``string.punctuation``),
  drops the whole words ``a``/``an``/``the`` and collapses whitespace, in that order;
* v1.1 token F1 is 0 when the normalised texts share no token, even if both are
  empty; v2.0 token F1 is 1 when both are empty (an empty answer is how a model
  says "no answer") and 0 when only one is;
* v2.0 ignores gold answers that normalise to nothing and falls back to ``[""]``;
* averages are summed in reference order with plain float addition so results
  agree with the official scripts to the last bit, not just approximately.

Per-question scores are exposed (``squad_v1_scores``/``squad_v2_scores``) so that
callers can run paired tests such as a bootstrap over questions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "normalize_answer",
    "exact_match",
    "token_f1",
    "token_f1_v2",
    "squad_v1_scores",
    "squad_v1",
    "squad_v2_scores",
    "squad_v2",
    "squad_references",
]

# ASCII only, as in the official scripts: curly quotes, dashes etc. survive.
_PUNCTUATION = frozenset(string.punctuation)
# ``str`` patterns are Unicode-aware in Python 3, so ``\b`` treats accented letters
# as word characters exactly like the official ``re.UNICODE`` pattern does.
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Canonicalise an answer string the way the official SQuAD scripts do.

    Steps (order matters, e.g. ``"the's"`` loses its apostrophe *before* the
    article check and so stays ``"thes"``): lower-case, delete ASCII punctuation,
    replace whole-word ``a``/``an``/``the`` by a space, collapse all whitespace
    runs (including Unicode spaces) to single spaces and strip the ends.
    """
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _overlap_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1; 0 when nothing overlaps (covers the all-empty case).

    A token repeated in both strings counts ``min(count_pred, count_gold)`` times
    (multiset intersection).  The arithmetic mirrors the official expression
    ``(2 * p * r) / (p + r)`` operation by operation so floats agree bit-for-bit.
    """
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if both strings normalise to the same text, else 0.0 (v1.1 and v2.0 agree)."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 with SQuAD v1.1 semantics.

    Two strings that both normalise to nothing score 0, not 1: v1.1 has no
    "no answer" notion, so an empty prediction never earns credit.
    """
    return _overlap_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def token_f1_v2(prediction: str, gold: str) -> float:
    """Token-overlap F1 with SQuAD v2.0 semantics.

    In v2.0 an empty answer means "unanswerable", so when either side normalises
    to no tokens the score is 1 if both are empty (correct abstention) and 0
    otherwise.  Everything else is identical to :func:`token_f1`.
    """
    return _overlap_f1_v2(normalize_answer(prediction).split(), normalize_answer(gold).split())


def _overlap_f1_v2(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """:func:`_overlap_f1` plus the v2.0 rule that two empty answers agree."""
    if not pred_tokens or not gold_tokens:
        return float(list(pred_tokens) == list(gold_tokens))
    return _overlap_f1(pred_tokens, gold_tokens)


def _max_over_golds(
    prediction: str, gold_norms: Sequence[str], f1_fn: Callable[[Sequence[str], Sequence[str]], float]
) -> tuple[float, float]:
    """Best EM and best F1 over already-normalised gold answers (maximised separately).

    Normalising each string once instead of once per comparison is only a speed-up:
    normalisation is deterministic, so the numbers are those of the official scripts.
    """
    pred_norm = normalize_answer(prediction)
    pred_tokens = pred_norm.split()
    em = max(float(pred_norm == gold) for gold in gold_norms)
    f1 = max(f1_fn(pred_tokens, gold.split()) for gold in gold_norms)
    return em, f1


def _check_golds(qid: str, golds: Sequence[str]) -> None:
    """Reject a bare string, which would otherwise be iterated as one gold per character."""
    if isinstance(golds, str):
        raise TypeError(f"references[{qid!r}] must be a list of answer texts, not a single string")


def _mean_percent(values: Iterable[float], total: int) -> float:
    """``100 * sum / total`` with the official scripts' left-to-right float sum."""
    return 100.0 * sum(values) / total


# --------------------------------------------------------------------------- v1.1


def squad_v1_scores(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> dict[str, tuple[float, float]]:
    """Per-question ``(exact_match, f1)`` in ``[0, 1]`` with SQuAD v1.1 rules.

    Each score is the maximum over that question's gold answers, because any of
    the annotators' spans is an acceptable answer.  Questions without a
    prediction score ``(0.0, 0.0)`` (the official script counts them as wrong),
    so the result has one entry per reference question, in reference order.
    Predictions for ids that are not in ``references`` are ignored.
    """
    scores: dict[str, tuple[float, float]] = {}
    for qid, golds in references.items():
        _check_golds(qid, golds)
        if len(golds) == 0:
            raise ValueError(
                f"question {qid!r} has no gold answer; SQuAD v1.1 needs at least one "
                "(use squad_v2 for unanswerable questions)"
            )
        if qid not in predictions:
            scores[qid] = (0.0, 0.0)
            continue
        scores[qid] = _max_over_golds(predictions[qid], [normalize_answer(g) for g in golds], _overlap_f1)
    return scores


def squad_v1(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, Any]:
    """Corpus-level SQuAD v1.1 scores, identical to ``evaluate-v1.1.py``.

    Returns ``exact_match`` and ``f1`` as percentages averaged over *all*
    reference questions (a missing prediction drags the average down rather
    than being skipped), plus ``total`` (number of reference questions) and
    ``missing`` (how many of them had no prediction).
    """
    if not references:
        raise ValueError("references is empty; nothing to evaluate")
    scores = squad_v1_scores(references, predictions)
    total = len(scores)
    return {
        "exact_match": _mean_percent((em for em, _ in scores.values()), total),
        "f1": _mean_percent((f1 for _, f1 in scores.values()), total),
        "total": total,
        "missing": sum(1 for qid in references if qid not in predictions),
    }


# --------------------------------------------------------------------------- v2.0


def _v2_raw_scores(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> dict[str, tuple[float, float]]:
    """Unthresholded v2.0 ``(exact, f1)`` for every question that has a prediction.

    Gold answers that normalise to the empty string are dropped (they carry no
    tokens to match); if none remain the only correct answer is ``""``, which is
    also how unanswerable questions (empty reference list) are scored.  As in the
    official script, questions without a prediction are left out entirely.
    """
    raw: dict[str, tuple[float, float]] = {}
    for qid, golds in references.items():
        _check_golds(qid, golds)
        if qid not in predictions:
            continue
        usable = [norm for norm in map(normalize_answer, golds) if norm] or [""]
        raw[qid] = _max_over_golds(predictions[qid], usable, _overlap_f1_v2)
    return raw


def _resolve_na_probs(
    raw: Mapping[str, tuple[float, float]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None,
) -> Mapping[str, float]:
    """Return no-answer probabilities covering every scored question.

    Without a file the official script uses 0.0 for every prediction, which
    means "never override the predicted text" for any threshold >= 0.
    """
    if na_probs is None:
        return dict.fromkeys(predictions, 0.0)
    absent = [qid for qid in raw if qid not in na_probs]
    if absent:
        raise KeyError(f"na_probs has no entry for {len(absent)} predicted question(s), e.g. {absent[0]!r}")
    return na_probs


def _threshold_scores(
    raw: Mapping[str, tuple[float, float]],
    has_answer: Mapping[str, bool],
    na_probs: Mapping[str, float],
    na_prob_thresh: float,
) -> dict[str, tuple[float, float]]:
    """Apply the abstention rule: ``na_prob > thresh`` turns the answer into "no answer".

    An abstention is fully right (1, 1) on an unanswerable question and fully
    wrong (0, 0) on an answerable one, whatever text was predicted.
    """
    out: dict[str, tuple[float, float]] = {}
    for qid, pair in raw.items():
        if na_probs[qid] > na_prob_thresh:
            value = float(not has_answer[qid])
            out[qid] = (value, value)
        else:
            out[qid] = pair
    return out


def _best_threshold(
    scores: Mapping[str, float],
    has_answer: Mapping[str, bool],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float],
) -> tuple[float, float]:
    """Best achievable score over no-answer thresholds, and the threshold reaching it.

    Start from "abstain on everything" (every unanswerable question right), then
    switch questions to "answer" in increasing ``na_prob`` order: an answerable
    question gains its raw score, an unanswerable one loses 1 if the *raw*
    predicted string is non-empty (even ``"."``, which normalises to empty).
    Like the official script this keeps a stable sort (ties stay in ``na_probs``
    order) and may stop inside a run of tied probabilities, so the order of
    ``na_probs`` can matter when probabilities repeat.
    """
    cur_score: float = sum(1 for qid in scores if not has_answer[qid])
    best_score = cur_score
    ordered = sorted((qid for qid in na_probs if qid in scores), key=lambda qid: na_probs[qid])
    # "abstain on everything" needs a threshold below every na_prob: the official script starts at 0.0, made for
    # probabilities; null-score differences (a run's null odds) can be negative, and then it starts below them
    lowest = na_probs[ordered[0]] if ordered else 0.0
    best_thresh = 0.0 if lowest >= 0.0 else lowest - 1.0
    for qid in ordered:
        if has_answer[qid]:
            diff: float = scores[qid]
        else:
            diff = -1 if predictions[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), float(best_thresh)


def squad_v2_scores(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, tuple[float, float]]:
    """Per-question ``(exact, f1)`` in ``[0, 1]`` with SQuAD v2.0 rules.

    ``references`` maps each id to its gold texts; an empty list marks an
    unanswerable question, for which only an empty (after normalisation)
    prediction is correct.  The no-answer threshold is already applied, so the
    mean of these values times 100 equals ``squad_v2(...)["exact"/"f1"]``.
    Questions without a prediction are omitted, as the official script skips them.
    """
    raw = _v2_raw_scores(references, predictions)
    probs = _resolve_na_probs(raw, predictions, na_probs)
    has_answer = {qid: len(references[qid]) > 0 for qid in raw}
    return _threshold_scores(raw, has_answer, probs, na_prob_thresh)


def squad_v2(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, Any]:
    """Corpus-level SQuAD v2.0 scores, identical to ``evaluate-v2.0.py``.

    Keys, in the official order: ``exact``, ``f1``, ``total``; ``HasAns_*`` and
    ``NoAns_*`` (``exact``, ``f1``, ``total``) only when that category has
    questions; and, only when ``na_probs`` is given (the official script adds
    them only with ``--na-prob-file``), ``best_exact``, ``best_exact_thresh``,
    ``best_f1``, ``best_f1_thresh``.  ``missing`` is appended: the number of
    reference questions without a prediction.

    The official script skips unpredicted questions, so ``exact``/``f1``/``total``
    are over predicted questions only (then it crashes computing the
    breakdown).  Here every key is computed as the official script would on the
    references restricted to predicted questions, which gives the same
    ``exact``/``f1``/``total`` and a usable breakdown; with no missing
    predictions the result is exactly the official output.
    """
    raw = _v2_raw_scores(references, predictions)
    if not raw:
        raise ValueError("no reference question has a prediction; nothing to evaluate")
    probs = _resolve_na_probs(raw, predictions, na_probs)
    has_answer = {qid: len(references[qid]) > 0 for qid in raw}
    final = _threshold_scores(raw, has_answer, probs, na_prob_thresh)

    def summary(qids: Sequence[str]) -> dict[str, Any]:
        return {
            "exact": _mean_percent((final[q][0] for q in qids), len(qids)),
            "f1": _mean_percent((final[q][1] for q in qids), len(qids)),
            "total": len(qids),
        }

    result = summary(list(final))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        subset = [qid for qid in final if has_answer[qid] == wanted]
        if subset:
            result.update({f"{prefix}_{key}": value for key, value in summary(subset).items()})
    if na_probs is not None:
        best_exact, exact_thresh = _best_threshold(
            {q: em for q, (em, _) in raw.items()}, has_answer, predictions, probs
        )
        best_f1, f1_thresh = _best_threshold(
            {q: f1 for q, (_, f1) in raw.items()}, has_answer, predictions, probs
        )
        result["best_exact"] = best_exact
        result["best_exact_thresh"] = exact_thresh
        result["best_f1"] = best_f1
        result["best_f1_thresh"] = f1_thresh
    result["missing"] = sum(1 for qid in references if qid not in predictions)
    return result


def squad_references(dataset: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Extract ``{question_id: [gold answer texts]}`` from parsed SQuAD JSON.

    Accepts the whole file object (``{"version", "data": [...]}``) or its
    ``"data"`` list.  Unanswerable v2.0 questions have ``"answers": []`` and so
    map to an empty list, which is what :func:`squad_v2` expects.
    """
    articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
    return {
        qa["id"]: [answer["text"] for answer in qa["answers"]]
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    }
