"""Reports on constructed results (predictions written directly, no training) and one tiny trained v2 study."""

import base64
import hashlib
import json
import re
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qatune.answer.metrics import squad_v1, squad_v2
from qatune.cli import main
from qatune.config import config_id
from qatune.data.squad import load_squad, write_squad_json
from qatune.report.configs import selection_part
from qatune.rundir import RunDir
from qatune.study import store
from qatune.study.driver import run_study
from qatune.study.studyfile import load_study
from tests.conftest import make_examples, save_tiny_model

ARMS = """
[study]
name = "constructed"
headline = ["full", "lora"]

[defaults]
train_data = "{train}"
eval_data = "{data}"
max_steps = 2

[[arms]]
name = "full"
model = "minilm-l6"
strategy = "full"

[[arms]]
name = "lora"
model = "minilm-l6"
strategy = "lora"

[grid]
{grid}
"""


def write_eval(tmp_path: Path, version: str = "1.1") -> Path:
    path = tmp_path / f"eval-{version}.json"
    write_squad_json(make_examples(n_articles=10, per_article=12, unanswerable=30 if version == "2.0" else 0), path,
                     version=version)
    return path


def construct(tmp_path: Path, grid: str, accuracy, arms: str = ARMS, curve=None, version: str = "1.1",
              directory: str = "s", key=lambda run: [run.arm, run.point]) -> Path:
    """A study whose runs "finished" with predictions drawn from ``accuracy(run, qid) -> P(correct)``, with
    random draws seeded by ``key(run)`` (runs with one key and one accuracy predict alike)."""
    data = write_eval(tmp_path, version)
    train = tmp_path / "train.json"  # articles of their own: the test articles are never trained on
    write_squad_json([replace(ex, title=f"Train_{ex.article}") for ex in make_examples(n_articles=2)], train)
    path = tmp_path / "study.toml"
    path.write_text(arms.format(data=data, train=train, grid=grid))
    study = load_study(path, directory=tmp_path / directory)
    db = store.connect(study.directory)
    store.register(db, study.runs)
    store.register_grid(db, study.name, str(path), study.headline, [r.id for r in study.runs])
    examples = load_squad(data).examples
    refs = {ex.id: [a.text for a in ex.answers] for ex in examples}
    for run in study.runs:
        # seeded by what the run is, not by its id (which depends on this test's temporary paths)
        text = json.dumps(key(run), sort_keys=True)
        rng = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
        preds = {}
        for ex in examples:
            right = rng.random() < accuracy(run, ex.id)
            preds[ex.id] = (ex.answers[0].text if ex.answers else "") if right else "a wrong answer"
        out = Path(run.config.output_dir)
        out.mkdir(parents=True)
        (out / "predictions.json").write_text(json.dumps(preds))
        metrics = squad_v2(refs, preds, na_probs=dict.fromkeys(preds, 0.0)) if version == "2.0" else squad_v1(refs, preds)
        costs = {"trainable_params": 1000, "total_params": 10000, "trainable_percent": 10.0, "train_s": 5.0,
                 "train_questions": run.point.get("train_questions", 100), "train_flops": 1e12,
                 "train_flop_per_s": 2e11, "train_windows_per_s": 10.0, "peak_rss_mb": 100.0}
        points = curve(run) if curve else []
        u = rng.random(len(examples))  # nested: a question right at one F1 stays right at a higher one
        for p in points:
            RunDir(out).write_question_scores(p["step"], {ex.id: 100.0 * (x < p["f1"] / 100)
                                                          for ex, x in zip(examples, u)})
        db.execute("UPDATE runs SET status='finished', metrics=?, costs=?, curve=? WHERE id=?",
                   (json.dumps(metrics), json.dumps(costs), json.dumps(points), run.id))
    db.close()
    return path


