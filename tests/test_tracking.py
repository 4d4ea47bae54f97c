"""Tracking: TensorBoard events written by a run, missing extras named before anything trains."""

import sys

import pytest

from qatune.cli import main
from qatune.config import TrainConfig
from qatune.train import tracking
from qatune.train.recipe import train


def test_tensorboard_gets_loss_learning_curve_and_final_metrics(tmp_path, tiny_models, train_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = TrainConfig(model=str(tiny_models["distilbert"]), train_data=str(train_file), train_articles="1-3",
                      eval_data=str(train_file), eval_articles="4", output_dir=str(out), max_seq_length=96,
                      doc_stride=32, batch_size=4, max_steps=4, save_steps=4, logging_steps=2, eval_steps=2,
                      eval_subset=3, precision="fp32", report_to="tensorboard")
    record = train(cfg, progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "curve/f1", "curve/exact_match", "eval/f1"} <= tags
    assert [e.step for e in events.Scalars("curve/f1")] == [2, 4]
    assert [e.value for e in events.Scalars("curve/f1")] == pytest.approx([p["f1"] for p in record.curve])
    assert events.Scalars("eval/f1")[0].value == pytest.approx(record.metrics["f1"])
    assert record.curve[1]["windows"] == 16  # 4 steps of 4 windows (the 24-question file has more than 16)
    assert record.timing["curve_eval_s"] > 0


def test_missing_extra_is_named_before_training(tmp_path, monkeypatch, capsys, train_file):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(tracking.TrackingError, match=r"qatune\[mlflow\]"):
        tracking.check("mlflow")
    assert main(["train", "--train-data", str(train_file), "--report-to", "mlflow",
                 "--output-dir", str(tmp_path / "r")]) == 2
    assert "pip install 'qatune[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(tracking.TrackingError, match="unknown report_to 'wandb'"):
        tracking.check("wandb")
