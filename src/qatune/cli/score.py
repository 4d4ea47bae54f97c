"""`qatune score` (the official SQuAD metric on a predictions file) and `qatune data check`."""

from __future__ import annotations

import argparse
import math

from qatune.cli.common import CliError, emit, read_json_mapping
from qatune.data.squad import load_squad


def add(sub) -> None:
    s = sub.add_parser("score", help="score predictions with the official SQuAD v1.1/v2.0 metric")
    s.add_argument("--data", required=True, help="SQuAD JSON file (v1.1 or v2.0) or datasets id[:split]")
    s.add_argument("--predictions", required=True, help="official predictions JSON {question_id: answer_text}")
    s.add_argument("--na-probs", help="v2.0 only: JSON {question_id: probability of no answer}")
    s.add_argument("--na-prob-thresh", type=float, default=1.0, help="v2.0: threshold on --na-probs (default 1.0)")
    s.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    s.set_defaults(func=score)

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
    c.set_defaults(func=data_check)


def score(args: argparse.Namespace) -> None:
    from qatune.answer.metrics import squad_v1, squad_v2

    data = load_squad(args.data)
    preds = read_json_mapping(args.predictions, "predictions", str)
    refs = data.references()
    unknown = len(set(preds) - set(refs))
    if data.version.startswith("2"):
        na = read_json_mapping(args.na_probs, "na-probs", (int, float)) if args.na_probs else None
        if not math.isfinite(args.na_prob_thresh):
            raise CliError(f"--na-prob-thresh must be a finite number, got {args.na_prob_thresh}")
        if na is not None and (absent := sorted(set(preds) & set(refs) - set(na))):
            raise CliError(f"{args.na_probs}: no entry for {len(absent)} predicted question(s), e.g. {absent[0]!r}; "
                           f"give a value for every question in --predictions")
        result = squad_v2(refs, preds, na_probs=na, na_prob_thresh=args.na_prob_thresh)
    else:
        if args.na_probs:
            raise CliError(f"--na-probs is for SQuAD v2.0 data; {args.data} is v{data.version}")
        result = squad_v1(refs, preds)
    result = {**result, "version": data.version, "unknown_ids": unknown}
    lines = [f"{data.source}: SQuAD v{data.version}, {len(refs)} questions, {len(preds)} predictions"
             + (f" ({unknown} ids not in the data, ignored)" if unknown else "")]
    lines += [f"  {k:>18}: {v:.4f}" if isinstance(v, float) else f"  {k:>18}: {v}" for k, v in result.items()
              if k not in ("version", "unknown_ids")]
    emit(result, args.json, lines)


def data_check(args: argparse.Namespace) -> None:
    from qatune.answer.check import check_data
    from qatune.model.load import load_tokenizer

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
    emit(r, args.json, lines)
