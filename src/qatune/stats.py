"""Statistics for reports: intervals that resample seeds and questions, permutation tests, Holm's correction.

A study's scores vary for two reasons: which evaluation questions were drawn, and which training seed a run
had. :func:`bootstrap_contrast` resamples both (a two-level bootstrap): questions are shared by every cell of
a comparison (paired), seeds are drawn independently within each configuration. With one seed per cell it is
the ordinary paired bootstrap over questions. Everything scipy can do (permutation tests) is done by scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
N_BOOT = 10000
N_PERM = 9999


@dataclass(frozen=True)
class Contrast:
    """A linear combination of configuration means with its percentile interval and two-sided p-value."""

    estimate: float
    ci_low: float
    ci_high: float
    p: float
    questions: int
    seeds: tuple[int, ...]  # seeds per cell

    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds)}


def _counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Bootstrap weights: for each of ``rows`` resamples, how often each of ``n`` items was drawn, over n."""
    idx = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n) / n


def bootstrap_contrast(cells: Sequence[np.ndarray], weights: Sequence[float], n_resamples: int = N_BOOT,
                       seed: int = 0, level: float = LEVEL, chunk: int = 250) -> Contrast:
    """Two-level bootstrap of ``sum_c weights[c] * mean(cells[c])``.

    Each cell is a (seeds, questions) score matrix; every cell has the same questions in the same order. One
    resample draws the questions once for all cells (paired) and each cell's seeds on their own, so the
    interval covers both question sampling and run-to-run variation. The p-value is the two-sided bootstrap
    one (twice the smaller tail beyond zero), so p < 1 - level exactly when the interval excludes zero.
    """
    cells = [np.atleast_2d(np.asarray(c, dtype=float)) for c in cells]
    n_q = cells[0].shape[1]
    if any(c.shape[1] != n_q for c in cells) or n_q == 0:
        raise ValueError("every cell needs the same, non-empty set of questions")
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        q = _counts(rng, b, n_q)
        total = np.zeros(b)
        for w, c in zip(weights, cells):
            s = _counts(rng, b, c.shape[0])
            total += w * np.einsum("bs,bs->b", s, q @ c.T)
        boots.append(total)
    boot = np.concatenate(boots)
    tail = (1 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail])
    below, above = int((boot <= 0).sum()), int((boot >= 0).sum())
    p = min(1.0, (2 * min(below, above) + 1) / (n_resamples + 1))
    estimate = float(sum(w * c.mean() for w, c in zip(weights, cells)))
    return Contrast(estimate, float(lo), float(hi), p, n_q, tuple(c.shape[0] for c in cells))


def _spread(*samples, axis=-1):
    """Range of the sample means: large when one configuration differs from the others."""
    means = np.stack([np.mean(s, axis=axis) for s in samples], axis=0)
    return np.ptp(means, axis=0)


def equality_test(cells: Sequence[np.ndarray], n_resamples: int = N_PERM, seed: int = 0) -> tuple[float, str]:
    """p-value of "these configurations score alike" and the method used, from (seeds, questions) matrices.

    With one seed per configuration the configurations are permuted within each question (scipy, paired
    samples): this covers question sampling only. With at least two seeds everywhere whole runs are permuted
    between configurations (their mean over the questions), which covers run-to-run variation; a run-level
    test with one seed could never reject, so it is not used then.
    """
    cells = [np.atleast_2d(np.asarray(c, dtype=float)) for c in cells]
    rng = np.random.default_rng(seed)
    if min(c.shape[0] for c in cells) >= 2:
        runs = [c.mean(axis=1) for c in cells]
        res = stats.permutation_test(runs, _spread, permutation_type="independent", vectorized=True,
                                     n_resamples=n_resamples, alternative="greater", rng=rng)
        return float(res.pvalue), "runs permuted between configurations"
    cols = [c.mean(axis=0) for c in cells]
    res = stats.permutation_test(cols, _spread, permutation_type="samples", vectorized=True,
                                 n_resamples=n_resamples, alternative="greater", rng=rng)
    return float(res.pvalue), "configurations permuted within each question"


def smallest_p(runs_per_configuration: Sequence[int], n_resamples: int = N_PERM) -> float:
    """The smallest p-value the run-level test of :func:`equality_test` can give with these numbers of runs (that of
    perfectly separated configurations): with 3 runs each for two configurations it is 0.1, so no such test can
    reject at the 5% level however large the difference."""
    apart = [np.arange(n, dtype=float) + 1e6 * k for k, n in enumerate(runs_per_configuration)]
    res = stats.permutation_test(apart, _spread, permutation_type="independent", vectorized=True,
                                 n_resamples=n_resamples, alternative="greater", rng=np.random.default_rng(0))
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: controls the chance of any false claim in the family at the level."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return [float(x) for x in out]


def pareto_front(costs: list[float], scores: list[float]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher score), cheapest first."""
    front, best = [], -np.inf
    for i in sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i])):
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front
