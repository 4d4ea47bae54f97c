"""Trained runs shared by the inference, export, serve and bad-usage tests (session fixtures; import them)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from qatune.config import TrainConfig
from qatune.data.squad import write_squad_json
from qatune.train.recipe import train
from tests.conftest import make_examples, save_tiny_model

CONTEXT = "The bridge of Marlow is called Kestrel7. Visitors often walk near the river in spring."


def tiny_config(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), train_data=str(data), train_articles="1-2", eval_data=str(data),
                eval_articles="3-4", output_dir=str(out), max_seq_length=96, doc_stride=32, batch_size=4, max_steps=4,
                save_steps=100, precision="fp32", learning_rate=1e-3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qa") / "qa-v1.1.json"
    write_squad_json(make_examples(n_articles=4, per_article=6), path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, qa_data) -> Path:
    """A finished full fine-tuning run of a tiny random DistilBERT (its --output-dir)."""
    root = tmp_path_factory.mktemp("tiny-run")
    model = save_tiny_model(root / "base", "distilbert")
    train(tiny_config(model, qa_data, root / "run"), progress=False)
    return root / "run"


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory, qa_data) -> Path:
    root = tmp_path_factory.mktemp("tiny-lora")
    model = save_tiny_model(root / "base", "distilbert")
    train(tiny_config(model, qa_data, root / "run", strategy="lora", lora_rank=4), progress=False)
    return root / "run"


@pytest.fixture(scope="session")
def minilm_run(tmp_path_factory) -> tuple[Path, Path]:
    """Real MiniLM-L6 weights fine-tuned briefly on generated data: (run directory, its 48-question data file,
    trained on, then scored by a separate evaluation written into the run directory as the run's own would be: a
    run may not evaluate on its training articles)."""
    from qatune.answer.inference import Reader
    from qatune.data.squad import load_squad
    from qatune.rundir import write_evaluation

    root = tmp_path_factory.mktemp("minilm-run")
    data = root / "qa.json"
    write_squad_json(make_examples(n_articles=6, per_article=8, seed=3), data)
    train(TrainConfig(model="minilm-l6", train_data=str(data), output_dir=str(root / "run"), max_seq_length=96,
                      doc_stride=32, batch_size=8, max_steps=30, learning_rate=3e-4, save_steps=1000,
                      precision="fp32", attention="sdpa"), progress=False)  # the model the int8 bound was set on
    metrics, decoded = Reader.load(root / "run").evaluate(load_squad(data))
    write_evaluation(root / "run", metrics, decoded)
    return root / "run", data


def db_rows(directory) -> dict[str, dict]:
    """A study's store rows by run id, as SQLite holds them (JSON columns still text)."""
    db = sqlite3.connect(directory / "study.sqlite")
    db.row_factory = sqlite3.Row
    out = {r["id"]: dict(r) for r in db.execute("SELECT * FROM runs")}
    db.close()
    return out
