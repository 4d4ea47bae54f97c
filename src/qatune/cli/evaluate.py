"""`qatune evaluate`: score a saved model, LoRA adapter or export on SQuAD data; writes the official files."""

from __future__ import annotations

import argparse
from pathlib import Path

from qatune.cli.common import MODEL_HELP, CliError, count_or_fraction, emit
from qatune.data.splits import EVAL_SEED
from qatune.errors import check_writable


def add(sub) -> None:
    e = sub.add_parser("evaluate", help="evaluate a saved model, LoRA adapter or export on SQuAD data")
    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--data", required=True, help="SQuAD JSON file or datasets id[:split]")
    e.add_argument("--split", default="validation")
    e.add_argument("--articles", help="1-based article ranges, e.g. 37-48")
    e.add_argument("--questions", type=count_or_fraction, help="question count or fraction")
    e.add_argument("--seed", type=int, default=EVAL_SEED,
                   help="draw of --questions (default: the one every training run's evaluation uses)")
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
    e.set_defaults(func=evaluate)


def evaluate(args: argparse.Namespace) -> None:
    from qatune.answer.inference import Reader
    from qatune.data.splits import load_split
    from qatune.rundir import write_evaluation

    check_writable(args.output_dir, "--output-dir", directory=True)
    from qatune.rundir import RunDir

    if RunDir(args.output_dir).record.exists():
        raise CliError(f"--output-dir {args.output_dir} is a training run's directory: its own evaluation would be "
                       f"replaced; choose another directory (e.g. {Path(args.output_dir) / 'evaluations' / 'NAME'})")
    overrides = {k: getattr(args, k) for k in ("max_seq_length", "doc_stride", "batch_size", "null_threshold")
                 if getattr(args, k) is not None}
    data = load_split(args.data, args.split, args.articles, args.questions, args.seed, args.repair_answers)
    reader = Reader.load(args.model, device=args.device, precision=args.precision, **overrides)
    metrics, decoded = reader.evaluate(data, progress=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_evaluation(out, metrics, decoded, data.version.startswith("2"))
    emit(metrics, args.json, [f"{args.model} on {data.source} ({len(data)} questions): "
                              f"EM {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f} -> {out}"])
