"""`qatune report DIR`: report.md, report.html and figures for a study directory."""

from __future__ import annotations

import argparse

from qatune.cli.common import emit


def add(sub) -> None:
    rp = sub.add_parser("report", help="write report.md, report.html and figures for a study directory")
    rp.add_argument("study_dir")
    rp.add_argument("--all-runs", action="store_true",
                    help="include rows of earlier versions of the study file (default: its latest grid only)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=report)


def report(args: argparse.Namespace) -> None:
    from qatune.report.write import write_report

    result = write_report(args.study_dir, all_runs=args.all_runs)
    lines = [f"wrote {result['report']} and {result['html']}", *[f"  {f}" for f in result["figures"]]]
    lines += [f"  {c['label']} ({int(c['train_questions'])} q, {len(c['seeds'])} seed(s)): F1 {c['f1']['mean']:.2f} "
              f"[{c['f1']['ci_low']:.2f}, {c['f1']['ci_high']:.2f}]" for c in result["configurations"]]
    emit(result, args.json, lines)