def report_json(capsys, directory: Path, *extra: str) -> dict:
    assert main(["report", str(directory), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_learning_rate_grid_gives_separate_configurations_and_removed_values_leave_the_report(tmp_path, capsys):
    grid = "learning_rate = [1e-3, 2e-3]\nseed = [1]"
    full_only = re.sub(r'headline = .*\n|\[\[arms\]\]\nname = "lora"\n.*\n.*\n\n', "", ARMS)
    path = construct(tmp_path, grid, lambda run, q: 0.5, arms=full_only)
    out = report_json(capsys, tmp_path / "s")
    assert [len(c["seeds"]) for c in out["configurations"]] == [1, 1]
    assert sorted(c["point"]["learning_rate"] for c in out["configurations"]) == [1e-3, 2e-3]
    assert all("seed" not in c["point"] and len(c["run_ids"]) == 1 for c in out["configurations"])
    # the study file loses a grid value; running it again registers its grid, and the report follows it
    path.write_text(path.read_text().replace("[1e-3, 2e-3]", "[1e-3]"))
    assert run_study(load_study(path, directory=tmp_path / "s"), progress=False) == {"finished": 1}
    out = report_json(capsys, tmp_path / "s")
    assert [c["point"]["learning_rate"] for c in out["configurations"]] == [1e-3]
    assert out["other_rows"] == 1
    assert "1 other row(s)" in (tmp_path / "s" / "report.md").read_text()
    assert len(report_json(capsys, tmp_path / "s", "--all-runs")["configurations"]) == 2


def test_seeds_of_one_configuration_are_averaged_and_nothing_else(tmp_path, capsys):
    construct(tmp_path, "lora_rank = [2]\nseed = [1, 2, 3]", lambda run, q: 0.6)
    out = report_json(capsys, tmp_path / "s")
    by_arm = {c["arm"]: c for c in out["configurations"]}
    assert len(by_arm["lora"]["seeds"]) == len(by_arm["full"]["seeds"]) == 3
    ids = {config_id(r["config"]) for r in store.rows(store.connect(tmp_path / "s")) if r["arm"] == "lora"}
    assert ids == {by_arm["lora"]["id"]}
    f1 = by_arm["lora"]["f1"]
    assert f1["ci_low"] < f1["mean"] < f1["ci_high"]


def test_headline_chooses_on_selection_questions_and_tests_on_the_rest(tmp_path, capsys):
    """r=4 is best on the selection questions, r=8 on the test questions and overall: the report must pick r=4
    (chosen blind to the test part) and test full − r=4 on test questions only."""
    def accuracy(run, q):
        if run.arm == "full":
            return 0.7
        sel = selection_part(q)
        return {2: 0.5, 4: 1.0 if sel else 0.3, 8: 0.85 if sel else 1.0}[run.config.lora_rank]

    construct(tmp_path, "lora_rank = [2, 4, 8]\nseed = [1]", accuracy)
    out = report_json(capsys, tmp_path / "s")
    rank_of = {c["id"]: c["point"].get("lora_rank") for c in out["configurations"]}
    overall = max((c for c in out["configurations"] if c["arm"] == "lora"), key=lambda c: c["f1"]["mean"])
    assert overall["point"]["lora_rank"] == 8
    (comp,) = out["comparisons"]
    assert rank_of[comp["b"]] == 4 and comp["candidates"] == [1, 3]
    split = json.loads((tmp_path / "s" / "split.json").read_text())
    selection, test = set(split["selection"]), set(split["test"])
    assert not selection & test and len(selection) == comp["selection_questions"] > 0
    assert len(test) == comp["test_questions"] == comp["f1"]["questions"] > 0
    assert len(selection | test) == out["questions"] == 120
    rows = {r["id"]: r for r in store.rows(store.connect(tmp_path / "s"))}
    full = next(c for c in out["configurations"] if c["arm"] == "full")
    data = load_squad(tmp_path / "eval-1.1.json")
    refs = {ex.id: [a.text for a in ex.answers] for ex in data.examples if ex.id in test}

    def f1_on_test(config):
        preds = json.loads((Path(rows[config["run_ids"][0]]["output_dir"]) / "predictions.json").read_text())
        return squad_v1(refs, {q: p for q, p in preds.items() if q in test})["f1"]

    b = next(c for c in out["configurations"] if c["id"] == comp["b"])
    assert comp["f1"]["diff"] == pytest.approx(f1_on_test(full) - f1_on_test(b))
    assert comp["f1"]["ci_low"] <= comp["f1"]["diff"] <= comp["f1"]["ci_high"]
    assert "chosen on the other" in (tmp_path / "s" / "report.md").read_text()


@pytest.mark.parametrize("gap", [0.0, 0.45])
def test_findings_claim_only_what_the_interval_supports(tmp_path, capsys, gap):
    # no gap: both arms answer alike; a gap: the full arm is right far more often
    construct(tmp_path, "lora_rank = [2]\nseed = [1]", lambda run, q: 0.5 + (gap if run.arm == "full" else 0.0),
              key=lambda run: [run.point["seed"], run.arm if gap else ""])
    out = report_json(capsys, tmp_path / "s")
    f1 = out["comparisons"][-1]["f1"]
    supported = f1["ci_low"] > 0 or f1["ci_high"] < 0
    text = (tmp_path / "s" / "report.md").read_text()
    findings = text.split("## Findings")[1].split("## Figures")[0]
    assert supported == (gap > 0)  # the constructed cases: no difference, and a large one
    assert ("beats" in findings) == supported
    assert ("not distinguishable" in findings) == (not supported)


def test_rank_family_is_holm_adjusted_and_volume_interaction_has_an_interval(tmp_path, capsys):
    def accuracy(run, q):
        v = run.point["train_questions"]
        if run.arm == "full":
            return 0.2 if v == 100 else 0.95  # full fine-tuning gains much more from data
        return 0.5

    construct(tmp_path, "lora_rank = [2, 4]\nalpha_policy = ['fixed', 'rslora']\ntrain_questions = [100, 400]\n"
                        "seed = [1]", accuracy)
    out = report_json(capsys, tmp_path / "s")
    ranks = out["tests"]["rank"]
    assert len(ranks) == 4  # 2 policies x 2 volumes
    raw = sorted(t["p"] for t in ranks)
    assert min(t["p_holm"] for t in ranks) == pytest.approx(min(1.0, 4 * raw[0]))
    assert all(t["p_holm"] >= t["p"] for t in ranks)
    inter = out["tests"]["volume_interaction"]
    assert inter["train_questions"] == [100, 400]
    assert inter["f1"]["ci_low"] > 30  # the gap grows by about 75 points: the interval says so
    assert "More data helps **full** more" in (tmp_path / "s" / "report.md").read_text()


def test_html_is_one_page_with_every_figure_inline(tmp_path, capsys):
    construct(tmp_path, "lora_rank = [2, 4]\ntrain_questions = [100, 400]\nseed = [1]", lambda run, q: 0.6,
              curve=lambda run: [{"step": 1, "windows": 10, "exact_match": 20.0, "f1": 30.0},
                                 {"step": 2, "windows": 20, "exact_match": 40.0, "f1": 50.0}])
    (tmp_path / "s" / "expected_max.png").write_bytes(b"an earlier report's figure")  # the study no longer tunes
    out = report_json(capsys, tmp_path / "s")
    assert set(out["figures"]) == {"rank_sweep.png", "data_volume.png", "learning_curves.png", "pareto.png"}
    assert {p.name for p in (tmp_path / "s").glob("*.png")} == set(out["figures"])  # the stale one removed
    page = Path(out["html"]).read_text()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert len(sources) == len(out["figures"])
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in page and "Findings" in page
    assert "were still improving at their budget" in page  # every run's curve still rose 20 points at its end
    assert all([e["state"] for e in c["ended"]] == ["improving"] for c in out["configurations"])
    assert all(e["ci"][0] > 0 for c in out["configurations"] for e in c["ended"])


def test_rank_at_layer_width_is_marked(tmp_path, capsys):
    construct(tmp_path, "lora_rank = [2, 384]\nseed = [1]", lambda run, q: 0.5)
    out = report_json(capsys, tmp_path / "s")
    notes = {c["point"].get("lora_rank"): c["notes"] for c in out["configurations"]}
    assert notes[2] == [] and "min(d_in, d_out)" in notes[384][0]  # MiniLM-L6's 384-wide layers
    assert "r=384 ‡" in (tmp_path / "s" / "report.md").read_text()


@pytest.mark.slow
def test_tiny_v2_study_curves_mlflow_and_report(tmp_path, capsys):
    """Two tiny trained runs on SQuAD v2 data with learning curves, logged to MLflow by the study driver."""
    model = save_tiny_model(tmp_path / "distilbert", "distilbert")
    data = tmp_path / "v2.json"
    write_squad_json(make_examples(n_articles=4, per_article=5, unanswerable=6), data, version="2.0")
    path = tmp_path / "v2.toml"
    path.write_text(f"""
[study]
name = "tiny-v2"

[defaults]
train_data = "{data}"
train_articles = "3-4"
validation_share = 0.5
eval_data = "{data}"
eval_articles = "1-2"
max_seq_length = 96
doc_stride = 32
batch_size = 4
precision = "fp32"
max_steps = 2
eval_steps = 1
eval_subset = 4
report_to = "mlflow"
learning_rate = 1e-3

[[arms]]
name = "full"
model = "{model}"
strategy = "full"

[[arms]]
name = "lora"
model = "{model}"
strategy = "lora"
lora_rank = 2
""")
    study = load_study(path, directory=tmp_path / "s")
    assert run_study(study, poll_s=0.1, progress=False) == {"finished": 2}
    for run in study.runs:
        curve = json.loads((Path(run.config.output_dir) / "run.json").read_text())["curve"]
        assert [p["step"] for p in curve] == [1, 2] and curve[1]["windows"] > curve[0]["windows"] > 0
        assert all(0 <= p["f1"] <= 100 for p in curve)
    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    assert all(len(json.loads(c)) == 2 for (c,) in db.execute("SELECT curve FROM runs"))

    out = report_json(capsys, tmp_path / "s")
    assert out["squad_version"] == "2.0" and out["questions"] == 10  # 6 unanswerable, 4 answerable
    for c in out["configurations"]:
        record = json.loads((tmp_path / "s" / "runs" / c["run_ids"][0] / "run.json").read_text())
        assert c["f1"]["mean"] == pytest.approx(record["metrics"]["f1"])  # per-question v2 scores, averaged
        assert c["squad_v2"]["NoAns_f1"] == pytest.approx(record["metrics"]["NoAns_f1"])
        assert c["squad_v2"]["best_f1_thresh"] == pytest.approx(record["metrics"]["best_f1_thresh"])
    assert "learning_curves.png" in out["figures"]
    text = (tmp_path / "s" / "report.md").read_text()
    assert "SQuAD v2.0 rules" in text and "HasAns F1" in text and "NoAns F1" in text

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-v2")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`qatune.role` = 'study'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(r.id for r in study.runs)
    lora = next(c for c in children if c.data.params["arm"] == "lora")
    assert lora.data.params["strategy"] == "lora" and lora.data.params["lora_rank"] == "2"
    assert lora.data.params["learning_rate"] == "0.001"
    record = json.loads((tmp_path / "s" / "runs" / lora.info.run_name / "run.json").read_text())
    assert lora.data.metrics["f1"] == pytest.approx(record["metrics"]["f1"])
    assert "HasAns_total" in lora.data.metrics and lora.data.metrics["train_s"] > 0
    history = client.get_metric_history(lora.info.run_id, "curve_f1")
    assert [m.step for m in history] == [1, 2]
    assert len(client.get_metric_history(lora.info.run_id, "train_loss")) >= 1


def test_finished_run_without_its_files_is_listed_not_read(tmp_path, capsys):
    import shutil

    construct(tmp_path, "lora_rank = [2]\nseed = [1, 2]", lambda run, q: 0.5)
    victim = sorted((tmp_path / "s" / "runs").iterdir())[0]
    shutil.rmtree(victim)
    out = report_json(capsys, tmp_path / "s")
    assert out["finished"] == 3 and victim.name not in {i for c in out["configurations"] for i in c["run_ids"]}
    text = (tmp_path / "s" / "report.md").read_text()
    assert f"`{victim.name}`" in text and "finished, files missing" in text


def test_runs_whose_inference_cost_failed_are_listed(tmp_path, capsys):
    construct(tmp_path, 'lora_rank = [8]\ntrain_questions = [100]', lambda run, qid: 0.5)
    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    (rid, costs), = db.execute("SELECT id, costs FROM runs WHERE arm = 'lora'").fetchall()
    costs = json.loads(costs) | {"inference": {"error": "ExportError: merging the LoRA adapter changed the logits"}}
    db.execute("UPDATE runs SET costs = ? WHERE id = ?", (json.dumps(costs), rid))
    db.commit()
    db.close()
    summary = report_json(capsys, tmp_path / "s")
    assert summary["inference_cost_failures"] == [{"run": rid, "error": costs["inference"]["error"]}]
    md = (tmp_path / "s" / "report.md").read_text()
    assert "## What each model costs to run" in md and "Not measured for 1 run(s)" in md
    assert f"`{rid}`: ExportError: merging the LoRA adapter changed the logits" in md


FOUR_CELLS = """
[study]
name = "factorial"
headline = ["small-full", "large-lora"]

[defaults]
train_data = "{train}"
eval_data = "{data}"
max_steps = 2

[[arms]]
name = "small-full"
model = "minilm-l6"
num_layers = 3
strategy = "full"

[[arms]]
name = "small-lora"
model = "minilm-l6"
num_layers = 3
strategy = "lora"

[[arms]]
name = "large-full"
model = "minilm-l6"
strategy = "full"

[[arms]]
name = "large-lora"
model = "minilm-l6"
strategy = "lora"

[grid]
{grid}
"""


def test_factorial_effects_equal_a_hand_computation(tmp_path, capsys):
    accuracy = {"small-full": 0.7, "small-lora": 0.15, "large-full": 0.6, "large-lora": 0.62}
    construct(tmp_path, "lora_rank = [8]\nseed = [1]", lambda run, q: accuracy[run.arm], arms=FOUR_CELLS)
    out = report_json(capsys, tmp_path / "s")
    (f,) = out["factorial"]
    small, large = "minilm-l6 (3 layers)", "minilm-l6"
    assert f["models"] == [small, large] and f["methods"] == ["full", "lora"] and f["reference"] == "full"
    db = store.connect(tmp_path / "s")
    rows = {r["arm"]: r for r in store.rows(db)}
    db.close()
    refs = {ex.id: [a.text for a in ex.answers] for ex in load_squad(tmp_path / "eval-1.1.json").examples}

    def per_question(arm):  # the official metric (in percent), question by question
        preds = json.loads((Path(rows[arm]["output_dir"]) / "predictions.json").read_text())
        return np.array([squad_v1({q: refs[q]}, {q: preds[q]})["f1"] for q in sorted(refs)])

    s_full, s_lora, l_full, l_lora = (per_question(a) for a in ("small-full", "small-lora", "large-full", "large-lora"))
    assert f["cells"][small]["full"] == pytest.approx(s_full.mean())
    assert f["method_effect"][small]["lora"]["diff"] == pytest.approx((s_full - s_lora).mean())
    assert f["method_effect"][large]["lora"]["diff"] == pytest.approx((l_full - l_lora).mean())
    assert f["model_effect"]["full"]["diff"] == pytest.approx((s_full - l_full).mean())
    assert f["model_effect"]["lora"]["diff"] == pytest.approx((s_lora - l_lora).mean())
    assert f["interaction"]["lora"]["diff"] == pytest.approx((s_full - s_lora - l_full + l_lora).mean())
    effect = f["method_effect"][small]["lora"]
    assert effect["ci_low"] < effect["diff"] < effect["ci_high"] and effect["p"] < 0.05  # 55 points apart
    # one Holm family for the verdict: the headline(s) and the five effects
    family = out["verdict_family"]
    assert "model × method interaction (full FT − LoRA) at 100" in family
    assert len(family) == 5 + len(out["comparisons"])
    effects = [*(e for m in f["method_effect"].values() for e in m.values()), *f["model_effect"].values(),
               *f["interaction"].values(),
               *(c["f1"] for c in out["comparisons"])]
    smallest = min(e["p"] for e in effects)
    assert min(e["p_holm"] for e in effects) == pytest.approx(min(1.0, len(family) * smallest))
    assert all(e["p_holm"] >= e["p"] for e in effects)
    assert "## Model and method: two factors" in (tmp_path / "s" / "report.md").read_text()
    assert (tmp_path / "s" / "factorial.png").exists()


def test_a_diagonal_study_says_its_factors_are_confounded(tmp_path, capsys):
    diagonal = re.sub(r'\[\[arms\]\]\nname = "(small-lora|large-full)"\n(.*\n){2,3}\n', "", FOUR_CELLS)
    assert diagonal.count("[[arms]]") == 2
    construct(tmp_path, "lora_rank = [8]\nseed = [1]", lambda run, q: 0.5, arms=diagonal)
    out = report_json(capsys, tmp_path / "s")
    assert out["factorial"] == [] and "confounded" in out["factorial_note"]
    assert "The model and method effects are confounded" in (tmp_path / "s" / "report.md").read_text()


def test_four_cells_one_without_results_says_which_not_confounded(tmp_path, capsys):
    construct(tmp_path, "lora_rank = [8]\nseed = [1]", lambda run, q: 0.5, arms=FOUR_CELLS)
    db = store.connect(tmp_path / "s")
    db.execute("UPDATE runs SET status='failed', metrics=NULL, error='TrainingError: non-finite loss' "
               "WHERE arm='small-lora'")
    db.close()
    out = report_json(capsys, tmp_path / "s")
    note = out["factorial_note"]
    assert out["factorial"] == [] and "confounded" not in note and "add the other cells" not in note
    assert "need all 4 cells" in note and "lora has no finished run yet" in note


def test_with_validation_scores_the_headline_chooses_on_them_and_every_question_tests(tmp_path, capsys):
    """The LoRA rank that is better on the test questions is not the one chosen: validation F1 chooses."""
    construct(tmp_path, "lora_rank = [8, 16]\nseed = [1]",
              lambda run, q: 0.8 if run.point.get("lora_rank") == 16 else (0.4 if run.arm == "lora" else 0.6))
    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    for rid, point, costs in db.execute("SELECT id, point, costs FROM runs").fetchall():
        rank = json.loads(point).get("lora_rank")
        validation = {"f1": {8: 70.0, 16: 50.0}.get(rank, 60.0), "best_step": 2, "keep": "best"}
        db.execute("UPDATE runs SET costs = ? WHERE id = ?", (json.dumps(json.loads(costs) | {"validation": validation}),
                                                              rid))
    db.commit()
    db.close()
    out = report_json(capsys, tmp_path / "s")
    labels = {c["id"]: c["label"] for c in out["configurations"]}
    (comp,) = out["comparisons"]
    assert labels[comp["b"]].startswith("lora r=8")  # validation's pick, though r=16 scores higher on the test data
    assert comp["test_questions"] == out["questions"] == 120 and comp["split"]["on"] == "validation"
    assert not (tmp_path / "s" / "split.json").exists()
    assert "chosen on its runs' validation F1" in (tmp_path / "s" / "report.md").read_text()


def test_with_a_tuned_learning_rate_each_rank_is_tested_at_its_own_chosen_value(tmp_path, capsys):
    """r=2 chose lr 1e-3 and r=4 chose 2e-3: the rank test compares those two, not ranks at one learning rate."""
    arms = ARMS.replace("max_steps = 2", "max_steps = 2\nvalidation_share = 0.2\neval_steps = 1") + \
        "\n[tune.lora]\nlearning_rate = [1e-3, 2e-3]\n"
    construct(tmp_path, "lora_rank = [2, 4]\nseed = [1]", arms=arms,
              accuracy=lambda run, q: 0.9 if run.point.get("lora_rank") == 4 else 0.3)
    study = load_study(tmp_path / "study.toml", directory=tmp_path / "s")
    db = store.connect(study.directory)
    pick = {2: 1e-3, 4: 2e-3}
    for g in study.groups:
        for values, run in g.candidates:
            chosen = values["learning_rate"] == pick[g.point["lora_rank"]]
            db.execute("UPDATE runs SET grp=?, stage=?, scores=? WHERE id=?",
                       (g.id, "chosen" if chosen else "pruned",
                        json.dumps([{"rung": 0, "step": 2, "f1": 60.0 if chosen else 40.0}]), run.id))
        db.execute("INSERT INTO decisions (grp, chosen, decided_at) VALUES (?, ?, 0)",
                   (g.id, json.dumps({"learning_rate": pick[g.point["lora_rank"]]})))
    db.commit()
    db.close()
    out = report_json(capsys, tmp_path / "s")
    (test,) = out["tests"]["rank"]
    assert test["ranks"] == [2, 4] and test["fixed"] == {} and test["tuned"] == ["learning_rate"]
    assert test["tuned_values"] == [{"learning_rate": 1e-3}, {"learning_rate": 2e-3}]
    assert test["f1"][1] > test["f1"][0] + 40 and test["p_holm"] < 0.05
    assert "each rank at its own tuned lr (r=2: 0.001, r=4: 0.002)" in (tmp_path / "s" / "report.md").read_text()


def test_seeds_are_shown_and_the_headline_is_never_narrower_than_welch_on_the_run_means(tmp_path, capsys):
    """2 arms x 3 seeds whose runs differ a lot from seed to seed: every configuration lists its per-seed test F1
    (the runs' own metrics), and the headline interval contains Welch's t interval on the six per-seed F1."""
    from scipy import stats

    construct(tmp_path, "lora_rank = [2]\nseed = [1, 2, 3]",
              lambda run, q: {1: 0.3, 2: 0.6, 3: 0.9}[run.point["seed"]] - (0.1 if run.arm == "lora" else 0.0))
    out = report_json(capsys, tmp_path / "s")
    rows = {r["id"]: r for r in store.rows(store.connect(tmp_path / "s"))}
    per_seed = {}
    for c in out["configurations"]:
        assert [s["seed"] for s in c["seeds"]] == [1, 2, 3]
        assert [s["f1"] for s in c["seeds"]] == [rows[rid]["metrics"]["f1"] for rid in c["run_ids"]]
        assert c["f1"]["mean"] == pytest.approx(np.mean([s["f1"] for s in c["seeds"]]))
        per_seed[c["arm"]] = [s["f1"] for s in c["seeds"]]
    (comp,) = out["comparisons"]
    welch = stats.ttest_ind(per_seed["full"], per_seed["lora"], equal_var=False).confidence_interval()
    assert comp["f1"]["ci_low"] <= welch.low + 1e-9 and comp["f1"]["ci_high"] >= welch.high - 1e-9
    assert comp["f1"]["seed_share"] > 0.5 and comp["f1"]["articles"] == 10  # 10 articles of 12 questions
    text = (tmp_path / "s" / "report.md").read_text()
    assert " / ".join(f"{f:.1f}" for f in per_seed["full"]) in text  # the table's per-seed column
    assert main(["report", str(tmp_path / "s")]) == 0
    assert "q, 3 seed(s)): F1" in capsys.readouterr().out  # the printed summary counts them


def test_the_verdict_family_is_holm_adjusted_and_tiny_p_values_are_bounds(tmp_path, capsys):
    construct(tmp_path, "lora_rank = [2]\nseed = [1]", lambda run, q: 0.95 if run.arm == "full" else 0.05,
              key=lambda run: [run.point["seed"], run.arm])
    out = report_json(capsys, tmp_path / "s")
    (comp,) = out["comparisons"]
    assert out["verdict_family"] == ["headline at 100 questions"]
    assert comp["f1"]["p_holm"] == pytest.approx(comp["f1"]["p"]) and comp["f1"]["p"] < 1e-4
    findings = (tmp_path / "s" / "report.md").read_text().split("## Findings")[1]
    assert "p < 0.0001, Holm p < 0.0001 over the 1 claims of the verdict" in findings


def test_a_claim_near_the_five_percent_line_is_called_borderline_either_side():
    """Two fresh runs of the offline study put one effect at Holm p 0.049 and 0.053: both reports must say that the
    wording is the threshold's (and claims far from it are not listed)."""
    from qatune.report.stats import Contrast
    from qatune.report.text import _borderline

    def claim(p_holm):
        return Contrast(25.3, 15.0, 35.6, p_holm / 6, 600, (3, 3), 12, 4.0, 4.0, 0.9, p_holm)

    for p in (0.0486, 0.0528):
        text = _borderline([("model effect with full", claim(p)), ("headline", claim(0.33)), ("rank", claim(0.001))])
        assert "model effect with full +25.30 [+15.00, +35.60]" in text and f"Holm p = {p:.4f}" in text
        assert "headline" not in text and "rank" not in text
    assert _borderline([("far", claim(0.2)), ("strong", claim(0.01))]) is None


def test_compare_verdicts_flags_a_sign_flip_and_not_a_shift_within_the_intervals(tmp_path, capsys, monkeypatch):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_verdicts.py"
    spec = importlib.util.spec_from_file_location("compare_verdicts", path)
    cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cv)

    def report(diff, lo, hi, p_holm):
        c = {"diff": diff, "ci_low": lo, "ci_high": hi, "p": p_holm / 6, "p_holm": p_holm}
        return {"comparisons": [{"a_label": "x", "b_label": "y", "f1": c}], "factorial": [], "tests": {"rank": []},
                "tuning": []}

    files = []
    for k, r in enumerate([report(25.4, 15.4, 35.4, 0.049), report(25.3, 14.8, 35.8, 0.053),
                           report(-20.0, -30.0, -10.0, 0.001), report(20.0, 10.0, 30.0, 0.001)]):
        files.append(tmp_path / f"{k}.json")
        files[-1].write_text("progress line\n" + json.dumps(r))
    for pair, code, words in [((0, 1), 0, "differs in significance"), ((2, 3), 1, "CONTRADICTS")]:
        monkeypatch.setattr("sys.argv", ["compare_verdicts.py", str(files[pair[0]]), str(files[pair[1]])])
        assert cv.main() == code
        out = capsys.readouterr().out
        assert words in out and f"contradictions: {code}" in out
    (tmp_path / "bad.json").write_text('{"comparisons":')
    for bad, words in [(tmp_path / "none.json", "cannot read it"), (tmp_path / "bad.json", "qatune report DIR --json")]:
        monkeypatch.setattr("sys.argv", ["compare_verdicts.py", str(bad), str(files[0])])
        with pytest.raises(SystemExit) as e:
            cv.main()
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_each_configuration_says_whether_it_ended_on_a_plateau_or_still_improving(tmp_path, capsys):
    rising = {"full": [30.0, 50.0], "lora": [50.0, 50.5]}  # full still gains 20 points; LoRA within the noise
    construct(tmp_path, "lora_rank = [2]\nseed = [1, 2]", lambda run, q: 0.5, key=lambda run: [run.arm, run.point],
              curve=lambda run: [{"step": s, "windows": 10 * s, "exact_match": f, "f1": f}
                                 for s, f in zip((1, 2), rising[run.arm])])
    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    rid, costs = next((i, json.loads(c)) for i, a, c in db.execute("SELECT id, arm, costs FROM runs") if a == "lora")
    costs["validation"] = {"stopped_at": 2, "best_step": 2, "f1": 50.5}  # this seed's early stopping fired
    with db:
        db.execute("UPDATE runs SET costs=? WHERE id=?", (json.dumps(costs), rid))
    out = report_json(capsys, tmp_path / "s")
    ended = {c["arm"]: sorted(e["state"] for e in c["ended"]) for c in out["configurations"]}
    assert ended == {"full": ["improving", "improving"], "lora": ["early stop", "plateau"]}
    md = (tmp_path / "s" / "report.md").read_text()
    assert "2 of 4 runs with a learning curve were still improving at their budget" in md
    assert "## Convergence" in md and "early stop (1/2), plateau (1/2)" in md
    assert "training FLOPs (counted): every configuration at one cost" in md  # equal compute: no front to draw


def test_a_gain_inside_the_noise_is_rarely_called_improving_and_a_real_one_is_found(tmp_path):
    """Simulated curves with a known truth: two evaluations of equally good models (questions flip either way
    at random) are called "improving" at most about 2.5% of the time; a 6-point gain on 600 questions nearly always."""
    from qatune.report.convergence import IMPROVING, ending

    rng = np.random.default_rng(0)
    qids = [f"q{i}" for i in range(600)]

    def called_improving(gain: float, trials: int = 200) -> float:
        hits = 0
        for t in range(trials):
            d = RunDir(tmp_path / f"{gain}-{t}")
            d.path.mkdir(parents=True)
            before = rng.random(600) < 0.4
            flip = rng.random(600) < 0.15  # another checkpoint: some questions change either way
            after = np.where(flip, rng.random(600) < 0.4 + gain / 100, before)
            d.write_question_scores(1, dict(zip(qids, 100.0 * before)))
            d.write_question_scores(2, dict(zip(qids, 100.0 * after)))
            curve = [{"step": 1, "f1": 100 * before.mean()}, {"step": 2, "f1": 100 * after.mean()}]
            e = ending({"curve": curve, "costs": {}, "output_dir": str(d.path)})
            hits += e.state == IMPROVING
        return hits / trials

    assert called_improving(0.0) <= 0.05
    assert called_improving(40.0) >= 0.9  # flipped questions right 80% of the time instead of 40: +6 points


THREE_METHODS = re.sub(r'headline = .*\n', "", ARMS).replace(
    "[grid]", '[[arms]]\nname = "bitfit"\nmodel = "minilm-l6"\nstrategy = "bitfit"\n\n[grid]')


def test_three_methods_on_one_model_each_against_the_reference_with_fronts_across_them(tmp_path, capsys):
    accuracy = {"full": 0.7, "lora": 0.65, "bitfit": 0.2}
    construct(tmp_path, "lora_rank = [8]\nseed = [1, 2]", lambda run, q: accuracy[run.arm], arms=THREE_METHODS,
              key=lambda run: [run.arm, run.point])
    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    params = {"full": 22_000_000, "lora": 300_000, "bitfit": 100_000}  # what each method trains
    for rid, arm, costs in db.execute("SELECT id, arm, costs FROM runs").fetchall():
        c = json.loads(costs)
        c.update(trainable_params=params[arm], train_flops={"full": 3e12, "lora": 2e12, "bitfit": 1.9e12}[arm])
        db.execute("UPDATE runs SET costs=? WHERE id=?", (json.dumps(c), rid))
    db.commit()
    db.close()
    out = report_json(capsys, tmp_path / "s")
    (f,) = out["factorial"]
    assert f["models"] == ["minilm-l6"] and f["methods"] == ["full", "lora", "bitfit"] and f["reference"] == "full"
    effects = f["method_effect"]["minilm-l6"]
    assert set(effects) == {"lora", "bitfit"} and f["model_effect"] == {} and f["interaction"] == {}
    cells = f["cells"]["minilm-l6"]
    assert effects["bitfit"]["diff"] == pytest.approx(cells["full"] - cells["bitfit"])
    assert effects["bitfit"]["ci_low"] > 0  # 50 points apart: full fine-tuning is better
    # the headline (full vs LoRA, the first two arms) is the factorial's LoRA effect: one claim of the family, not two
    assert out["verdict_family"] == ["headline at 100 questions = full FT − LoRA on minilm-l6 at 100",
                                     "full FT − BitFit on minilm-l6 at 100"]
    (headline,) = out["comparisons"]
    assert headline["f1"]["p_holm"] == effects["lora"]["p_holm"]
    ps = sorted([effects["lora"]["p"], effects["bitfit"]["p"]])
    assert max(effects["lora"]["p_holm"], effects["bitfit"]["p_holm"]) == pytest.approx(max(ps[1], min(1.0, 2 * ps[0])))
    # fronts across methods: by trainable parameters every method is on it (cheaper is worse), by FLOPs too
    front = [p["method"] for p in out["pareto"]["trainable_params"]]
    assert front == ["bitfit", "lora", "full"]
    assert [p["method"] for p in out["pareto"]["train_flops"]] == ["bitfit", "lora", "full"]
    assert "latency_ms" not in out["pareto"]  # not measured
    md = (tmp_path / "s" / "report.md").read_text()
    assert "## Model and method: two factors" in md and "| full FT − BitFit |" in md and "## Pareto fronts" in md
    assert "training FLOPs (counted): bitfit" in md and " → lora" in md
