"""Bad usage, as a new user makes it: every case ends with a clear one-line error and the right exit code.

Each case asserts the exit status, that no traceback reaches the user, and the words of the message. When a
new mistake is found that qatune answers badly, add it here.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from qatune.cli import main
from tests.conftest import make_examples, owners

TINY = ["--max-seq-length", "96", "--doc-stride", "32", "--batch-size", "4", "--precision", "fp32"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return code, out, err


def expect_error(argv, capsys, *words: str, code: int = 2) -> str:
    got, _, err = run(argv, capsys)
    assert got == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for w in words:
        assert w in last, f"{w!r} not in {last!r}"
    return last


# ------------------------------------------------------------------------------------------- train options
@pytest.mark.parametrize("extra,words", [
    (["--batch-size", "0"], ["batch_size = 0", ">= 1", "--batch-size"]),
    (["--learning-rate", "-1"], ["learning_rate = -1.0", "(0, 1)"]),
    (["--learning-rate", "nan"], ["learning_rate", "finite"]),
    (["--epochs", "0"], ["epochs = 0.0", "> 0"]),
    (["--max-steps", "-3"], ["max_steps = -3", ">= 0"]),
    (["--attention", "flash"], ["attention = 'flash'", "auto, eager, sdpa"]),
    (["--attention-dropout", "1.5"], ["attention_dropout = 1.5", "[0, 1)"]),
    (["--max-train-flops", "-1"], ["max_train_flops = -1.0", "must be > 0"]),
    (["--max-train-flops", "1e12", "--max-steps", "4"], ["max_steps = 4 is set too", "give one of them"]),
    (["--train-articles", ","], ["train_articles", "names no article"]),
    (["--eval-articles", "3-1"], ["eval_articles", "start <= end"]),
    (["--train-articles", "one-two"], ["train_articles", "1-based numbers"]),
    (["--doc-stride", "500"], ["doc_stride = 500", "smaller than max_seq_length"]),
    (["--max-seq-length", "8"], ["max_seq_length = 8", ">= 32"]),
    (["--strategy", "LoRA"], ["strategy = 'LoRA'", "full, lora"]),
    (["--alpha-policy", "sqrt"], ["alpha_policy", "fixed, proportional, rslora"]),
    (["--precision", "fp8"], ["precision = 'fp8'", "auto, fp32, bf16, fp16"]),
    (["--lora-rank", "0"], ["lora_rank = 0", ">= 1"]),
    (["--lora-dropout", "1.5"], ["lora_dropout", "[0, 1)"]),
    (["--warmup-ratio", "2"], ["warmup_ratio", "[0, 1)"]),
    (["--train-questions", "1.5"], ["train_questions", "(0, 1]"]),
    (["--eval-questions", "0"], ["eval_questions", ">= 1"]),
    (["--grad-accum", "0"], ["grad_accum", ">= 1"]),
    (["--report-to", "wandb"], ["report_to = 'wandb'", "none"]),
    (["--eval-steps", "5"], ["eval_steps = 5", "needs validation data", "or eval_data"]),
    (["--eval-steps", "-1", "--eval-data", "x.json"], ["eval_steps = -1", ">= 0"]),
])
def test_train_option_out_of_range(tmp_path, small_squad, extra, words, capsys):
    expect_error(["train", "--train-data", small_squad, "--output-dir", tmp_path / "out", *extra], capsys, *words)
    assert not (tmp_path / "out").exists()  # refused before anything was created or loaded


def test_train_max_seq_length_beyond_the_models_positions(tmp_path, small_squad, tiny_models, capsys):
    import transformers

    limit = transformers.AutoConfig.from_pretrained(tiny_models["distilbert"]).max_position_embeddings
    expect_error(["train", "--model", tiny_models["distilbert"], "--train-data", small_squad, "--output-dir",
                  tmp_path / "o", *TINY, "--max-seq-length", str(limit + 8)], capsys,
                 f"max_seq_length {limit + 8} is longer than", f"cover {limit} tokens", "max_position_embeddings")


def test_train_config_file_mistakes(tmp_path, small_squad, capsys):
    base = ["train", "--train-data", small_squad, "--output-dir", tmp_path / "out", "--config"]
    expect_error([*base, tmp_path / "missing.toml"], capsys, "missing.toml", "config file not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 3\n")
    expect_error([*base, bad], capsys, "bad.toml", "not valid TOML")
    bad.write_text('batch_size = "8"\n')
    expect_error([*base, bad], capsys, "batch_size = '8'", "expected int, got str")
    bad.write_text("batch_sise = 8\n")
    expect_error([*base, bad], capsys, "unknown training option", "batch_sise")


def test_train_into_the_models_own_directory_is_refused(tmp_path, tiny_models, small_squad, capsys):
    import shutil as sh

    model = tmp_path / "model"
    sh.copytree(tiny_models["distilbert"], model)
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    for out in (model, tmp_path):  # the model itself, or a directory holding it
        expect_error(["train", "--model", model, "--train-data", small_squad, "--output-dir", out, *TINY], capsys,
                     "output_dir", "is the model's own directory")
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before


def test_resume_of_a_directory_with_no_run_says_it_starts_from_scratch(tmp_path, tiny_models, small_squad, capsys):
    code, _, err = run(["train", "--model", tiny_models["distilbert"], "--train-data", small_squad, "--max-steps", "1",
                        "--output-dir", tmp_path / "typo", "--resume", *TINY], capsys)
    assert code == 0 and "holds no run yet" in err and "training from the start" in err


def test_train_files_that_cannot_be_used(tmp_path, small_squad, capsys):
    expect_error(["train", "--output-dir", tmp_path / "o"], capsys, "--train-data is required")
    expect_error(["train", "--train-data", tmp_path / "nope.json", "--output-dir", tmp_path / "o", *TINY],
                 capsys, "nope.json", "no such SQuAD JSON file")
    expect_error(["train", "--train-data", tmp_path, "--output-dir", tmp_path / "o", *TINY], capsys,
                 "a directory, not a SQuAD JSON file")
    expect_error(["train", "--train-data", f"{small_squad}/x", "--output-dir", tmp_path / "o", *TINY], capsys,
                 "is a file, so nothing can be under it")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    expect_error(["train", "--train-data", small_squad, "--output-dir", a_file, *TINY], capsys,
                 "output_dir", "is a file")
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"data": [{"title": "Caf\xe9"}]}'.encode("latin-1"))
    expect_error(["train", "--train-data", latin, "--output-dir", tmp_path / "o", *TINY], capsys,
                 "latin.json", "not UTF-8")
    expect_error(["train", "--train-data", small_squad, "--train-articles", "1-9", "--output-dir",
                  tmp_path / "o", *TINY], capsys, "article range '1-9' goes past the last article (3)")


# ----------------------------------------------------------------------------- repeated and interrupted runs
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models, train_file):
    """A finished 3-step run that kept its last two checkpoints."""
    out = tmp_path_factory.mktemp("run") / "r"
    args = ["train", "--model", tiny_models["distilbert"], "--train-data", train_file, "--train-articles", "1-3",
            "--train-questions", "8", "--eval-data", train_file, "--eval-articles", "4", "--eval-questions", "6",
            "--max-steps", "3", "--save-steps", "1",
            "--keep-checkpoints", "2", "--output-dir", out, *TINY]
    assert main([str(a) for a in args]) == 0
    return out, [str(a) for a in args]


def test_resume_with_other_settings_is_refused(finished_run, tmp_path, capsys):
    out, args = finished_run
    expect_error([*args, "--resume", "--learning-rate", "0.5"], capsys,
                 "holds a run with other settings", "learning_rate: None -> 0.5", "another --output-dir")
    expect_error(args, capsys, "already holds checkpoints", "--resume")  # no silent overwrite either
    code, out_text, _ = run([*args, "--resume", "--json"], capsys)  # the same settings: the stored result
    assert code == 0 and json.loads(out_text.strip().splitlines()[-1])["steps_run"] == 3


def test_editing_the_configuration_cannot_relabel_a_checkpoint(finished_run, tmp_path, capsys):
    """config.json and run.json edited to claim another learning rate: the checkpoint's own copy refuses it, and
    nothing of the run is rewritten."""
    src, args = finished_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    args = [a if a != str(src) else str(out) for a in args]
    for name in ("config.json", "run.json"):
        stored = json.loads((out / name).read_text())
        stored["config"]["learning_rate"] = 0.5
        (out / name).write_text(json.dumps(stored))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    expect_error([*args, "--resume", "--learning-rate", "0.5"], capsys, "holds a run with other settings",
                 "checkpoint-3 (the weights to resume) says learning_rate: None -> 0.5")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_damaged_last_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, capsys):
    src, args = finished_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    args = [a if a != str(src) else str(out) for a in args]
    for name in ("run.json", "metrics.json"):  # as if the process died after its last checkpoint
        (out / name).unlink()
    state = out / "checkpoints" / "checkpoint-3" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    code, text, err = run([*args, "--resume", "--json"], capsys)
    assert code == 0
    assert "checkpoint-3 is damaged (" in err and ": resuming from checkpoint-2" in err
    record = json.loads((out / "run.json").read_text())
    assert record["timing"]["resumed_from_step"] == 2 and record["timing"]["steps_run"] == 1
    for ckpt in (out / "checkpoints").iterdir():  # no intact checkpoint at all: refused with the fix
        (ckpt / "trainable.safetensors").write_bytes(b"\0" * 10)
    (out / "run.json").unlink()
    expect_error([*args, "--resume"], capsys, "no intact checkpoint", "Delete that folder")


def test_finished_run_with_missing_files_is_finished_again(finished_run, tmp_path, capsys):
    src, args = finished_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    args = [a if a != str(src) else str(out) for a in args]
    shutil.rmtree(out / "model")
    (out / "predictions.json").write_text("{trunc")
    code, _, err = run([*args, "--resume"], capsys)
    assert code == 0 and "finished run not usable (model missing)" in err
    assert (out / "model").is_dir() and json.loads((out / "predictions.json").read_text())


# --------------------------------------------------------------------------------------------------- score
def _predictions(small_squad: Path) -> dict:
    data = json.loads(small_squad.read_text())
    return {qa["id"]: qa["answers"][0]["text"] for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]}


def test_score_reads_gzip_and_refuses_what_it_cannot_read(tmp_path, small_squad, capsys):
    preds = _predictions(small_squad)
    gz = tmp_path / "preds.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(preds).encode()))
    code, out, _ = run(["score", "--data", small_squad, "--predictions", gz, "--json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["exact_match"] == 100.0
    base = ["score", "--data", small_squad, "--predictions"]
    expect_error([*base, tmp_path / "none.json"], capsys, "none.json", "predictions file not found")
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps({"q": "caf\xe9"}, ensure_ascii=False).encode("latin-1"))
    expect_error([*base, latin], capsys, "latin.json", "not UTF-8")
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(gzip.compress(b'{"a": 1}')[:15])
    expect_error([*base, broken], capsys, "broken.json.gz", "predictions file")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    expect_error([*base, listed], capsys, "must be a JSON object", "got list")
    expect_error([*base, tmp_path], capsys, "is a directory")


def test_score_v2_na_probs_must_be_finite_and_complete(tmp_path, capsys):
    from qatune.data.squad import write_squad_json

    data = tmp_path / "v2.json"
    write_squad_json(make_examples(unanswerable=3), data, version="2.0")
    preds = _predictions_v2(data)
    p = tmp_path / "p.json"
    p.write_text(json.dumps(preds))
    na = tmp_path / "na.json"
    na.write_text(json.dumps({q: 0.1 for q in preds} | {next(iter(preds)): float("nan")}))
    expect_error(["score", "--data", data, "--predictions", p, "--na-probs", na], capsys,
                 "na-probs", "is nan", "not a finite number")
    na.write_text(json.dumps({next(iter(preds)): 0.2}))
    expect_error(["score", "--data", data, "--predictions", p, "--na-probs", na], capsys, "no entry for")
    expect_error(["score", "--data", data, "--predictions", p, "--na-prob-thresh", "inf"], capsys,
                 "--na-prob-thresh must be a finite number")


def _predictions_v2(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {qa["id"]: (qa["answers"][0]["text"] if qa["answers"] else "") for a in data["data"]
            for p in a["paragraphs"] for qa in p["qas"]}


def test_na_probs_on_v1_data_is_refused(tmp_path, small_squad, capsys):
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps(_predictions(small_squad)))
    na = tmp_path / "na.json"
    na.write_text("{}")
    expect_error(["score", "--data", small_squad, "--predictions", preds, "--na-probs", na], capsys,
                 "--na-probs is for SQuAD v2.0", "v1.1")


# ---------------------------------------------------------------------------------------------- data check
@pytest.mark.parametrize("content,words", [
    ('{"data": [', ["not valid JSON", "line 1"]),
    ('{"version": "1.1"}', ["not SQuAD-shaped"]),
    (None, ["gzip"]),
])
def test_data_check_damaged_files(tmp_path, content, words, capsys):
    path = tmp_path / "d.json"
    if content is None:
        path = tmp_path / "d.json.gz"
        path.write_bytes(b"\x1f\x8b" + os.urandom(30))
    else:
        path.write_text(content)
    expect_error(["data", "check", path, "--tokenizer", "minilm-l6"], capsys, str(path), *words)


def test_data_check_window_settings(small_squad, capsys):
    expect_error(["data", "check", small_squad, "--tokenizer", "minilm-l6", "--doc-stride", "400"], capsys,
                 "doc_stride=400", "smaller than max_seq_length")
    expect_error(["data", "check", small_squad, "--tokenizer", "minilm-l6", "--max-seq-length", "0"], capsys,
                 "max_seq_length=0 is too small")


# --------------------------------------------------------------------------------------------------- study
STUDY = """
[study]
name = "bad"
{headline}
[defaults]
train_data = "{data}"
max_seq_length = 96
doc_stride = 32
batch_size = 4
max_steps = 2
precision = "fp32"

