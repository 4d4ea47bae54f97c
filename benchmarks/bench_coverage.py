"""Coverage of the report's 95% intervals, measured on simulated studies whose true contrasts are known.

Each simulated study scores configurations on 600 test questions from 12 articles (50 each), with the seeds per
configuration, the seed SD (in F1 points) and article effects of the setting. A score is a sum of independent parts
(means the study wants to compare, and random effects with mean zero, so the truth is exactly the difference of
the means):

    F1[c, s, q] = mu[c] + article[a(q)] + article_c[c, a(q)] + question[q] + question_c[c, q] + seed[c, s] + noise

question SD 25 (shared by configurations), question_c 15 (how a configuration's difficulty differs), noise 25 (which
questions one run gets right), article 8 and article_c 5 when articles are on (0 when off), seed as the setting says.
For each study the benchmark computes, with the report's own functions (:mod:`qatune.report.stats`): the headline
difference of two configurations (interval coverage and median width), the interaction of a 2x2 (coverage), one
configuration's mean (the table's interval; coverage), and the rank test of three configurations with equal means
(false-positive rate at 5%). Goal: every setting's headline coverage within [0.92, 0.99].

    python benchmarks/bench_coverage.py [--studies 500] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

from qatune.report.stats import contrast, equality_test  # noqa: E402

ARTICLES, PER_ARTICLE = 12, 50
SD = {"question": 25.0, "question_c": 15.0, "noise": 25.0, "article": 8.0, "article_c": 5.0}
SEEDS, SEED_SDS = (3, 5), (0.0, 2.0, 5.0, 10.0)
GOAL = (0.92, 0.99)


def simulate(rng: np.random.Generator, mu: list[float], seeds: int, seed_sd: float, articles: bool) -> list[np.ndarray]:
    """One study: a (seeds, questions) F1 matrix per configuration of means ``mu``."""
    n = ARTICLES * PER_ARTICLE
    art = np.repeat(np.arange(ARTICLES), PER_ARTICLE)
    a_sd, ac_sd = (SD["article"], SD["article_c"]) if articles else (0.0, 0.0)
    shared = rng.normal(0, a_sd, ARTICLES)[art] + rng.normal(0, SD["question"], n)
    cells = []
    for m in mu:
        own = rng.normal(0, ac_sd, ARTICLES)[art] + rng.normal(0, SD["question_c"], n)
        runs = rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, SD["noise"], (seeds, n))
        cells.append(m + shared + own + runs)
    return cells


def measure(studies: int, seeds: int, seed_sd: float, articles: bool, seed: int = 0) -> dict:
    """Coverage and widths over ``studies`` simulated studies of one setting."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(ARTICLES), PER_ARTICLE)
    hit, width, inter, single, false_pos = [], [], [], [], []
    for _ in range(studies):
        a, b = simulate(rng, [40.0, 35.0], seeds, seed_sd, articles)
        c = contrast([a, b], [1.0, -1.0], groups)
        hit.append(c.ci_low <= 5.0 <= c.ci_high)
        width.append(c.ci_high - c.ci_low)
        one = contrast([a], [1.0], groups)
        single.append(one.ci_low <= 40.0 <= one.ci_high)
        four = simulate(rng, [40.0, 30.0, 20.0, 15.0], seeds, seed_sd, articles)  # interaction (40-30)-(20-15) = 5
        it = contrast(four, [1.0, -1.0, -1.0, 1.0], groups)
        inter.append(it.ci_low <= 5.0 <= it.ci_high)
        false_pos.append(equality_test(simulate(rng, [30.0, 30.0, 30.0], seeds, seed_sd, articles), groups) < 0.05)
    return {"coverage": float(np.mean(hit)), "width": float(np.median(width)), "interaction": float(np.mean(inter)),
            "single": float(np.mean(single)), "rank_false_positive": float(np.mean(false_pos))}


def setting_name(seeds: int, seed_sd: float, articles: bool) -> str:
    return f"seeds={seeds},sd={seed_sd:g},articles={'on' if articles else 'off'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=500, help="simulated studies per setting")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    results = {}
    for k, (seeds, sd, arts) in enumerate(itertools.product(SEEDS, SEED_SDS, (False, True))):
        results[setting_name(seeds, sd, arts)] = measure(args.studies, seeds, sd, arts, seed=k)
    rows = [[name, f"{r['coverage']:.3f}", f"{r['width']:.2f}", f"{r['interaction']:.3f}", f"{r['single']:.3f}",
             f"{r['rank_false_positive']:.3f}"] for name, r in results.items()]
    print(f"{args.studies} simulated studies per setting; 600 questions in {ARTICLES} articles; goal: headline "
          f"coverage in [{GOAL[0]}, {GOAL[1]}]")
    markdown_table(["setting", "headline coverage", "median width (F1)", "interaction coverage",
                    "one configuration coverage", "rank test false positives"], rows)
    met = all(GOAL[0] <= r["coverage"] <= GOAL[1] for r in results.values())
    print(f"goal {'met' if met else 'NOT met'} in every setting" if met else "goal NOT met: "
          + ", ".join(n for n, r in results.items() if not GOAL[0] <= r["coverage"] <= GOAL[1]))
    if args.json:
        print(json.dumps({"coverage": {n: r["coverage"] for n, r in results.items()},
                          "width": {n: r["width"] for n, r in results.items()},
                          "interaction": {n: r["interaction"] for n, r in results.items()},
                          "single": {n: r["single"] for n, r in results.items()},
                          "rank_false_positive": {n: r["rank_false_positive"] for n, r in results.items()}}))


if __name__ == "__main__":
    main()
