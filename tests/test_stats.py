"""Statistics: the two-level bootstrap against scipy, permutation tests' calibration, Holm's adjustment."""

import numpy as np
import pytest
from scipy import stats

from qatune.stats import bootstrap_contrast, equality_test, holm, smallest_p


def test_one_seed_bootstrap_is_scipys_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(400)
    b = np.clip(a - 0.05 + rng.normal(scale=0.2, size=400), 0, 1)
    ours = bootstrap_contrast([a[None], b[None]], [1.0, -1.0], n_resamples=20000, seed=3)
    ref = stats.bootstrap((a - b,), np.mean, method="percentile", n_resamples=20000, rng=7).confidence_interval
    assert ours.estimate == pytest.approx((a - b).mean())
    assert ours.ci_low == pytest.approx(ref.low, abs=0.004) and ours.ci_high == pytest.approx(ref.high, abs=0.004)
    assert ours.excludes_zero() and ours.p < 0.01 and ours.seeds == (1, 1)


def test_seeds_widen_the_interval_beyond_question_resampling():
    """Runs that differ by a seed effect (whole-run offsets): resampling the seeds must show it; averaging the
    seeds first and resampling questions alone cannot."""
    rng = np.random.default_rng(1)
    q = rng.random(300)
    a = np.stack([q + off for off in (-0.15, 0.0, 0.15)])  # 3 seeds, run-to-run spread
    b = np.stack([q - 0.02 + off for off in (0.1, -0.1, 0.0)])
    both = bootstrap_contrast([a, b], [1.0, -1.0])
    questions_only = bootstrap_contrast([a.mean(0, keepdims=True), b.mean(0, keepdims=True)], [1.0, -1.0])
    assert both.estimate == pytest.approx(questions_only.estimate)
    assert both.ci_high - both.ci_low > 5 * (questions_only.ci_high - questions_only.ci_low)
    assert questions_only.excludes_zero() and not both.excludes_zero()  # the seeds make the difference uncertain


def test_p_value_agrees_with_the_interval():
    rng = np.random.default_rng(2)
    for shift in (0.0, 0.03, 0.06, 0.1):
        a = rng.random((2, 200))
        c = bootstrap_contrast([a + shift, a + rng.normal(scale=0.1, size=a.shape)], [1.0, -1.0], seed=4)
        assert (c.p < 0.05) == c.excludes_zero() or abs(c.p - 0.05) < 0.01


def test_equality_test_is_calibrated_and_detects_a_difference():
    rng = np.random.default_rng(3)
    nulls = [equality_test([rng.normal(size=(1, 150)) for _ in range(3)], n_resamples=300, seed=k)[0]
             for k in range(20)]
    assert sum(p < 0.05 for p in nulls) <= 4  # about 1 in 20 under the null
    shifted = [rng.normal(size=(1, 300)) for _ in range(3)]
    shifted[2] += 0.5
    p, method = equality_test(shifted, n_resamples=300)
    assert p < 0.01 and "within each question" in method
    runs = [rng.normal(size=(3, 50)) + k for k in range(3)]  # three seeds: whole runs are permuted
    p, method = equality_test(runs)
    assert method == "runs permuted between configurations" and p < 0.01


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_the_smallest_p_of_the_run_level_test_is_that_of_perfectly_separated_runs():
    """Two configurations with 3 runs each: 20 ways to split 6 runs, the observed split and its mirror are the most
    extreme, so p >= 2/20 whatever the data; equality_test on separated runs reaches exactly that floor."""
    assert smallest_p([3, 3]) == pytest.approx(0.1)
    assert smallest_p([2, 2]) == pytest.approx(2 / 6)
    assert smallest_p([5, 5]) == pytest.approx(2 / 252)
    separated = [np.full((3, 4), 0.1), np.full((3, 4), 0.9)]
    separated[0][0, 0] = 0.2  # runs differ a little within each configuration
    assert equality_test(separated)[0] == pytest.approx(smallest_p([3, 3]))