[[arms]]
name = "full"
model = "{model}"
strategy = "full"

[[arms]]
name = "{second}"
model = "{model}"
strategy = "lora"

[grid]
lora_rank = {ranks}
seed = [1]
"""


def study_file(tmp_path, data, model="m", headline="", second="lora", ranks="[2]") -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(STUDY.format(data=data, model=model, headline=headline, second=second, ranks=ranks))
    return path


@pytest.mark.parametrize("kw,words", [
    ({"ranks": '["a"]'}, ["bad.toml", "arm 'lora'", "lora_rank = 'a'", "expected int"]),
    ({"ranks": "[0]"}, ["lora_rank = 0", ">= 1"]),
    ({"ranks": "4"}, ["[grid] lora_rank must be a non-empty list"]),
    ({"second": "full"}, ["arm name(s) ['full'] used more than once"]),
    ({"headline": 'headline = ["full", "lora-r8"]'}, ["headline", "must name two different arms"]),
    ({"headline": 'headline = "full"'}, ["headline", "must name two different arms"]),
    ({"ranks": "[2, 4, 2]"}, ["[grid] lora_rank lists 2 more than once"]),
])
def test_study_file_mistakes(tmp_path, small_squad, kw, words, capsys):
    path = study_file(tmp_path, small_squad, **kw)
    expect_error(["study", path, "--dir", tmp_path / "s", "--dry-run"], capsys, *words)
    assert not (tmp_path / "s").exists()


def test_study_command_mistakes(tmp_path, small_squad, tiny_models, capsys):
    expect_error(["study", tmp_path / "none.toml"], capsys, "none.toml", "study file not found")
    path = study_file(tmp_path, small_squad)
    expect_error(["study", path, "--set", "lora_rank"], capsys, "expected key=value")
    expect_error(["study", path, "--set", "nosuch.seed=1"], capsys, "no arm named 'nosuch'")
    expect_error(["study", path, "--dir", tmp_path / "s", "--status", "--rebuild-db"], capsys, "choose one of")
    expect_error(["study", path, "--dry-run", "--set", "maxsteps=3"], capsys,
                 "--set 'maxsteps=3': unknown option 'maxsteps' (did you mean max_steps?)")
    expect_error(["study", path, "--dry-run", "--set", "full.lora_rank=8"], capsys,
                 f"lora_rank is an option of {owners('lora_rank')}; arm 'full' fine-tunes with full")
    path = study_file(tmp_path, small_squad, model=tiny_models["distilbert"])  # data the dry run reads
    expect_error(["study", path, "--dry-run", "--set", f"eval_data='{small_squad}'", "--set", "train_articles='1-2'",
                  "--set", "eval_articles='3-99'"],
                 capsys,  # the option is named
                 "eval_articles / eval_questions: ", "article range '3-99' goes past the last article")
    expect_error(["study", path, "--dry-run", "--set", "train_questions=100000"], capsys,
                 "train_articles / train_questions: asked for 100000 questions")
    expect_error(["report", tmp_path / "nowhere"], capsys, "no such directory")
    (tmp_path / "empty").mkdir()
    expect_error(["report", tmp_path / "empty"], capsys, "no study.sqlite here")


def test_every_run_failed_exits_2_and_says_why(tmp_path, small_squad, capsys):
    path = study_file(tmp_path, small_squad, model=tmp_path / "no-such-model")
    code, _, err = run(["study", path, "--dir", tmp_path / "s", "--max-attempts", "1"], capsys)
    assert code == 2
    assert "2 run(s) failed" in err and "--retry-failed" in err and "--status" in err
    failed = [line for line in err.splitlines() if line.startswith("  failed: ")]
    assert len(failed) == 2 and all("no-such-model: no such model directory" in line for line in failed)


# ------------------------------------------------------------- a study's directory and database, damaged or moved
@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, tiny_models, train_file):
    root = tmp_path_factory.mktemp("study")
    path = study_file(root, train_file, model=tiny_models["distilbert"])
    text = path.read_text().replace('train_data = "', f'eval_data = "{train_file}"\neval_articles = "4"\n'
                                                      f'eval_questions = 6\ntrain_articles = "1-3"\ntrain_data = "')
    path.write_text(text)
    assert main(["study", str(path), "--dir", str(root / "s")]) == 0
    return path, root / "s"


def test_moved_study_reports_its_own_files(finished_study, tmp_path, capsys):
    path, directory = finished_study
    moved = tmp_path / "elsewhere"
    shutil.copytree(directory, moved)
    stored = sqlite3.connect(moved / "study.sqlite").execute("SELECT output_dir FROM runs").fetchall()
    assert all(not Path(p).is_absolute() for (p,) in stored)  # relative to the study directory
    (directory / "runs").rename(directory / "runs-gone")  # the original's files are not read
    try:
        code, _, _ = run(["report", moved], capsys)
        assert code == 0
        text = (moved / "report.md").read_text()
        assert "files missing" not in text and "Headline table" in text
    finally:
        (directory / "runs-gone").rename(directory / "runs")


def test_deleted_run_directory_is_reported_then_trained_again(finished_study, tmp_path, capsys):
    path, original = finished_study
    directory = tmp_path / "s"
    shutil.copytree(original, directory)
    victim = sorted((directory / "runs").iterdir())[0]
    shutil.rmtree(victim)
    assert run(["report", directory], capsys)[0] == 0
    assert f"`{victim.name}`" in (directory / "report.md").read_text()
    assert "finished, files missing" in (directory / "report.md").read_text()
    code, out, _ = run(["study", path, "--dir", directory, "--status", "--json"], capsys)  # says what is true
    states = {r["id"]: r["status"] for r in json.loads(out.strip().splitlines()[-1])["per_run"]}
    assert code == 0 and states[victim.name] == "to retrain" and "its run directory is gone" in out
    code, out, _ = run(["study", path, "--dir", directory, "--json"], capsys)
    assert code == 0 and f"run {victim.name} was finished but its run directory is gone" in out
    assert json.loads(out.strip().splitlines()[-1])["finished"] == 2 and (victim / "run.json").exists()


def test_an_empty_database_beside_finished_runs_is_not_an_empty_study(finished_study, tmp_path, capsys):
    path, original = finished_study
    directory = tmp_path / "s"
    shutil.copytree(original, directory)
    (directory / "study.sqlite").write_bytes(b"")
    for argv in (["study", path, "--dir", directory, "--status"], ["report", directory]):
        expect_error(argv, capsys, "not a usable study database", "the file is empty", "--rebuild-db")


def test_damaged_database_is_rebuilt_from_the_run_directories(finished_study, tmp_path, capsys):
    path, original = finished_study
    directory = tmp_path / "s"
    shutil.copytree(original, directory)
    db = directory / "study.sqlite"
    db.write_bytes(db.read_bytes()[:1000])
    for argv in (["study", path, "--dir", directory, "--status"], ["report", directory]):
        expect_error(argv, capsys, "not a usable study database", "--rebuild-db")
    code, out, _ = run(["study", path, "--dir", directory, "--rebuild-db", "--json"], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["finished"] == 2 and result["pending"] == 0
    assert Path(result["set_aside"]).exists()
    code, out, _ = run(["study", path, "--dir", directory, "--status", "--json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["finished"] == 2
    assert run(["report", directory], capsys)[0] == 0
    healthy = db.read_bytes()
    expect_error(["study", path, "--dir", directory, "--rebuild-db"], capsys, "passes SQLite's integrity check",
                 "nothing to rebuild")  # a usable database is not moved aside as "damaged"
    assert db.read_bytes() == healthy and len(list(directory.glob("study.sqlite.damaged-*"))) == 1


def test_status_of_a_run_whose_driver_was_killed(finished_study, tmp_path, capsys):
    """A run left "running" by a driver killed with -9 shows as stopped, not as running under the dead driver."""
    path, original = finished_study
    directory = tmp_path / "s"
    shutil.copytree(original, directory)
    gone = subprocess.Popen(["true"])  # a driver pid that has exited
    gone.wait()
    db = sqlite3.connect(directory / "study.sqlite")
    rid = db.execute("SELECT id FROM runs ORDER BY id LIMIT 1").fetchone()[0]
    db.execute("UPDATE runs SET status='running', owner=?, lease_until=?, step=3, total_steps=9 WHERE id=?",
               (f"{socket.gethostname()}:{gone.pid}:abcd1234", time.time() + 600, rid))
    db.commit()
    db.close()
    code, out, _ = run(["study", path, "--dir", directory, "--status", "--json"], capsys)
    per_run = {r["id"]: r for r in json.loads(out.strip().splitlines()[-1])["per_run"]}
    assert code == 0 and per_run[rid]["status"] == "stopped"
    assert "is gone: the next qatune study resumes it" in out


def test_model_that_cannot_be_loaded(tmp_path, tiny_models, small_squad, capsys):
    base = ["train", "--train-data", small_squad, "--output-dir", tmp_path / "o", *TINY, "--model"]
    expect_error([*base, tmp_path / "typo" / "model"], capsys, "no such model directory")
    expect_error([*base, small_squad], capsys, "a file, not a model")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_models["distilbert"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    expect_error([*base, damaged], capsys, "weights file is damaged", "copy or download the model again")
    (damaged / "config.json").write_text("{bad")
    expect_error([*base, damaged], capsys, "config.json", "not a valid JSON")


def test_files_of_the_wrong_kind(tmp_path, small_squad, capsys):
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    for path, what in ((tmp_path, "is a directory"), (latin, "not UTF-8")):
        expect_error(["study", path], capsys, str(path), "study file", what)
        expect_error(["train", "--config", path, "--train-data", small_squad], capsys, str(path), "config file", what)
    table = tmp_path / "t.toml"
    table.write_text("grid = 3\n[[arms]]\nname = 'a'\nmodel = 'm'\nstrategy = 'full'\n")
    expect_error(["study", table, "--dry-run"], capsys, "grid must be a [grid] table")
    expect_error(["study", study_file(tmp_path, small_squad), "--dir", "/proc/no/such"], capsys,
                 "cannot create the study directory /proc/no/such")
    expect_error(["train", "--train-data", small_squad, "--output-dir", "/proc/no/such", *TINY], capsys,
                 "cannot write to output_dir /proc/no/such")
    expect_error(["train", "--train-data", small_squad, "--train-articles", "1", "--eval-data", small_squad,
                  "--eval-articles", "2-3", "--eval-questions", "1000", "--output-dir", tmp_path / "o", *TINY], capsys,
                 "eval_articles / eval_questions", "asked for 1000 questions but only 8")


def test_training_on_the_test_articles_is_refused(tmp_path, small_squad, capsys):
    """The test articles are never trained on: overlapping ranges of one file are refused with the options, before
    anything is created or loaded; another file holding a training article is refused when the data loads."""
    from qatune.data.squad import write_squad_json

    argv = ["train", "--train-data", small_squad, "--train-articles", "1-2", "--eval-data", small_squad,
            "--eval-articles", "2-3", "--output-dir", tmp_path / "out", *TINY]
    _, _, err = run(argv, capsys)
    assert err.strip() == (f"error: option eval_articles = '2-3' is not allowed: eval_articles '2-3' overlaps "
                           f"train_articles '1-2' of {small_squad} in article 2: give train_articles and "
                           f"eval_articles that do not overlap (flag --eval-articles)")
    expect_error(argv, capsys, "eval_articles '2-3' overlaps train_articles '1-2'")  # exit 2
    assert not (tmp_path / "out").exists()
    other = tmp_path / "dev-v2.0.json"
    write_squad_json(make_examples()[4:], other)  # articles 2 and 3 of the training file, under their titles
    expect_error([*argv[:5], "--eval-data", other, "--output-dir", tmp_path / "out", *TINY], capsys,
                 f"{other} (all articles): 1 test article(s) are also training articles of {small_squad} "
                 f"(train_articles '1-2'), by title: 'Article_1'", "choose eval_data / eval_articles apart")


def test_debug_shows_the_traceback(tmp_path, small_squad):
    from qatune.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_size = 0"):
        main(["--debug", "train", "--train-data", str(small_squad), "--batch-size", "0"])


def test_device_this_machine_lacks(finished_run, tmp_path, small_squad, capsys):
    out, _ = finished_run
    for device, words in (("cuda:99", "is not on this machine; it has: cpu"), ("gpu0", "is not a device name")):
        expect_error(["evaluate", "--model", out, "--data", small_squad, "--output-dir", tmp_path / "e", "--device",
                      device], capsys, *words)
