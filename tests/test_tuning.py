"""Tuning each arm inside a study: successive halving (or a grid) over candidates compared on validation F1, the
chosen value's runs with every seed, and nothing chosen on the test data."""

import json

import pytest

from qatune.config import TrainConfig
from qatune.launch import LocalLauncher
from qatune.study import run_study
from qatune.studyfile import StudyError, load_study
from qatune.train import train
from qatune.tuning import at_edge, expected_max, planned_steps, rungs, stable_from, survivors
from tests.runs import db_rows


def test_halving_rungs_and_the_steps_they_save():
    assert rungs(9, 90, 10) == [10, 30, 90]
    assert rungs(9, 90, 10, method="grid") == [90]
    assert rungs(3, 90, 10) == [30, 90] and rungs(1, 90, 10) == [90]
    assert rungs(9, 100, 8) == [16, 40, 100]  # rounded up to steps every run evaluates at
    assert [survivors(9, 3, False), survivors(3, 3, False), survivors(3, 3, True), survivors(2, 3, False)] == [3, 1, 1, 1]
    # 9 candidates: 9 x 10 steps, then 3 go on 20 more, then 1 goes on 60 more; the grid trains 9 x 90
    assert planned_steps(9, [10, 30, 90], 3) == 90 + 60 + 60 == 210
    assert planned_steps(9, [90], 3) == 810


def test_expected_maximum_equals_a_hand_computation():
    assert expected_max([3.0, 1.0, 2.0], 1) == pytest.approx(2.0)  # one draw: the mean
    assert expected_max([1.0, 2.0, 3.0], 2) == pytest.approx(1 * 1 / 9 + 2 * 3 / 9 + 3 * 5 / 9)
    assert expected_max([1.0, 2.0, 3.0], 50) == pytest.approx(3.0, abs=1e-8)


def test_the_budget_from_which_the_order_of_two_arms_holds():
    def curve(values):
        return [{"trials": n, "expected_f1": v} for n, v in enumerate(values, 1)]

    # a leads at 1 trial, b from 2 trials on: the order of the largest budget holds from 2
    assert stable_from(curve([50, 52, 53, 54]), curve([49, 53, 55, 56])) == 2
    assert stable_from(curve([50, 52]), curve([40, 41, 42])) == 1  # a leads throughout (shortest curve counts)
    assert stable_from(curve([50, 52, 53]), curve([51, 51, 54])) == 3  # it flips twice: only the last budget
    assert stable_from([], curve([1])) is None


def test_a_choice_at_the_edge_of_its_range_is_flagged():
    assert at_edge([1e-4, 3e-4, 1e-3], 1e-3) and at_edge([1e-4, 3e-4, 1e-3], 1e-4)
    assert not at_edge([1e-4, 3e-4, 1e-3], 3e-4)
    assert not at_edge(["fixed", "rslora"], "rslora")  # not a range


STUDY = """
[study]
name = "tuned"

[defaults]
train_data = "{data}"
train_articles = "1-3"
validation_share = 0.34
eval_data = "{test}"
eval_articles = "{test_articles}"
max_seq_length = 96
doc_stride = 32
batch_size = 4
precision = "fp32"
max_steps = 9
save_steps = 100
eval_steps = 1

[[arms]]
name = "full"
model = "{model}"
strategy = "full"

[tune]
method = "{method}"
eta = 3

[tune.full]
learning_rate = {rates}

[grid]
seed = [1, 2]
"""


def write(tmp_path, model, data, rates, method="halving", test=None, test_articles="4"):
    path = tmp_path / f"{method}.toml"
    path.write_text(STUDY.format(data=data, model=model, rates=rates, method=method, test=test or data,
                                 test_articles=test_articles))
    return path


