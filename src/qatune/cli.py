"""The `qatune` command line: each command parses its flags, calls the Python API and prints what it returned.

Every command prints a human-readable summary; with ``--json`` the last line printed is one JSON object,
so scripts can read the result with ``tail -n 1``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from qatune.data import load_squad
from qatune.errors import QatuneError, read_json, unreadable


class CliError(QatuneError):
    """A user error: printed without a traceback, exit status 2."""


def _read_json_mapping(path: str, what: str, value_type: type | tuple[type, ...]) -> dict:
    obj = read_json(path, what)
    if not isinstance(obj, dict):
        raise CliError(f"{path}: {what} must be a JSON object {{question_id: value}}, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, value_type) or isinstance(v, bool)
           or isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise CliError(f"{path}: {what} for question {bad[0]!r} is {obj[bad[0]]!r}, not a "
                       f"{'string' if value_type is str else 'finite number'}; {len(bad)} such entries")
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


def count_or_fraction(text: str) -> int | float:
    """'500' -> 500 questions, '0.25' -> a quarter of them."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a question count or a fraction, got {text!r}") from e


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per config field (help from the field), defaulting to "not given" so --config can fill in."""
    import typing
    from dataclasses import MISSING, fields

    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = hints[f.name]
        default = f.default if f.default is not MISSING else None
        kw: dict = {"default": argparse.SUPPRESS, "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif t == (list[str] | None):
            parser.add_argument(flag, nargs="+", **kw)
        elif t == (int | float | None):
            parser.add_argument(flag, type=count_or_fraction, **kw)
        else:
            base = next((a for a in typing.get_args(t) if a is not type(None)), t)
            parser.add_argument(flag, type=base, **kw)


def load_toml(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise CliError(f"{path}: config file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(path, "config file", e, "give a UTF-8 TOML file") from e
    except tomllib.TOMLDecodeError as e:
        raise CliError(f"{path}: not valid TOML: {e}") from e


def cmd_train(args: argparse.Namespace) -> None:
    from qatune.config import TrainConfig
    from qatune.train import stop_on_signals, train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "json", "debug")}
    values = {**(load_toml(args.config) if args.config else {}), **given}
    cfg = TrainConfig.from_dict(values)
    if not cfg.train_data:
        raise CliError("--train-data is required (a SQuAD JSON file or a datasets id[:split])")
    from qatune import tracking

    tracking.check(cfg.report_to)
    with stop_on_signals():
        r = train(cfg)
    if r is None:  # a non-zero rank of a data-parallel run: rank 0 reports
        return
    if cfg.report_to == "mlflow":
        print(f"mlflow run {tracking.log_training_run(r, Path(cfg.output_dir))} at "
              f"{tracking.tracking_uri(Path(cfg.output_dir))}")
    m, p, t = r.metrics, r.params, r.timing
    lines = [f"{cfg.output_dir}: {cfg.strategy} fine-tuning of {cfg.model}, {r.data['train_questions']} questions "
             f"({r.data['train_windows']} windows), {t['steps_run']} steps",
             f"  parameters: {p['trainable_params']:,} trainable of {p['total_params']:,} "
             f"({p['trainable_percent']:.2f}%)",
             f"  train {t['train_s']:.1f}s ({(t['train_windows_per_s'] or 0):.1f} windows/s), eval {t['eval_s']:.1f}s, "
             f"peak RSS {r.memory['peak_rss_mb']:.0f} MB"]
    if m:
        key = "exact_match" if "exact_match" in m else "exact"
        lines.append(f"  eval: EM {m[key]:.2f}, F1 {m['f1']:.2f} on {m['questions']} questions")
    _emit({"output_dir": cfg.output_dir, **m, **p, **t}, args.json, lines)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from qatune.data import load_split
    from qatune.inference import Reader
    from qatune.rundir import write_evaluation

    overrides = {k: getattr(args, k) for k in ("max_seq_length", "doc_stride", "batch_size", "null_threshold")
                 if getattr(args, k) is not None}
    data = load_split(args.data, args.split, args.articles, args.questions, args.seed, args.repair_answers)
    reader = Reader.load(args.model, device=args.device, precision=args.precision, **overrides)
    metrics, decoded = reader.evaluate(data, progress=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_evaluation(out, metrics, decoded, data.version.startswith("2"))
    _emit(metrics, args.json, [f"{args.model} on {data.source} ({len(data)} questions): "
                               f"EM {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f} -> {out}"])


def _read_text(path: str, what: str) -> str:
    from qatune.errors import unreadable

    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(path, what, e, "give a UTF-8 text file") from e


def _batch_item(line: str) -> tuple[str, str, str | None]:
    """(question, context, id) of one JSONL line; ValueError saying what is wrong with it."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object with 'question' and 'context', got {type(rec).__name__}")
    for key in ("question", "context"):
        if key not in rec:
            raise ValueError(f"missing {key!r}")
        if not isinstance(rec[key], str):
            raise ValueError(f"{key!r} must be a string, got {type(rec[key]).__name__} {rec[key]!r:.40}")
        if not rec[key].strip():
            raise ValueError(f"{key!r} is empty")
    rid = rec.get("id")
    if rid is not None and not isinstance(rid, str | int):
        raise ValueError(f"'id' must be a string or an integer, got {type(rid).__name__}")
    return rec["question"], rec["context"], None if rid is None else str(rid)


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise CliError(f"--top-k must be >= 1 (answers per question), got {top_k}")


