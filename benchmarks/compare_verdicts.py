"""Two runs of one study, claim by claim: does the verdict hold?

Reads two ``qatune report DIR --json`` outputs (the last line of each file) and prints, for every claim of the
verdict (headline comparisons, factorial effects, rank tests), both runs' estimate, 95% interval and Holm p, and
flags a contradiction: both significant with opposite signs, or disjoint intervals with either significant. Also
lists each run's tuning choices. Exit 1 when any claim contradicts, 2 when a file is not a report's JSON.

    qatune report studies-out/offline-a --json > a.json
    qatune report studies-out/offline-b --json > b.json
    python benchmarks/compare_verdicts.py a.json b.json
"""

from __future__ import annotations

import json
import sys


def claims(report: dict) -> dict[str, dict]:
    """Every claim of a report's verdict by name: {diff, ci_low, ci_high, p, p_holm}."""
    out = {}
    for c in report["comparisons"]:
        out[f"headline {c['a_label']} - {c['b_label']}"] = c["f1"]
    for f in report["factorial"]:
        for model, c in f["strategy_effect"].items():
            out[f"full - LoRA on {model}"] = c
        for strategy, c in f["model_effect"].items():
            out[f"model effect with {strategy}"] = c
        out["interaction"] = f["interaction"]
    for t in report["tests"]["rank"]:
        out[f"rank {t['arm']} {t['ranks']}"] = {"diff": t["f1"][-1] - t["f1"][0], "ci_low": None, "ci_high": None,
                                                "p": t["p"], "p_holm": t["p_holm"]}
    return out


def significant(c: dict) -> bool:
    return (c["p_holm"] if c["p_holm"] is not None else c["p"]) < 0.05


def contradicts(x: dict, y: dict) -> bool:
    if significant(x) and significant(y) and (x["diff"] > 0) != (y["diff"] > 0):
        return True
    disjoint = x["ci_low"] is not None and (x["ci_low"] > y["ci_high"] or y["ci_low"] > x["ci_high"])
    return disjoint and (significant(x) or significant(y))


def describe(c: dict) -> str:
    ci = f" [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]" if c["ci_low"] is not None else ""
    holm = "" if c["p_holm"] is None else f" Holm p {c['p_holm']:.4f}"
    return f"{c['diff']:+.2f}{ci} p {c['p']:.4f}{holm}"


def read(path: str) -> tuple[dict, dict[str, dict]]:
    """A report's JSON (the last line of ``path``) and its claims; exit 2 saying what to do when it is not one."""
    try:
        lines = open(path, encoding="utf-8").read().strip().splitlines()
        report = json.loads(lines[-1]) if lines else None
        return report, claims(report)
    except OSError as e:
        why = f"cannot read it ({e.strerror or e})"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = (f"its last line is not the JSON of `qatune report DIR --json` ({type(e).__name__}: {e}); write it "
               f"with `qatune report DIR --json > {path}`")
    print(f"error: {path}: {why}", file=sys.stderr)
    raise SystemExit(2)  # 1 means a contradiction


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    (a, ca), (b, cb) = read(sys.argv[1]), read(sys.argv[2])
    bad = 0
    for name in dict.fromkeys([*ca, *cb]):
        x, y = ca.get(name), cb.get(name)
        if x is None or y is None:
            print(f"{name}: only in {'B' if x is None else 'A'}")
            continue
        flag = contradicts(x, y)
        bad += flag
        verdict = "CONTRADICTS" if flag else ("differs in significance" if significant(x) != significant(y)
                                               else "same")
        print(f"{name}: A {describe(x)} | B {describe(y)} -> {verdict}")
    for label, r in (("A", a), ("B", b)):
        print(f"tuning {label}: " + "; ".join(
            f"{t['arm']} {t['point'].get('lora_rank', '')}: {t['chosen']} (separable: {t.get('separable')})".replace(
                "  ", " ") for t in r["tuning"]))
    print(f"contradictions: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