def test_tune_table_mistakes_are_refused(tmp_path, tiny_models, train_file):
    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-3, 2e-3]")
    text = path.read_text()
    for old, new, words in [("[tune.full]", "[tune.nope]", "no arm named 'nope'"),
                            ('method = "halving"', 'method = "bayes"', "choose one of halving, grid"),
                            ("eta = 3", "eta = 1", "eta = 1 must be a whole number >= 2"),
                            ("learning_rate = [1e-3, 2e-3]", "learning_rate = [1e-3, 1e-3]", "distinct values"),
                            ("seed = [1, 2]", "seed = [1, 2]\nlearning_rate = [1e-3]", "also a [grid] axis"),
                            ("validation_share = 0.34\n", "", "needs validation data")]:
        path.write_text(text.replace(old, new))
        with pytest.raises(StudyError, match=None) as e:
            load_study(path, directory=tmp_path / "s")
        assert words in str(e.value), (words, str(e.value))


def test_set_replaces_the_values_an_arm_tries(tmp_path, tiny_models, train_file):
    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-3, 2e-3]")
    (group,) = load_study(path, ["full.learning_rate=[1e-4, 3e-4, 1e-3]"], directory=tmp_path / "s").groups
    assert [values for values, _ in group.candidates] == [{"learning_rate": v} for v in (1e-4, 3e-4, 1e-3)]
    (group,) = load_study(path, ["learning_rate=5e-4"], directory=tmp_path / "s").groups  # one value: no tuning left
    assert [values for values, _ in group.candidates] == [{"learning_rate": 5e-4}] and group.schedule == [9]
    for bad in ("full.learning_rate=[]", "full.learning_rate=[1e-3, 1e-3]"):
        with pytest.raises(StudyError, match=r"--set .*full tunes learning_rate; give the distinct values it tries"):
            load_study(path, [bad], directory=tmp_path / "s")
    with pytest.raises(StudyError, match=r"learning_rate = 'abc'"):  # a value of the wrong type, checked as any
        load_study(path, ["full.learning_rate=abc"], directory=tmp_path / "s")


@pytest.fixture(scope="module")
def halving_study(tmp_path_factory, tiny_models, train_file):
    tmp = tmp_path_factory.mktemp("halving")
    rates = "[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]"
    study = load_study(write(tmp, tiny_models["distilbert"], train_file, rates), directory=tmp / "s")
    counts = run_study(study, LocalLauncher(workers=2, threads=1), poll_s=0.1, progress=False)
    return study, counts


def test_halving_with_nine_candidates_trains_the_expected_steps_per_rung(halving_study):
    study, counts = halving_study
    (group,) = study.groups
    assert group.schedule == [1, 3, 9]
    assert counts == {"finished": 2, "pruned": 8}  # the chosen candidate and its second seed
    by_id = db_rows(study.directory)
    candidates = [by_id[run.id] for _, run in group.candidates]
    reached = sorted(len(json.loads(r["scores"])) for r in candidates)
    assert reached == [1] * 6 + [2] * 2 + [3]  # 9 at step 1, 3 at step 3, 1 to the end
    for r in candidates:
        steps = [s["step"] for s in json.loads(r["scores"])]
        assert steps == [1, 3, 9][: len(steps)]
    winner = next(r for r in candidates if r["stage"] == "chosen")
    record = json.loads((study.directory / "runs" / winner["id"] / "run.json").read_text())
    assert record["timing"]["resumed_from_step"] == 9  # it paused at the end, then only its test evaluation ran
    # its training time is that of every attempt (rung by rung), not of the last one, which trained no step
    assert record["timing"]["train_s_total"] > record["timing"]["train_s"] >= 0
    assert winner["costs"] and json.loads(winner["costs"])["train_s"] == record["timing"]["train_s_total"]
    rungs_scores = {s["rung"]: s["f1"] for s in json.loads(winner["scores"])}
    assert rungs_scores[2] == record["validation"]["f1"]  # chosen on the validation F1 of the model it keeps
    # its final run with the other seed exists and finished; no pruned candidate was scored on the test data
    finals = [r for r in by_id.values() if r["grp"] is None]
    assert len(finals) == 1 and finals[0]["status"] == "finished"
    assert json.loads(finals[0]["config"])["learning_rate"] == record["config"]["learning_rate"]
    assert not any((study.directory / "runs" / r["id"] / "predictions.json").exists()
                   for r in candidates if r["stage"] == "pruned")