def cmd_predict(args: argparse.Namespace) -> None:
    from qatune.inference import Reader

    _check_top_k(args.top_k)
    if args.input:
        _predict_batch(args)
        return
    if args.question is None or (args.context is None) == (args.context_file is None):
        raise CliError("give --question and exactly one of --context / --context-file (or --input FILE.jsonl)")
    if not args.question.strip():
        raise CliError("--question is empty")
    context = args.context if args.context is not None else _read_text(args.context_file, "context file")
    if not context.strip():
        raise CliError("the context is empty")
    answers = Reader.load(args.model, device=args.device).answer(args.question, context, args.top_k)
    lines = [f"{k + 1}. {a['text']!r}  (p={a['probability']:.3f}, chars {a['start']}-{a['end']})"
             for k, a in enumerate(answers)] or ["(no answer)"]
    _emit({"question": args.question, "answers": answers}, args.json, lines)


def _predict_batch(args: argparse.Namespace) -> None:
    """Answer every good line of a JSONL file; report each bad line by number, then exit 2 if there was one."""
    from qatune.errors import QatuneError
    from qatune.inference import Reader

    text = _read_text(args.input, "JSONL input")
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise CliError(f"{args.input}: no questions (the file is empty); one JSON object per line: "
                       f'{{"id": "1", "question": "...", "context": "..."}}')
    good, errors = [], []
    for n, line in numbered:
        try:
            good.append((n, *_batch_item(line)))
        except ValueError as e:
            errors.append((n, str(e)))
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
    lines = [json.dumps({"id": rid or str(n), "answers": answers[n]}, ensure_ascii=False)
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


def cmd_export(args: argparse.Namespace) -> None:
    from qatune.export import export

    r = export(args.model, args.output_dir, args.format, args.quantize)
    what = args.format + (f" {args.quantize}" if args.quantize else "")
    _emit(r, args.json, [f"exported {args.model} -> {args.output_dir} ({what}, {r['size_bytes'] / 2**20:.1f} MiB)",
                         f"  parity probe: {r['parity_measure']} {r['parity_value']:.2e} (tolerance {r['tolerance']:.0e}; "
                         f"largest single difference {r['max_abs_logit_diff']:.2e})"])


def cmd_serve(args: argparse.Namespace) -> None:
    from qatune.serve import serve

    serve(args.model, args.host, args.port, device=args.device, threads=args.threads,
          max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_body_bytes=args.max_body_bytes,
          max_context_chars=args.max_context_chars)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in body]


