"""The run directory (a run's ``output_dir``): its file names, and every read and write of them.

One owner, so the training recipe, the evaluation command, the study driver, the launchers, the worker and the
export agree on what a run leaves behind and on when it can be trusted::

    config.json        the configuration, written before training starts (what --resume checks against)
    run.json           the RunRecord, written last: its presence means the run finished
    metrics.json       EM/F1 of the evaluation (also beside `qatune evaluate` outputs)
    predictions.json   {question id: answer}; nbest.json, null_odds.json (SQuAD v2) beside it
    curve.json         learning-curve points so far (kept across an interruption)
    question_scores.json  F1 (0-100) of every learning-curve question at each curve step: {step: {question id: f1}}
    pauses.json        a tuning candidate's validation F1 at each step it paused at (a study's rungs): {step: f1},
                       and "end": the step its run ended at, when it paused there
    progress.json      step, speed and where it runs, every few seconds (advisory, for --status)
    model/             the trained model or LoRA adapter, tokenizer and inference configuration
    checkpoints/       checkpoint-<step>/ folders: the trainable weights (trainable.safetensors), the optimizer,
                       scheduler and RNG state (state.pt) and the configuration they were trained with
                       (config.json); best-<step>/ beside them: the trainable weights of a best validation step
    tensorboard/       TensorBoard events (report_to = "tensorboard")
    .lock              held by the one process that trains the run
    worker.json        a study worker's task (what to train, where to report); train.log its output;
    outcome.json       what the worker hands back to the driver (finished, paused, failed)

Free of torch: the driver and the report read run directories without a model stack.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from qatune.config import TrainConfig, config_differences, config_hash
from qatune.errors import FileError, TrainingError
from qatune.record import RunRecord, write_json_atomic

CONFIG = "config.json"
RECORD = "run.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.json"
NBEST = "nbest.json"
NULL_ODDS = "null_odds.json"
CURVE = "curve.json"
QUESTION_SCORES = "question_scores.json"
PAUSES = "pauses.json"
PROGRESS = "progress.json"
MODEL = "model"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
TRAINABLE = "trainable.safetensors"  # in a checkpoint: the weights that train
STATE = "state.pt"  # in a checkpoint: optimizer, scheduler, RNG and step
BEST = "best-"  # checkpoints/best-<step>/: the trainable weights of a best validation step (keep = "best")
WORKER_SPEC = "worker.json"
TRAIN_LOG = "train.log"
OUTCOME = "outcome.json"


def write_config(directory: Path, cfg: TrainConfig) -> None:
    """``config.json`` of a run directory or of one of its checkpoints."""
    from dataclasses import asdict

    write_json_atomic(directory / CONFIG, {"config": asdict(cfg), "hash": config_hash(cfg)})


class RunDir:
    """One run directory; paths as attributes, reads that return None/{} for a missing or damaged advisory file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.model = self.path / MODEL
        self.checkpoints = self.path / CHECKPOINTS
        self.record = self.path / RECORD
        self.predictions = self.path / PREDICTIONS
        self.tensorboard = self.path / TENSORBOARD
        self.lock = self.path / LOCK

    # ------------------------------------------------------------------ configuration and identity
    def write_config(self, cfg: TrainConfig) -> None:
        write_config(self.path, cfg)

    def stored_configs(self, checkpoint: Path | None = None) -> list[tuple[str, dict]]:
        """Every configuration a run already here claims, with where it is written: config.json, run.json and the
        checkpoint to resume from (its own copy, written with its weights, so that editing the other two cannot
        relabel what it was trained with). Missing or unreadable ones are left out."""
        out = []
        places = [(CONFIG, self.path / CONFIG), (RECORD, self.record)]
        if checkpoint is not None:
            places.append((f"{checkpoint.name} (the weights to resume)", checkpoint / CONFIG))
        for name, path in places:
            try:
                config = json.loads(path.read_text(encoding="utf-8"))["config"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(config, dict):
                out.append((name, config))
        return out

    def claim(self, cfg: TrainConfig, checkpoint: Path | None, write: bool) -> RunRecord | None:
        """Make this directory ``cfg``'s run before training: the finished record of this very run when it is
        here (``resume``), else None with ``config.json`` written (``write``). Refuses a file, another run's
        checkpoints without ``resume``, and a resume of a run with other settings (``checkpoint`` is the newest
        one, whose own copy of its configuration is checked too)."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise TrainingError(f"output_dir {out} is a file; give a directory (it is created if missing)")
        if checkpoint is not None and not cfg.resume:
            raise TrainingError(f"{out} already holds checkpoints of a run; pass --resume to continue it, "
                                f"or choose another --output-dir")
        if cfg.resume and checkpoint is None and not self.record.exists():
            print(f"--resume: {out} holds no run yet (no checkpoint, no run.json); training from the start",
                  file=sys.stderr)
        if cfg.resume:  # continue only the same run: every configuration it claims and the files it stands on
            for where, stored in self.stored_configs(checkpoint):
                if diffs := config_differences(stored, cfg):
                    raise TrainingError(f"{out} holds a run with other settings: its {where} says "
                                        f"{'; '.join(diffs[:4])}. --resume continues only the same run: give its "
                                        f"settings, or another --output-dir")
            if self.record.exists():
                done, why = self.finished_record(cfg)
                if done is not None:
                    return done
                print(f"{out}: finished run not usable ({why}); finishing it again from its last checkpoint",
                      file=sys.stderr)
        if write:
            try:
                out.mkdir(parents=True, exist_ok=True)
                self.write_config(cfg)
            except OSError as e:
                raise FileError(f"cannot write to output_dir {out} ({e.strerror or e}); choose a directory you "
                                f"can write to") from e
        return None

    def finished_record(self, cfg: TrainConfig) -> tuple[RunRecord | None, str]:
        """The record of this configuration's finished run here and "" — or None and why it cannot be trusted
        (missing or damaged run.json, metrics, model or predictions, another configuration)."""
        try:
            record = RunRecord.load(self.record)
        except FileNotFoundError:
            return None, f"it has no {RECORD}"
        except (OSError, ValueError, TypeError, KeyError) as e:
            return None, f"its {RECORD} is damaged ({type(e).__name__})"
        if config_differences(record.config, cfg):
            return None, f"its {RECORD} belongs to another configuration"
        needed = [METRICS, MODEL] + ([PREDICTIONS] if cfg.eval_data else [])
        missing = [n for n in needed if not (self.path / n).exists()]
        if missing:
            return None, f"{', '.join(missing)} missing"
        for name in (METRICS, PREDICTIONS):
            if (self.path / name).exists():
                try:
                    json.loads((self.path / name).read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    return None, f"its {name} is damaged ({type(e).__name__})"
        return record, ""

    def read_record_dict(self) -> dict:
        """run.json as a plain dict (for a model card), or {} when absent or unreadable."""
        try:
            return json.loads(self.record.read_text(encoding="utf-8")) if self.record.exists() else {}
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------ the model
    def save_model(self, model, tokenizer, base_model: str, write_settings: Callable[[Path], None]) -> None:
        """The trained model or LoRA adapter, its tokenizer and (``write_settings(directory)``) its inference
        configuration, in ``model/``, atomically."""
        tmp = self.model.with_name(self.model.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        adapter_cfg = tmp / "adapter_config.json"
        if adapter_cfg.exists():  # record the base by the name the user gave (an alias stays portable)
            c = json.loads(adapter_cfg.read_text())
            c["base_model_name_or_path"] = base_model
            adapter_cfg.write_text(json.dumps(c, indent=2))
        write_settings(tmp)
        shutil.rmtree(self.model, ignore_errors=True)
        os.replace(tmp, self.model)

    # ------------------------------------------------------------------ while training
    def write_progress(self, progress: dict) -> None:
        write_json_atomic(self.path / PROGRESS, progress, durable=False)  # advisory: not fsynced

    def read_progress(self) -> dict:
        """The last progress report (written by the training loop every few seconds), or {}."""
        try:
            return json.loads((self.path / PROGRESS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def write_curve(self, points: list[dict]) -> None:
        write_json_atomic(self.path / CURVE, points, durable=False)

    def read_curve(self, through_step: int) -> list[dict]:
        """Learning-curve points up to ``through_step`` (an interrupted attempt's, up to the checkpoint resumed)."""
        try:
            return [p for p in json.loads((self.path / CURVE).read_text(encoding="utf-8")) if p["step"] <= through_step]
        except (OSError, ValueError, TypeError, KeyError):
            return []

    def write_question_scores(self, step: int, scores: dict[str, float]) -> None:
        """The per-question F1 (0-100) of the learning-curve questions at ``step``, merged into
        question_scores.json (one key per step, ``str(step)``), atomically."""
        steps = {str(k): v for k, v in self.read_question_scores().items()}
        steps[str(step)] = scores
        write_json_atomic(self.path / QUESTION_SCORES, dict(sorted(steps.items(), key=lambda kv: int(kv[0]))))

    def read_question_scores(self) -> dict[int, dict[str, float]]:
        """{step: {question id: F1 (0-100)}} of the learning-curve steps so far; {} when missing or damaged."""
        try:
            raw = json.loads((self.path / QUESTION_SCORES).read_text(encoding="utf-8"))
            return {int(step): {str(q): float(f1) for q, f1 in scores.items()} for step, scores in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def keep_question_scores(self, through_step: int) -> None:
        """Drop the question scores of steps after ``through_step`` (an interrupted attempt's, past the checkpoint
        the run resumes from; all of them for a run that starts afresh)."""
        steps = self.read_question_scores()
        if any(step > through_step for step in steps):
            write_json_atomic(self.path / QUESTION_SCORES,
                              {str(k): v for k, v in sorted(steps.items()) if k <= through_step})

    def write_pause(self, step: int, score: float, end: bool = False) -> None:
        """A tuning candidate paused at ``step`` with validation F1 ``score``, ``end``: the last step of its run
        (kept to rebuild a study's store)."""
        pauses = {str(k): v for k, v in self.read_pauses().items()}
        pauses[str(step)] = score
        write_json_atomic(self.path / PAUSES, {**pauses, **({"end": step} if end else {})})

    def _pauses_file(self) -> dict:
        try:
            out = json.loads((self.path / PAUSES).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return out if isinstance(out, dict) else {}

    def read_pauses(self) -> dict[int, float]:
        """{step: validation F1} of every pause of a tuning candidate; {} when none (or damaged)."""
        try:
            return {int(k): float(v) for k, v in self._pauses_file().items() if k != "end"}
        except (ValueError, TypeError):
            return {}

    def read_pause_end(self) -> int | None:
        """The step a candidate's run ended at when it paused there (shorter than its rung), else None."""
        end = self._pauses_file().get("end")
        return end if isinstance(end, int) else None


def write_evaluation(out: Path, metrics: dict, decoded=None, version_2: bool = False) -> None:
    """An evaluation's outputs in ``out``: predictions, n-best lists, null odds (SQuAD v2) and metrics — the same
    files for a run's own evaluation and for `qatune evaluate` (a run without evaluation data: metrics {} only)."""
    if decoded is not None:
        write_json_atomic(out / PREDICTIONS, decoded.predictions)
        write_json_atomic(out / NBEST, dict(decoded.nbest))
        if version_2:
            write_json_atomic(out / NULL_ODDS, decoded.null_odds)
    write_json_atomic(out / METRICS, metrics)
