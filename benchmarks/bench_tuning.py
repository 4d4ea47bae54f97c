"""What successive halving saved in a finished tuned study, against the full grid of the same candidates.

Reads a study directory (``qatune study FILE`` with a ``[tune]`` table, finished) and prints, per tuned
configuration: the candidates, the rungs, the training windows its candidates trained (each to the last rung it
reached; the choice is made at the first rung that leaves one candidate, else at the last) against the grid's
(every candidate to the end), their ratio, and the chosen value with its validation F1 per rung; then the whole
study's training windows (candidates + the chosen values' final runs, one fresh run per seed) with halving and with
the grid. Seconds are estimated from each configuration's measured seconds per step (its finished final runs): a
grid study was not run, so the time column is a projection, the windows are exact counts.

    python benchmarks/bench_tuning.py studies-out/offline [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

from qatune.study import store, tuningstate  # noqa: E402


def summarize(directory: Path) -> dict:
    db = store.connect(directory)
    rows = store.rows(db)
    chosen = tuningstate.decisions(db)
    db.close()
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["grp"]:
            groups.setdefault(r["grp"], []).append(r)
    out, total_halving, total_grid = [], 0, 0
    for grp, members in groups.items():
        cfg = members[0]["config"]
        per_step = cfg["batch_size"] * cfg["grad_accum"]
        full = cfg["max_steps"] or max((r["total_steps"] or 0 for r in rows if r["arm"] == members[0]["arm"]),
                                       default=0)  # given in epochs: the steps its runs reported
        reached = [max((s["step"] for s in r["scores"] or []), default=0) for r in members]
        finals = [r for r in rows if not r["grp"] and r["arm"] == members[0]["arm"]
                  and {k: v for k, v in r["point"].items() if k != "seed"}
                  == {k: v for k, v in members[0]["point"].items() if k != "seed"} | (chosen.get(grp) or {})]
        finished = [r for r in [*members, *finals] if r["status"] == "finished" and r["costs"]]
        # a finished run trained all its steps (train_s counts every attempt); candidates never finish
        s_per_step = sum(r["costs"]["train_s"] for r in finished) / (len(finished) * full) if finished else None
        halving = sum(reached) * per_step
        grid = len(members) * full * per_step
        final_windows = len(finals) * full * per_step
        total_halving += halving + final_windows
        total_grid += grid + final_windows
        winner = next((r for r in members if r["stage"] in ("winner", "chosen")), None)  # chosen: earlier versions
        tuned = {k for k in members[0]["point"] if len({repr(r["point"].get(k)) for r in members}) > 1}
        out.append({"configuration": grp, "arm": members[0]["arm"],
                    "point": {k: v for k, v in members[0]["point"].items() if k != "seed" and k not in tuned},
                    "candidates": len(members), "rungs": sorted({s["step"] for r in members for s in r["scores"] or []}),
                    "halving_windows": halving, "grid_windows": grid, "ratio": halving / grid,
                    "s_per_step": s_per_step,
                    "halving_s": s_per_step * halving / per_step if s_per_step else None,
                    "grid_s": s_per_step * grid / per_step if s_per_step else None,
                    "chosen": chosen.get(grp), "final_runs": len(finals),
                    "chosen_rungs": [round(s["f1"], 2) for s in winner["scores"]] if winner else None})
    return {"configurations": out, "study_windows_halving": total_halving, "study_windows_grid": total_grid,
            "study_ratio": total_halving / total_grid if total_grid else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = summarize(args.directory)
    if not result["configurations"]:
        sys.exit(f"{args.directory}: no tuned configurations (a study with a [tune] table)")
    lines = []
    for c in result["configurations"]:
        point = ", ".join(f"{k}={v}" for k, v in c["point"].items()) or "-"
        chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (c["chosen"] or {}).items())
        lines.append([c["arm"], point, str(c["candidates"]), "/".join(map(str, c["rungs"])),
                      f"{c['halving_windows']:,}", f"{c['grid_windows']:,}", f"{c['ratio']:.2f}",
                      f"{c['halving_s'] / 60:.1f}" if c["halving_s"] else "-",
                      f"{c['grid_s'] / 60:.1f}" if c["grid_s"] else "-", chosen or "-",
                      " -> ".join(map(str, c["chosen_rungs"] or [])) or "-"])
    markdown_table(["arm", "configuration", "candidates", "rungs", "windows (halving)", "windows (grid)", "ratio",
                    "min (halving)", "min (grid, est.)", "chosen", "its validation F1 by rung"], lines, left=2)
    print(f"\nwhole study (candidates + final runs at every seed): {result['study_windows_halving']:,} training "
          f"windows with halving, {result['study_windows_grid']:,} with the grid: ratio {result['study_ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