def cmd_study(args: argparse.Namespace) -> None:
    from qatune.study import StudyError, load_study, run_study

    try:
        study = load_study(args.file, args.set or [], args.dir)
    except StudyError as e:
        raise CliError(str(e)) from e
    from qatune.launch import LaunchError, check_settings, make_launcher

    try:  # launcher settings are checked first, whatever the mode
        check_settings(args.workers, args.runs_per_gpu, args.threads)
    except LaunchError as e:
        raise CliError(str(e)) from e
    if args.max_attempts < 1:
        raise CliError(f"--max-attempts must be >= 1, got {args.max_attempts}")
    if args.calibrate and not args.dry_run:
        raise CliError("--calibrate only goes with --dry-run (it times steps and projects; it trains nothing)")
    if sum(map(bool, (args.dry_run, args.status, args.rebuild_db))) > 1:
        raise CliError("choose one of --dry-run, --status and --rebuild-db")
    if args.rebuild_db:
        from qatune.study import rebuild_store

        r = rebuild_store(study)
        _emit(r, args.json, [f"{study.directory / 'study.sqlite'}: rebuilt from the run directories: "
                             f"{r['finished']} finished, {r['pending']} pending"
                             + (f" (the old file is {r['set_aside']})" if r["set_aside"] else "")])
        return
    if args.dry_run:
        _study_dry_run(study, args)
        return
    if args.status:
        _study_status(study, args.json)
        return
    try:
        launcher = make_launcher(args.launcher, args.workers, args.runs_per_gpu, args.threads, args.ray_address)
    except LaunchError as e:
        raise CliError(str(e)) from e
    print(f"study {study.name}: {len(study.runs)} runs -> {study.directory}; {launcher.name} launcher, "
          f"{len(launcher.slots)} at a time ({launcher.slots[0].describe()}{', ...' if len(launcher.slots) > 1 else ''})",
          flush=True)
    counts = run_study(study, launcher, max_attempts=args.max_attempts, retry_failed=args.retry_failed)
    lines = [f"study {study.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
             + f" -> {study.directory} (qatune report {study.directory})"]
    _emit({"directory": str(study.directory), **counts}, args.json, lines)
    if counts.get("failed"):
        from qatune.store import connect, rows

        db = connect(study.directory)
        for row in rows(db, [r.id for r in study.runs]):
            if row["status"] == "failed":
                print(f"  failed: {row['id']} ({row['arm']}): {(row['error'] or '?').strip().splitlines()[-1][:200]}",
                      file=sys.stderr)
        db.close()
        raise CliError(f"{counts['failed']} run(s) failed after {args.max_attempts} attempt(s); their errors: "
                       f"qatune study {args.file} --status. Fix the cause, then rerun with --retry-failed")