def test_a_promoted_candidate_ends_exactly_as_an_unpruned_run(halving_study, tmp_path):
    study, _ = halving_study
    winner = next(r for r in db_rows(study.directory).values() if r["stage"] == "chosen")
    config = json.loads(winner["config"])
    straight = train(TrainConfig(**{**config, "output_dir": str(tmp_path / "straight"), "resume": False,
                                    "pause_at": None, "feature_cache_dir": None}), progress=False)
    paused = json.loads((study.directory / "runs" / winner["id"] / "run.json").read_text())
    assert straight.metrics == paused["metrics"] and straight.curve == paused["curve"]
    assert straight.validation == paused["validation"]
    assert json.loads((tmp_path / "straight" / "predictions.json").read_text()) == \
        json.loads((study.directory / "runs" / winner["id"] / "predictions.json").read_text())


def test_the_choice_does_not_depend_on_the_test_data(tmp_path, tiny_models, train_file):
    from qatune.data import write_squad_json
    from tests.conftest import make_examples

    other = tmp_path / "other-test.json"
    write_squad_json(make_examples(n_articles=2, per_article=5, seed=7), other)
    results = []
    for k, (test, articles) in enumerate([(train_file, "4"), (other, "1-2")]):
        d = tmp_path / f"t{k}"
        d.mkdir()
        study = load_study(write(d, tiny_models["distilbert"], train_file, "[1e-4, 1e-3, 1e-2]", method="grid",
                                 test=test, test_articles=articles), directory=d / "s")
        run_study(study, LocalLauncher(workers=2, threads=1), poll_s=0.1, progress=False)
        by_id = db_rows(d / "s")
        results.append(({json.loads(r["config"])["learning_rate"]: json.loads(r["scores"])
                          for r in by_id.values() if r["grp"]},
                         next(json.loads(r["config"])["learning_rate"] for r in by_id.values()
                              if r["stage"] == "chosen")))
    assert results[0] == results[1]  # the same validation scores, the same chosen learning rate


