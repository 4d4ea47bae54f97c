"""Experiment tracking where users already look: TensorBoard (live, per run) and MLflow (per study).

TensorBoard is written by the training process itself (loss, learning rate, learning curve, final metrics).
MLflow is written from finished run records only — by the study driver (one parent run per study, a child
run per training run) or by ``qatune train`` — so one process writes the tracking store, as one writes the
study database, and the workers (local or Ray) need nothing from it. Both are optional extras.
"""

from __future__ import annotations

import os
from pathlib import Path

from qatune.config import REPORT_TO
from qatune.errors import QatuneError

BATCH = 500  # metrics per MLflow log_batch call (its limit is 1000)


class TrackingError(QatuneError, RuntimeError):
    """A tracking option that cannot be served (unknown target, missing extra)."""


def check(report_to: str) -> None:
    """Fail before any training when the target is unknown or its package is missing."""
    if report_to not in REPORT_TO:
        raise TrackingError(f"unknown report_to {report_to!r}; choose from {', '.join(REPORT_TO)}")
    if report_to == "tensorboard":
        _import_tensorboard()
    elif report_to == "mlflow":
        _import_mlflow()


def _import_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrackingError("report_to = tensorboard needs the tensorboard package: "
                            "pip install 'qatune[tensorboard]'") from e
    return SummaryWriter


def _import_mlflow():
    try:
        import mlflow
    except ImportError as e:
        raise TrackingError("report_to = mlflow needs the mlflow package: pip install 'qatune[mlflow]'") from e
    return mlflow


def tensorboard_writer(report_to: str, out: Path):
    """A SummaryWriter writing to the directory ``out`` when the run reports there, else None."""
    check(report_to)
    return _import_tensorboard()(str(out)) if report_to == "tensorboard" else None


def tracking_uri(directory: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite store in ``directory`` (nothing to start, works offline)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(directory).resolve() / 'mlflow.db'}"


def _client(directory: Path):
    mlflow = _import_mlflow()
    return mlflow.tracking.MlflowClient(tracking_uri(directory))


def _experiment(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def _flat(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: str(value)[:6000]}


def log_run(client, experiment_id: str, name: str, record, params: dict | None = None,
            parent_run_id: str | None = None) -> str:
    """One finished training run as an MLflow run: its configuration as params, the loss and learning curves
    as step metrics, the final metrics and costs. Returns the MLflow run id."""
    from mlflow.entities import Metric, Param

    tags = {"qatune.role": "run"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    rid = run.info.run_id
    now = int(run.info.start_time)
    flat = {**_flat("", record.config), **_flat("", params or {})}
    client.log_batch(rid, params=[Param(k, v) for k, v in sorted(flat.items())])
    metrics = [Metric("train_loss", float(v), now, int(step)) for step, v in record.loss.get("curve", [])]
    for p in record.curve:
        metrics += [Metric("curve_f1", float(p["f1"]), now, int(p["step"])),
                    Metric("curve_exact_match", float(p["exact_match"]), now, int(p["step"])),
                    Metric("curve_windows", float(p["windows"]), now, int(p["step"]))]
    final = {**record.metrics, **record.costs()}
    metrics += [Metric(k, float(v), now, 0) for k, v in sorted(final.items())
                if isinstance(v, int | float) and not isinstance(v, bool)]
    for i in range(0, len(metrics), BATCH):
        client.log_batch(rid, metrics=metrics[i : i + BATCH])
    client.set_terminated(rid)
    return rid


def log_training_run(record, out: Path) -> str:
    """``qatune train --report-to mlflow``: the run in experiment "qatune" (store in its output directory)."""
    client = _client(out)
    return log_run(client, _experiment(client, "qatune"), Path(out).name, record)


class StudyTracker:
    """MLflow for a study: one parent run (found again when the study is resumed), a child per finished run.

    Only the study's runs that ask for ``report_to = "mlflow"`` are logged; nothing is imported otherwise.
    """

    def __init__(self, study):
        for report_to in {r.config.report_to for r in study.runs}:
            check(report_to)  # before any run starts, not in every worker
        self.study = study
        self.enabled = any(r.config.report_to == "mlflow" for r in study.runs)
        self.client = self.parent = None
        if self.enabled:
            self.client = _client(study.directory)
            self.experiment = _experiment(self.client, study.name)

    def _parent(self) -> str:
        if self.parent is None:
            where = str(Path(self.study.directory).resolve())
            found = self.client.search_runs([self.experiment], filter_string="tags.`qatune.role` = 'study'")
            found = [r for r in found if r.data.tags.get("qatune.study_dir") == where]
            self.parent = found[0].info.run_id if found else self.client.create_run(
                self.experiment, run_name=self.study.name,
                tags={"qatune.role": "study", "qatune.study_dir": where, "qatune.file": str(self.study.path)},
            ).info.run_id
        return self.parent

    def log(self, run_id: str, arm: str, point: dict, record) -> str | None:
        if not self.enabled:
            return None
        return log_run(self.client, self.experiment, run_id, record,
                       {"arm": arm, "point": point, "run_id": run_id}, parent_run_id=self._parent())

    def close(self) -> None:
        if self.parent is not None:
            self.client.set_terminated(self.parent)
