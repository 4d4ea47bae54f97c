import json

import pytest

from qatune.cli import main
from qatune.data.squad import load_squad, write_squad_json
from tests.conftest import make_examples, shared_file


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_score_v1_json(tmp_path, small_squad, capsys):
    data = load_squad(small_squad)
    preds = {ex.id: ex.answers[0].text for ex in data.examples}
    wrong = data.examples[0].id
    preds[wrong] = "completely different"
    del preds[data.examples[1].id]  # missing prediction scores 0
    p = tmp_path / "preds.json"
    p.write_text(json.dumps(preds))
    assert main(["score", "--data", str(small_squad), "--predictions", str(p), "--json"]) == 0
    r = _last_json(capsys)
    n = len(data)
    assert r["exact_match"] == pytest.approx(100 * (n - 2) / n)
    assert r["f1"] == pytest.approx(100 * (n - 2) / n)


def test_score_v2_keys(tmp_path, capsys):
    exs = make_examples(unanswerable=3)
    path = tmp_path / "v2.json"
    write_squad_json(exs, path, version="2.0")
    preds = {ex.id: (ex.answers[0].text if ex.answers else "") for ex in exs}
    p = tmp_path / "preds.json"
    p.write_text(json.dumps(preds))
    assert main(["score", "--data", str(path), "--predictions", str(p), "--json"]) == 0
    r = _last_json(capsys)
    for key in ["exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"]:
        assert r[key] == pytest.approx(100.0), key
    assert "best_f1" not in r  # as the official script: best thresholds need --na-probs
    na = tmp_path / "na.json"
    na.write_text(json.dumps({ex.id: (0.9 if ex.is_impossible else 0.1) for ex in exs}))
    assert main(["score", "--data", str(path), "--predictions", str(p), "--na-probs", str(na), "--json"]) == 0
    r = _last_json(capsys)
    assert r["best_exact"] == pytest.approx(100.0) and r["best_f1"] == pytest.approx(100.0)
    assert r["HasAns_total"] == len(exs) - 3 and r["NoAns_total"] == 3


def test_score_rejects_bad_predictions(tmp_path, small_squad, capsys):
    p = tmp_path / "preds.json"
    p.write_text(json.dumps(["not", "a", "mapping"]))
    assert main(["score", "--data", str(small_squad), "--predictions", str(p)]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
    p.write_text(json.dumps({"q0_0": 3}))
    assert main(["score", "--data", str(small_squad), "--predictions", str(p)]) == 2
    assert "question 'q0_0' is 3, not a string" in capsys.readouterr().err


def test_data_check_small(small_squad, capsys):
    assert main(["data", "check", str(small_squad), "--tokenizer", "minilm-l6", "--max-seq-length", "64",
                 "--doc-stride", "16", "--json"]) == 0
    r = _last_json(capsys)
    assert r["questions"] == 12 and r["articles"] == 3 and r["answers"] == 12
    assert r["windows"] >= r["questions"]
    assert r["tokens_per_window_max"] <= 64
    assert r["ceiling_exact_match"] == pytest.approx(100.0)  # word-aligned synthetic answers are all reachable


def test_data_check_rejects_malformed(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": "abc", "qas": [
        {"id": "x", "question": "q?", "answers": [{"text": "zz", "answer_start": 1}]}]}]}]}))
    assert main(["data", "check", str(bad), "--tokenizer", "minilm-l6"]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "question 'x'" in err and "not found at answer_start 1" in err


@pytest.mark.slow
def test_real_dev_ceiling(capsys):
    path = shared_file("dev-v1.1.json")
    assert main(["data", "check", str(path), "--tokenizer", "minilm-l6", "--json"]) == 0
    r = _last_json(capsys)
    assert r["questions"] == 10570 and r["articles"] == 48
    assert r["ceiling_exact_match"] >= 99.5 and r["ceiling_f1"] >= 99.5
    assert r["ceiling_exact_match"] < 100.0  # some answers do not end on token boundaries


@pytest.mark.slow
def test_real_dev_v2_ceiling(capsys):
    path = shared_file("dev-v2.0.json")
    assert main(["data", "check", str(path), "--tokenizer", "minilm-l6", "--json"]) == 0
    r = _last_json(capsys)
    assert r["unanswerable"] == 5945
    assert r["ceiling_exact_match"] >= 99.5


def test_train_pause_at_pauses_as_asked_exits_0_and_resume_continues(tmp_path, tiny_models, train_file, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_models["distilbert"]), "--train-data", str(train_file), "--train-articles", "1-3",
            "--validation-share", "0.34", "--eval-steps", "1", "--max-steps", "3", "--max-seq-length", "96",
            "--doc-stride", "32", "--batch-size", "4", "--precision", "fp32", "--output-dir", str(out), "--json"]
    assert main([*args, "--pause-at", "1"]) == 0
    paused = _last_json(capsys)
    assert paused["paused_at"] == 1 and 0 <= paused["validation_f1"] <= 100
    assert not (out / "run.json").exists() and (out / "checkpoints" / "checkpoint-1").is_dir()
    assert main([*args, "--resume"]) == 0
    done = _last_json(capsys)
    assert done["resumed_from_step"] == 1 and done["steps_run"] == 2
