"""The `qatune` command line: a thin layer over the Python API.

Every command prints a human-readable summary; with ``--json`` the last line printed is one JSON object,
so scripts can read the result with ``tail -n 1``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qatune.data import SquadDataError, load_squad


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _read_json_mapping(path: str, what: str, value_type: type | tuple[type, ...]) -> dict:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CliError(f"{path}: {what} file not found") from e
    except json.JSONDecodeError as e:
        raise CliError(f"{path}: {what} file is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(obj, dict):
        raise CliError(f"{path}: {what} must be a JSON object {{question_id: value}}, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, value_type) or isinstance(v, bool)]
    if bad:
        raise CliError(f"{path}: {what} for question {bad[0]!r} has the wrong type "
                       f"({type(obj[bad[0]]).__name__}); {len(bad)} such entries")
    return obj


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    for line in lines:
        print(line)
    if as_json:
        print(json.dumps(result, sort_keys=True))


def cmd_score(args: argparse.Namespace) -> None:
    from qatune.metrics import squad_v1, squad_v2

    data = load_squad(args.data)
    preds = _read_json_mapping(args.predictions, "predictions", str)
    refs = data.references()
    unknown = len(set(preds) - set(refs))
    if data.version.startswith("2"):
        na = _read_json_mapping(args.na_probs, "na-probs", (int, float)) if args.na_probs else None
        result = squad_v2(refs, preds, na_probs=na, na_prob_thresh=args.na_prob_thresh)
    else:
        result = squad_v1(refs, preds)
    result = {**result, "version": data.version, "unknown_ids": unknown}
    lines = [f"{data.source}: SQuAD v{data.version}, {len(refs)} questions, {len(preds)} predictions"
             + (f" ({unknown} ids not in the data, ignored)" if unknown else "")]
    lines += [f"  {k:>18}: {v:.4f}" if isinstance(v, float) else f"  {k:>18}: {v}" for k, v in result.items()
              if k not in ("version", "unknown_ids")]
    _emit(result, args.json, lines)


def cmd_data_check(args: argparse.Namespace) -> None:
    from qatune.check import check_data
    from qatune.models import load_tokenizer

    data = load_squad(args.path, repair=args.repair_answers)
    tok = load_tokenizer(args.tokenizer)
    r = check_data(data, tok, args.max_seq_length, args.doc_stride)
    lines = [
        f"{r['source']}: SQuAD v{r['version']} - OK",
        f"  articles {r['articles']}, paragraphs {r['paragraphs']}, questions {r['questions']}, "
        f"answers {r['answers']}, unanswerable {r['unanswerable']}"
        + (f", repaired answers {r['repaired_answers']}" if r["repaired_answers"] else ""),
        f"  windows at {r['max_seq_length']}/{r['doc_stride']}: {r['windows']} "
        f"({r['windows_per_question_mean']:.3f} per question, max {r['windows_per_question_max']})",
        f"  tokens per window: mean {r['tokens_per_window_mean']:.1f}, p50 {r['tokens_per_window_p50']:.0f}, "
        f"p95 {r['tokens_per_window_p95']:.0f}, max {r['tokens_per_window_max']}",
        f"  span-recovery ceiling: EM {r['ceiling_exact_match']:.2f}, F1 {r['ceiling_f1']:.2f}",
    ]
    _emit(r, args.json, lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qatune", description="Fine-tune and compare extractive QA models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score predictions with the official SQuAD v1.1/v2.0 metric")
    s.add_argument("--data", required=True, help="SQuAD JSON file (v1.1 or v2.0) or datasets id[:split]")
    s.add_argument("--predictions", required=True, help="official predictions JSON {question_id: answer_text}")
    s.add_argument("--na-probs", help="v2.0 only: JSON {question_id: probability of no answer}")
    s.add_argument("--na-prob-thresh", type=float, default=1.0, help="v2.0: threshold on --na-probs (default 1.0)")
    s.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    s.set_defaults(func=cmd_score)

    d = sub.add_parser("data", help="inspect data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="validate a SQuAD file; counts, window statistics, span-recovery ceiling")
    c.add_argument("path", help="SQuAD JSON file or datasets id[:split]")
    c.add_argument("--tokenizer", required=True, help="tokenizer: hub id, local directory or alias (minilm-l6)")
    c.add_argument("--max-seq-length", type=int, default=384)
    c.add_argument("--doc-stride", type=int, default=128, help="overlap between windows in tokens")
    c.add_argument("--repair-answers", action="store_true",
                   help="move answers whose text is not at answer_start to the nearest occurrence")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_data_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qatune.features import FeatureError
    from qatune.models import ModelError

    try:
        args.func(args)
    except (CliError, SquadDataError, FeatureError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
