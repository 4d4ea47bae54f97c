"""Statistics for reports: contrasts between configurations with seeds and articles as sampled units, Holm's
correction, the Pareto front.

A study's scores vary for three reasons: which training seed a run had, which articles the evaluation questions
came from, and which questions of those articles were drawn. :func:`contrast` estimates a linear combination of
configuration means (a difference, an interaction) with a variance made of two parts:

* **seeds**: each configuration's run means (over the shared questions) vary from seed to seed; their unbiased
  variance (n - 1) over n runs, with n - 1 degrees of freedom, as Welch's t-test on run means has it;
* **questions, clustered by article**: the per-question contrast (seeds averaged) is resampled in thought by
  article, the cluster-robust (CR1) variance of its mean with (articles - 1) degrees of freedom; the run-to-run
  noise of single questions, already inside the seed part, is subtracted once so that it is not counted twice.

The interval is t-based with the Welch-Satterthwaite degrees of freedom of the sum, and never narrower than the seed
part's own t interval (Welch's t interval on the run means): at three seeds the small-sample
uncertainty of the seed variance is carried into the interval. Its coverage is measured by simulation in
``benchmarks/bench_coverage.py`` (and guarded by ``tests/test_stats.py``). With one seed per configuration the seed
part cannot be estimated and the interval covers question sampling only (the report says so).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
P_FLOOR = 1e-4  # p-values below this are printed as a bound


@dataclass(frozen=True)
class Contrast:
    """A linear combination of configuration means with its t interval and two-sided p-value."""

    estimate: float
    ci_low: float
    ci_high: float
    p: float
    questions: int
    seeds: tuple[int, ...]  # seeds per cell
    articles: int  # clusters of the question part (0: questions taken as independent)
    df: float  # degrees of freedom of the interval's t quantile
    se: float
    seed_share: float  # share of the variance that comes from the seeds
    p_holm: float | None = None  # adjusted over its family of claims, where the report has one

    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds)}


def _codes(groups: Sequence | None, n: int) -> np.ndarray:
    """Cluster index of each question: its article, or itself when articles are not known or only one is there."""
    if groups is not None:
        codes = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
        if codes.max(initial=0) >= 1:
            return codes
    return np.arange(n)


@dataclass(frozen=True)
class _Parts:
    estimate: float
    seed_var: np.ndarray  # per cell: w^2 s^2 / n (0 with one seed)
    seed_df: np.ndarray  # per cell: n - 1
    question_cov: np.ndarray  # (cells, cells) cluster-robust covariance of the cells' question means
    noise: np.ndarray  # per cell: the run-to-run noise of single questions inside question_cov (also in seed_var)
    clusters: int


def _parts(cells: list[np.ndarray], groups: Sequence | None) -> _Parts:
    n_q = cells[0].shape[1]
    codes = _codes(groups, n_q)
    k = int(codes.max()) + 1
    means = np.stack([c.mean(axis=0) for c in cells], axis=1)  # (questions, cells): seeds averaged
    dev = means - means.mean(axis=0)
    sums = np.stack([np.bincount(codes, dev[:, j], minlength=k) for j in range(len(cells))], axis=1)
    cov = k / (k - 1) * sums.T @ sums / n_q**2 if k > 1 else np.zeros((len(cells), len(cells)))
    seed_var, seed_df, noise = np.zeros(len(cells)), np.zeros(len(cells)), np.zeros(len(cells))
    for j, c in enumerate(cells):
        n = c.shape[0]
        if n < 2:
            continue
        seed_var[j] = c.mean(axis=1).var(ddof=1) / n
        seed_df[j] = n - 1
        resid = c - c.mean(axis=1, keepdims=True) - c.mean(axis=0, keepdims=True) + c.mean()
        noise[j] = (resid**2).sum() / ((n - 1) * max(n_q - 1, 1)) / (n * n_q)
    return _Parts(0.0, seed_var, seed_df, cov, noise, k)


def _t_p(estimate: float, var: float, df: float) -> float:
    if var <= 0:
        return 1.0 if estimate == 0 else 0.0
    return float(2 * stats.t.sf(abs(estimate) / np.sqrt(var), df))


def contrast(cells: Sequence[np.ndarray], weights: Sequence[float], groups: Sequence | None = None,
             level: float = LEVEL) -> Contrast:
    """``sum_c weights[c] * mean(cells[c])`` with its interval and p-value (see the module docstring).

    Each cell is a (seeds, questions) score matrix; every cell has the same questions in the same order, and
    ``groups`` gives each question's article (None: questions are independent). The p-value agrees with the
    interval: p < 1 - level exactly when the interval excludes zero.
    """
    cells = [np.atleast_2d(np.asarray(c, dtype=float)) for c in cells]
    n_q = cells[0].shape[1]
    if any(c.shape[1] != n_q for c in cells) or n_q == 0:
        raise ValueError("every cell needs the same, non-empty set of questions")
    w = np.asarray(weights, dtype=float)
    parts = _parts(cells, groups)
    estimate = float(sum(wj * c.mean() for wj, c in zip(w, cells)))
    vs_cells = w**2 * parts.seed_var
    vs = float(vs_cells.sum())
    raw = float(w @ parts.question_cov @ w)
    vq = max(raw - float(w**2 @ parts.noise), 0.0)
    # the noise removed was estimated precisely, so what is left keeps the raw estimate's absolute error: fewer df
    dq = max(parts.clusters - 1, 1) * (vq / raw) ** 2 if raw > 0 else 1.0
    seeded = parts.seed_df > 0
    df_s = vs**2 / float((vs_cells[seeded] ** 2 / parts.seed_df[seeded]).sum()) if vs > 0 else np.inf
    total = vs + vq
    df = total**2 / ((vs**2 / df_s if vs > 0 else 0.0) + (vq**2 / dq if vq > 0 else 0.0)) if total > 0 else np.inf
    # never narrower than Welch's t interval on the run means (the seed part alone)
    candidates = [(total, df), (vs, df_s)]
    tail = (1 + level) / 2
    half = max(stats.t.ppf(tail, d) * np.sqrt(v) for v, d in candidates if v > 0) if total > 0 else 0.0
    p = max(_t_p(estimate, v, d) for v, d in candidates if v > 0) if total > 0 else _t_p(estimate, 0.0, 1.0)
    return Contrast(estimate, estimate - float(half), estimate + float(half), p, n_q,
                    tuple(c.shape[0] for c in cells), parts.clusters if parts.clusters < n_q else 0, float(df),
                    float(np.sqrt(total)), vs / total if total > 0 else 0.0)


def equality_test(cells: Sequence[np.ndarray], groups: Sequence | None = None) -> float:
    """p-value of "these configurations score alike", from (seeds, questions) matrices on shared questions: the
    smallest p of the pairwise :func:`contrast` differences, Bonferroni-adjusted over the pairs (two
    configurations: their difference's p)."""
    cells = [np.atleast_2d(np.asarray(c, dtype=float)) for c in cells]
    pairs = list(itertools.combinations(range(len(cells)), 2))
    smallest = min(contrast([cells[i], cells[j]], [1.0, -1.0], groups).p for i, j in pairs)
    return float(min(1.0, len(pairs) * smallest))


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
