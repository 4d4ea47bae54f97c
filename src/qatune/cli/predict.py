"""`qatune predict`: answer one question about a text, or every line of a JSONL file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qatune.cli.common import MODEL_HELP, CliError, emit, read_text
from qatune.data.squad import kind, text_problem
from qatune.errors import check_writable


def add(sub) -> None:
    r = sub.add_parser("predict", help="answer a question about a text with a trained model")
    r.add_argument("--model", required=True, help=MODEL_HELP)
    r.add_argument("--question")
    r.add_argument("--context")
    r.add_argument("--context-file", help="UTF-8 text file holding the context")
    r.add_argument("--input", help="JSONL file of {id?, question, context} records (batch form)")
    r.add_argument("--output", help="batch form: write JSONL answers here instead of printing")
    r.add_argument("--top-k", type=int, default=1, help="answers per question, best first (default 1)")
    r.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=predict)


def predict(args: argparse.Namespace) -> None:
    from qatune.answer.inference import Reader

    if args.top_k < 1:
        raise CliError(f"--top-k must be >= 1 (answers per question), got {args.top_k}")
    if args.input:
        given = [flag for flag, value in (("--question", args.question), ("--context", args.context),
                                          ("--context-file", args.context_file)) if value is not None]
        if given:
            raise CliError(f"{' and '.join(given)} with --input: give one question (--question with --context or "
                           f"--context-file) or a file of them (--input), not both")
        if args.output:
            check_writable(args.output, "--output", directory=False, inputs=(args.input,))
        _predict_batch(args)
        return
    if args.output:
        raise CliError("--output goes with --input (the batch form); one answer is printed")
    if args.question is None or (args.context is None) == (args.context_file is None):
        raise CliError("give --question and exactly one of --context / --context-file (or --input FILE.jsonl)")
    context = args.context if args.context is not None else read_text(args.context_file, "context file")
    given = {"--question": args.question, "--context" if args.context is not None else args.context_file: context}
    for name in given:
        if problem := text_problem(given, name):
            raise CliError(f"{name} {problem}")
    answers = Reader.load(args.model, device=args.device).answer(args.question, context, args.top_k)
    lines = [f"{k + 1}. {a['text']!r}  (p={a['probability']:.3f}, chars {a['start']}-{a['end']})"
             for k, a in enumerate(answers)] or ["(no answer)"]
    emit({"question": args.question, "answers": answers}, args.json, lines)


def batch_item(line: str) -> tuple[str, str, str | None]:
    """(question, context, id) of one JSONL line; ValueError saying what is wrong with it."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object with 'question' and 'context', got {kind(rec)}")
    for key in ("question", "context"):
        if problem := text_problem(rec, key):
            raise ValueError(f"{key!r}: {problem}")
    rid = rec.get("id")
    if rid is not None and not isinstance(rid, str | int):
        raise ValueError(f"'id' must be a string or an integer, got {kind(rid)}")
    return rec["question"], rec["context"], None if rid is None else str(rid)


def _predict_batch(args: argparse.Namespace) -> None:
    """Answer every good line of a JSONL file; report each bad line by number, then exit 2 if there was one."""
    from qatune.answer.inference import Reader
    from qatune.errors import QatuneError

    text = read_text(args.input, "JSONL input")
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise CliError(f"{args.input}: no questions (the file is empty); one JSON object per line: "
                       f'{{"id": "1", "question": "...", "context": "..."}}')
    good, errors, ids = [], [], {}
    for n, line in numbered:
        try:
            question, context, rid = batch_item(line)
        except ValueError as e:
            errors.append((n, str(e)))
            continue
        rid = rid or str(n)  # without an id, a line is named by its number
        if rid in ids:
            errors.append((n, f"id {rid!r} is also line {ids[rid]}'s id; give every line its own id (a line "
                              f"without one is named by its line number)"))
            continue
        ids[rid] = n
        good.append((n, question, context, rid))
    answers: dict[int, list[dict]] = {}
    if good:
        reader = Reader.load(args.model, device=args.device)
        try:
            answers = dict(zip((g[0] for g in good), reader.answer_many([(q, c) for _, q, c, _ in good], args.top_k)))
        except QatuneError:  # one question does not fit: answer them one by one to find it
            for n, q, c, _ in good:
                try:
                    answers[n] = reader.answer(q, c, args.top_k)
                except QatuneError as e:
                    errors.append((n, str(e)))
    lines = [json.dumps({"id": rid, "answers": answers[n]}, ensure_ascii=False)
             for n, _, _, rid in good if n in answers]
    if args.output:
        Path(args.output).write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        print(f"{len(lines)} answers -> {args.output}")
    elif lines:
        print("\n".join(lines))
    for n, message in sorted(errors):
        print(f"error: {args.input}, line {n}: {message}", file=sys.stderr)
    if errors:
        raise CliError(f"{args.input}: {len(errors)} of {len(numbered)} line(s) not answered (listed above); "
                       f"the other {len(lines)} were")