def test_the_report_shows_the_tuning_on_validation_and_the_expected_maximum(halving_study, capsys):
    from qatune.cli import main

    study, _ = halving_study
    assert main(["report", str(study.directory), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (t,) = out["tuning"]
    winner = next(r for r in db_rows(study.directory).values() if r["stage"] == "chosen")
    assert t["arm"] == "full" and t["option"] == "learning_rate" and len(t["tried"]) == 9
    assert t["chosen"] == json.loads(winner["config"])["learning_rate"]
    assert t["at_edge"] == (t["chosen"] in (1e-5, 1e-1))
    final = [x["validation_f1"] for x in t["tried"]]
    curve = out["expected_max"]["full"]
    assert [p["trials"] for p in curve] == list(range(1, 10))
    assert curve[0]["expected_f1"] == pytest.approx(sum(final) / 9)  # one trial: the mean of those tried
    assert curve[-1]["expected_f1"] <= max(final) + 1e-9
    assert [c["seeds"] for c in out["configurations"]] == [2]  # the chosen value with both seeds; no candidate
    text = (study.directory / "report.md").read_text()
    assert "## Tuning (validation data only)" in text and "Incomplete study" not in text
    assert (study.directory / "expected_max.png").exists()


def test_dry_run_shows_candidates_rungs_and_what_halving_saves(tmp_path, tiny_models, train_file, capsys):
    from qatune.cli import main

    rates = "[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]"
    path = write(tmp_path, tiny_models["distilbert"], train_file, rates)
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), "--dry-run", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    (t,) = json.loads(lines[-1])["tuning"]
    assert t["candidates"] == 9 and t["rungs"] == [1, 3, 9] and t["steps"] == 21 and t["grid_steps"] == 81
    assert any("21 candidate steps instead of 81 for the grid (26%)" in line for line in lines)
    assert not (tmp_path / "s").exists()


def test_the_projection_counts_the_halving_steps_and_the_final_seeds(tmp_path, tiny_models, train_file, monkeypatch):
    """9 candidates (21 halving steps in all), then the chosen value at the second seed (9 steps): the projection
    trains 30 steps, not the grid's 9 x 9 + 9, and only the chosen runs are tested."""
    import qatune.calibrate
    from qatune.plan import RUN_OVERHEAD_S, WINDOWS_PER_QUESTION, dry_run, estimate, project

    rates = "[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]"
    study = load_study(write(tmp_path, tiny_models["distilbert"], train_file, rates), directory=tmp_path / "s")
    monkeypatch.setattr(qatune.calibrate, "calibrate", lambda keys, **kw: dict.fromkeys(keys, 2.0))
    proj = project(study, slots=1, threads=1, progress=False)
    cands, finals = [p for p in proj["per_run"] if not p.get("final")], [p for p in proj["per_run"] if p.get("final")]
    assert len(cands) == 9 and len(finals) == 1 and finals[0]["point"]["seed"] == 2
    assert sum(p["steps"] for p in cands) == pytest.approx(21) and finals[0]["steps"] == 9
    test = estimate(study.runs[0])["eval_windows"]
    assert test > 0
    cfg = study.runs[0].config  # batch 4, a curve point every step on eval_subset (all) questions
    curve = test if not cfg.eval_subset else cfg.eval_subset * WINDOWS_PER_QUESTION
    one = lambda steps, tested: RUN_OVERHEAD_S + steps * 2.0 + (tested + int(steps // 1) * curve) * 2.0 / 4 / 3  # noqa: E731
    assert proj["serial_hours"] * 3600 == pytest.approx(9 * one(21 / 9, test / 9) + one(9, test))
    plan = dry_run(study)
    grid = sum(estimate(r)["train_pflop"] for r in study.runs) + estimate(study.runs[0])["train_pflop"]
    assert plan["summary"]["total_pflop"] == pytest.approx(grid * 30 / 90)


def test_a_study_in_epochs_places_its_rungs_on_the_estimated_steps_and_ends_each_run_at_its_own_end(
        tmp_path, tiny_models, train_file):
    """With epochs instead of max_steps the rungs come from the estimated steps (question count x windows per
    question, which here overcounts: the validation articles are held out of it); a candidate at the last rung still
    trains to its real end, so the chosen run is the same as an unpruned one."""
    from qatune.sizes import optimizer_steps

    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-4, 1e-3, 1e-2]")
    path.write_text(path.read_text().replace("max_steps = 9", "epochs = 2"))
    study = load_study(path, directory=tmp_path / "s")
    (group,) = study.groups
    estimated = optimizer_steps(group.candidates[0][1].config)
    assert group.schedule == [-(-estimated // 3), estimated]
    counts = run_study(study, LocalLauncher(workers=2, threads=1), poll_s=0.1, progress=False)
    assert counts == {"finished": 2, "pruned": 2}
    by_id = db_rows(study.directory)
    winner = next(r for r in by_id.values() if r["stage"] == "chosen")
    record = json.loads((study.directory / "runs" / winner["id"] / "run.json").read_text())
    real_end = record["curve"][-1]["step"]
    assert real_end != estimated  # the estimate was off, and the run went to its own end regardless
    assert [s["step"] for s in json.loads(winner["scores"])] == [group.schedule[0], real_end]
    final = next(r for r in by_id.values() if r["grp"] is None)
    assert json.loads((study.directory / "runs" / final["id"] / "run.json").read_text())["curve"][-1]["step"] == real_end
