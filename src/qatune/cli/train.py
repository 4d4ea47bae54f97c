"""`qatune train`: fine-tune one model (full or LoRA) from flags and/or a TOML file, then evaluate it."""

from __future__ import annotations

import argparse
from pathlib import Path

from qatune.cli.common import CliError, add_dataclass_args, emit, load_toml


def add(sub) -> None:
    from qatune.config import TrainConfig

    t = sub.add_parser("train", help="fine-tune a model (full or LoRA) and evaluate it",
                       description="Every option can also come from a TOML file (--config); flags override it.")
    t.add_argument("--config", help="TOML file with training options (keys as the flags, with underscores)")
    add_dataclass_args(t, TrainConfig)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=train)


def train(args: argparse.Namespace) -> None:
    from qatune.config import TrainConfig
    from qatune.train import tracking
    from qatune.train.recipe import train as run_training
    from qatune.train.signals import stop_on_signals

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "json", "debug")}
    cfg = TrainConfig.from_dict({**(load_toml(args.config) if args.config else {}), **given})
    if not cfg.train_data:
        raise CliError("--train-data is required (a SQuAD JSON file or a datasets id[:split])")
    tracking.check(cfg.report_to)
    from qatune.errors import Paused

    with stop_on_signals():
        try:
            r = run_training(cfg)
        except Paused as e:  # what --pause-at asked for: not an error
            emit({"output_dir": cfg.output_dir, "paused_at": e.step, "validation_f1": e.score}, args.json,
                 [f"{cfg.output_dir}: {e} (checkpoint saved); --resume continues it"])
            return
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
        lines.append(f"  eval: EM {m['exact_match']:.2f}, F1 {m['f1']:.2f} on {m['questions']} questions")
    emit({"output_dir": cfg.output_dir, **m, **p, **t}, args.json, lines)
