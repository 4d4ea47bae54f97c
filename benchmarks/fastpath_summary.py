"""Today's training path against the fast one, from a finished ``benchmarks/fastpath.toml`` study (issue 27).

For each pair of arms (full fine-tuning, LoRA r=8) that differ only in the path (SDPA attention with dropout on the
attention maps and the LoRA input, against eager attention without those masks) and share their seeds: test F1 per
seed, the mean paired difference (fast - today) with its 95% t interval over seeds, validation F1 at each
learning-curve step, the final training loss and windows/s (each run's own, so only comparable when the runs
shared the machine alike).

    python benchmarks/fastpath_summary.py studies-out/fastpath [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from _table import markdown_table  # sibling module: scripts run as python benchmarks/x.py
from scipy import stats

PAIRS = [("full", "full-today", "full-fast"), ("LoRA r=8", "lora-today", "lora-fast")]


def runs_by_arm(directory: Path) -> dict[str, dict[int, dict]]:
    """run.json of every finished run, by arm (the store's names) and seed."""
    import sqlite3

    db = sqlite3.connect(directory / "study.sqlite")
    out: dict[str, dict[int, dict]] = {}
    for arm, output_dir in db.execute("SELECT arm, output_dir FROM runs WHERE status='finished'"):
        path = Path(output_dir) if Path(output_dir).is_absolute() else directory / output_dir
        run = json.loads((path / "run.json").read_text())
        out.setdefault(arm, {})[run["seed"]] = run
    db.close()
    return out


def paired(today: dict[int, dict], fast: dict[int, dict]) -> dict:
    seeds = sorted(set(today) & set(fast))
    diff = np.array([fast[s]["metrics"]["f1"] - today[s]["metrics"]["f1"] for s in seeds])
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.nan

    def mean(runs, get):
        return float(np.mean([get(runs[s]) for s in seeds]))

    steps = [p["step"] for p in today[seeds[0]]["curve"]]
    return {"seeds": seeds, "difference": float(diff.mean()), "ci": [float(diff.mean() - half), float(diff.mean() + half)],
            **{f"{name}_test_f1": [runs[s]["metrics"]["f1"] for s in seeds] for name, runs in (("today", today),
                                                                                              ("fast", fast))},
            **{f"{name}_validation": {step: mean(runs, lambda r, k=k: r["curve"][k]["f1"]) for k, step in
                                      enumerate(steps)} for name, runs in (("today", today), ("fast", fast))},
            **{f"{name}_loss": mean(runs, lambda r: r["loss"]["final"]) for name, runs in (("today", today),
                                                                                         ("fast", fast))},
            **{f"{name}_windows_per_s": mean(runs, lambda r: r["timing"]["train_windows_per_s"])
               for name, runs in (("today", today), ("fast", fast))}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not (args.directory / "study.sqlite").is_file():
        print(f"error: {args.directory} holds no study (run qatune study benchmarks/fastpath.toml first)",
              file=sys.stderr)
        return 2
    arms = runs_by_arm(args.directory)
    results = {label: paired(arms[a], arms[b]) for label, a, b in PAIRS if a in arms and b in arms}
    rows = []
    for label, r in results.items():
        fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
        curve = lambda v: ", ".join(f"{f1:.1f}" for f1 in v.values())  # noqa: E731
        rows.append([label, str(len(r["seeds"])), fmt(r["today_test_f1"]), fmt(r["fast_test_f1"]),
                     f"{r['difference']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]",
                     curve(r["today_validation"]), curve(r["fast_validation"]),
                     f"{r['today_loss']:.3f} / {r['fast_loss']:.3f}",
                     f"{r['today_windows_per_s']:.2f} / {r['fast_windows_per_s']:.2f}"])
    steps = ", ".join(str(s) for s in next(iter(results.values()))["today_validation"]) if results else ""
    markdown_table(["method", "seeds", "test F1 today", "test F1 fast", "fast - today (95% t, paired)",
                    f"validation F1 today (steps {steps})", "validation F1 fast", "final loss today / fast",
                    "windows/s today / fast"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