def _study_dry_run(study, args: argparse.Namespace) -> None:
    from qatune.study import RUN_OVERHEAD_S, estimate, project, rank_note

    body, total, run_notes = [], 0.0, []
    for k, r in enumerate(study.runs, 1):
        est = estimate(r)
        total += est["train_pflop"]
        point = ", ".join(f"{key}={v}" for key, v in r.point.items())
        run_notes.append(rank_note(est, r.config.lora_rank) if r.config.strategy == "lora" else "")
        point += " ‡" if run_notes[-1] else ""
        body.append([k, r.id, r.arm, r.config.model, r.config.strategy, point,
                     f"{est['trainable_params']:,}", f"{est['total_params']:,}", f"{est['trainable_percent']:.2f}",
                     f"{est['train_windows']:,.0f}", f"{est['steps']:,}", f"{est['train_pflop']:.2f}"])
    header = ["#", "run", "arm", "model", "strategy", "grid point", "trainable", "total", "%", "train windows",
              "steps", "train PFLOP"]
    summary = {"runs": len(study.runs), "total_pflop": total}
    capped = sorted({n for n in run_notes if n})
    notes = [*(f"‡ {n}" for n in capped), f"total training compute: {total:.2f} PFLOP (FLOPs per window counted on each model shape at the "
             f"typical padded width, x windows trained; windows estimated from question counts)"]
    if args.calibrate:
        from qatune.launch import LocalLauncher, visible_gpus

        gpus = visible_gpus() if args.launcher == "local" else []
        if args.launcher == "local":
            slots = LocalLauncher(args.workers, args.runs_per_gpu, args.threads).slots
            n, threads = len(slots), slots[0].threads
        else:  # a cluster's size is not known before it is reached: project for the given slots
            n, threads = args.workers or 1, args.threads or 1
        proj = project(study, n, threads, args.runs_per_gpu if gpus else 1, "cuda" if gpus else "cpu")
        for row, p in zip(body, proj["per_run"]):
            row += [f"{p['s_per_step']:.2f}", _hours(p["projected_s"])]
        header += ["s/step", "projected"]
        where = (f"{len(gpus)} GPU(s) x {args.runs_per_gpu} runs per GPU" if gpus
                 else f"{n} worker(s) x {threads} CPU thread(s)")
        notes.append(f"projected on this machine ({where}): {proj['projected_hours']:.2f} h for the whole study "
                     f"({proj['serial_hours']:.2f} h of runs; each run = {RUN_OVERHEAD_S:.0f} s start-up + steps x "
                     f"measured s/step + evaluation at 1/3 of a step per window)")
        summary.update({k: proj[k] for k in ("projected_hours", "serial_hours", "slots", "threads",
                                             "runs_per_device", "device")})
        summary["per_run"] = [{"id": p["id"], "arm": p["arm"], "steps": p["steps"], "s_per_step": p["s_per_step"],
                               "projected_s": p["projected_s"]} for p in proj["per_run"]]
    lines = [f"study {study.name}: {len(study.runs)} runs -> {study.directory}", *_table(header, body), *notes]
    _emit(summary, args.json, lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _study_status(study, as_json: bool) -> None:
    from qatune.store import connect, rows
    from qatune.store import exists as store_exists

    by_id = {}
    if store_exists(study.directory):  # a study not started yet: nothing to create for a look
        db = connect(study.directory)
        by_id = {r["id"]: r for r in rows(db)}
        db.close()
    body, runs = [], []
    for k, r in enumerate(study.runs, 1):
        row = by_id.get(r.id, {})
        m = row.get("metrics") or {}
        em = m.get("exact_match", m.get("exact"))
        status = row.get("status", "not started")
        where = ""
        if status == "running":
            step = f"step {row.get('step') or 0}/{row.get('total_steps') or '?'}"
            where = f"{step} on {row.get('worker') or '?'} [{row.get('owner') or ''}]"
        elif status in ("failed", "pending") and row.get("error"):
            where = row["error"].strip().splitlines()[0][:100]
        point = ", ".join(f"{key}={v}" for key, v in r.point.items())
        body.append([k, r.id, r.arm, point, status, row.get("attempts", 0), f"{em:.2f}" if em is not None else "",
                     f"{m['f1']:.2f}" if "f1" in m else "",
                     f"{(row.get('costs') or {}).get('train_s', 0):.0f}" if row.get("costs") else "", where])
        runs.append({"id": r.id, "arm": r.arm, "status": status, "attempts": row.get("attempts", 0),
                     "step": row.get("step"), "total_steps": row.get("total_steps"), "worker": row.get("worker")})
    counts: dict[str, int] = {}
    for b in body:
        counts[b[4]] = counts.get(b[4], 0) + 1
    _emit({"runs": len(body), **counts, "per_run": runs}, as_json,
          _table(["#", "run", "arm", "grid point", "status", "tries", "EM", "F1", "train s", "progress / error"],
                 body) + [", ".join(f"{v} {k}" for k, v in counts.items())])


def cmd_report(args: argparse.Namespace) -> None:
    from qatune.report import write_report

    result = write_report(args.study_dir, all_runs=args.all_runs)
    lines = [f"wrote {result['report']} and {result['html']}", *[f"  {f}" for f in result["figures"]]]
    lines += [f"  {c['label']} ({int(c['train_questions'])} q, {c['seeds']} seed(s)): F1 {c['f1']['mean']:.2f} "
              f"[{c['f1']['ci_low']:.2f}, {c['f1']['ci_high']:.2f}]" for c in result["configurations"]]
    _emit(result, args.json, lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qatune", description="Fine-tune and compare extractive QA models.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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

    from qatune.config import TrainConfig

    t = sub.add_parser("train", help="fine-tune a model (full or LoRA) and evaluate it",
                       description="Every option can also come from a TOML file (--config); flags override it.")
    t.add_argument("--config", help="TOML file with training options (keys as the flags, with underscores)")
    add_dataclass_args(t, TrainConfig)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)

    model_help = "a run directory (train's --output-dir), a model directory or an export directory"
    e = sub.add_parser("evaluate", help="evaluate a saved model, LoRA adapter or export on SQuAD data")
    e.add_argument("--model", required=True, help=model_help)
    e.add_argument("--data", required=True, help="SQuAD JSON file or datasets id[:split]")
    e.add_argument("--split", default="validation")
    e.add_argument("--articles", help="1-based article ranges, e.g. 37-48")
    e.add_argument("--questions", type=count_or_fraction, help="question count or fraction")
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--repair-answers", action="store_true")
    e.add_argument("--output-dir", required=True)
    e.add_argument("--max-seq-length", type=int, help="default: as saved with the model")
    e.add_argument("--doc-stride", type=int, help="default: as saved with the model")
    e.add_argument("--batch-size", type=int, help="windows per forward pass (default: as saved with the model)")
    e.add_argument("--precision", help="auto | fp32 | bf16 | fp16 (default: as saved; auto = bf16 on a GPU that has "
                                       "it, fp32 on the CPU)")
    e.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the best available)")
    e.add_argument("--null-threshold", type=float, help="SQuAD v2 (default: the one the run tuned and saved)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="answer a question about a text with a trained model")
    r.add_argument("--model", required=True, help=model_help)
    r.add_argument("--question")
    r.add_argument("--context")
    r.add_argument("--context-file", help="UTF-8 text file holding the context")
    r.add_argument("--input", help="JSONL file of {id?, question, context} records (batch form)")
    r.add_argument("--output", help="batch form: write JSONL answers here instead of printing")
    r.add_argument("--top-k", type=int, default=1, help="answers per question, best first (default 1)")
    r.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="export a model to ship: merged PyTorch weights, or ONNX (optionally int8)",
                       description="LoRA adapters are merged into their base first. A parity probe compares the "
                                   "export's logits with the torch model's and fails beyond a stated tolerance. "
                                   "The directory holds the model, tokenizer, inference configuration and a model "
                                   "card (README.md).")
    x.add_argument("--model", required=True, help=model_help)
    x.add_argument("--format", choices=["merged", "onnx"], default="merged",
                   help="merged: standalone PyTorch weights; onnx: an ONNX Runtime model (needs qatune[onnx])")
    x.add_argument("--quantize", choices=["int8"], help="with --format onnx: int8 weights (dynamic quantization)")
    x.add_argument("--output-dir", required=True)
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="answer questions over HTTP: POST /answer, GET /health, docs at /docs",
                        description="Needs qatune[serve]. Requests arriving together are answered in one batch.")
    sv.add_argument("model", help=model_help)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    sv.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    sv.add_argument("--max-batch", type=int, default=32, help="questions answered together at most (default 32)")
    sv.add_argument("--batch-wait-ms", type=float, default=2.0,
                    help="how long a batch waits for more requests (default 2 ms)")
    sv.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger requests get 413 (default 1 MB)")
    sv.add_argument("--max-context-chars", type=int, default=100_000,
                    help="longer contexts get 413 (default 100,000 characters)")
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("study", help="run a declarative study (TOML): a grid of training runs, resumable")
    st.add_argument("file", help="study file, e.g. studies/offline.toml")
    st.add_argument("--dry-run", action="store_true", help="list the runs with cost estimates; train nothing")
    st.add_argument("--calibrate", action="store_true",
                    help="with --dry-run: time a few steps of each distinct run shape here and project wall times")
    st.add_argument("--status", action="store_true", help="show each run's status and scores")
    st.add_argument("--rebuild-db", action="store_true",
                    help="rebuild a damaged study.sqlite from the run directories (the old file is moved aside)")
    st.add_argument("--set", action="append", metavar="[ARM.]KEY=VALUE",
                    help="override an option for all arms (or one arm), e.g. --set train_data=/data/train.json")
    st.add_argument("--dir", help="study directory (default: from the file, else studies-out/NAME)")
    st.add_argument("--launcher", choices=["local", "ray"], default="local",
                    help="local: worker processes on this machine; ray: Ray tasks on a local instance or a cluster")
    st.add_argument("--workers", type=int, help="runs at once (default: 1 on a CPU; GPUs x --runs-per-gpu)")
    st.add_argument("--runs-per-gpu", type=int, default=1, help="runs sharing each GPU (default 1)")
    st.add_argument("--threads", type=int,
                    help="CPU threads per run (default: cores / workers locally, 1 per Ray task)")
    st.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    st.add_argument("--max-attempts", type=int, default=3, help="tries per run before it counts as failed")
    st.add_argument("--retry-failed", action="store_true", help="give failed runs a fresh set of attempts")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_study)

    rp = sub.add_parser("report", help="write report.md, report.html and figures for a study directory")
    rp.add_argument("study_dir")
    rp.add_argument("--all-runs", action="store_true",
                    help="include rows of earlier versions of the study file (default: its latest grid only)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qatune.errors import Interrupted
    from qatune.study import StudyInterrupted

    try:
        args.func(args)
    except (Interrupted, StudyInterrupted) as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C where nothing needed saving (loading, a dry run, a report)
        print("interrupted", file=sys.stderr)
        return 130
    except QatuneError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
