"""Tuning each arm inside a study: successive halving (or a grid) over candidates compared on validation F1 at a
seed of their own, the chosen values' fresh runs with every seed, and nothing chosen on the test data."""

import json
import math
import sqlite3
from pathlib import Path

import pytest

from qatune.config import TrainConfig
from qatune.report.tuningsummary import at_edge, expected_max, stable_from
from qatune.study.driver import decide, run_study
from qatune.study.launch import LocalLauncher
from qatune.study.studyfile import StudyError, load_study
from qatune.study.tuning import planned_steps, promote, rungs, survivors, tuning_seed
from qatune.train.recipe import train
from tests.conftest import owners
from tests.runs import db_rows


def test_halving_rungs_and_the_steps_they_save():
    assert rungs(9, 90, 10) == [10, 30, 90]
    assert rungs(9, 90, 10, method="grid") == [90]
    assert rungs(3, 90, 10) == [30, 90] and rungs(1, 90, 10) == [90]
    assert rungs(9, 100, 8) == [16, 40, 100]  # rounded up to steps every run evaluates at
    assert [survivors(9, 3, False), survivors(3, 3, False), survivors(3, 3, True), survivors(2, 3, False)] == [3, 1, 1, 1]
    # 9 candidates: 9 x 10 steps, then 3 go on 20 more, and one is left: chosen at step 30, none trains to 90
    assert planned_steps(9, [10, 30, 90], 3) == 90 + 60 == 150
    assert planned_steps(3, [30, 90], 3) == 90  # 3 or 4 candidates: one survives the first rung, chosen there
    assert planned_steps(6, [30, 90], 3) == 180 + 2 * 60  # two survive: they train to the end, the best wins
    assert planned_steps(9, [90], 3) == 810 and planned_steps(2, [90], 3) == 180
    assert planned_steps(1, [90], 3) == 0  # a lone candidate is chosen without training


def test_candidates_train_at_a_seed_that_no_final_run_has():
    assert tuning_seed([1, 2, 3]) == 0 and tuning_seed([0, 1, 2]) == 3 and tuning_seed([0, 2]) == 1
    assert tuning_seed([42]) == 0


def test_a_rung_decision_promotes_the_best_of_those_that_set_out():
    scores = [("a", 10.0), ("b", 30.0), ("c", 30.0), ("d", 5.0)]
    assert promote(scores, 4, 3, last=False) == (["b"], True)  # one left: chosen before the last rung
    assert promote(scores, 6, 3, last=False) == (["b", "c"], False)  # 6 set out, 2 go on (the first of equals first)
    assert promote(scores[:1], 6, 3, last=False) == (["a"], True)  # the others failed: the one that reached it
    assert promote(scores, 4, 3, last=True) == (["b"], True)


def test_expected_maximum_equals_a_hand_computation():
    assert expected_max([3.0, 1.0, 2.0], 1) == pytest.approx((2.0, (2 / 3) ** 0.5))  # one draw: the mean (and SD)
    assert expected_max([1.0, 2.0, 3.0], 2)[0] == pytest.approx(1 * 1 / 9 + 2 * 3 / 9 + 3 * 5 / 9)
    assert expected_max([1.0, 2.0, 3.0], 50) == pytest.approx((3.0, 0.0), abs=1e-4)


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
                            ("validation_share = 0.34\n", "", "needs validation data"),
                            ("learning_rate = [1e-3, 2e-3]", "lora_rank = [2, 4]",
                             f"lora_rank: cannot be tuned: lora_rank is an option of {owners('lora_rank')}; arm 'full' "
                             "fine-tunes with full"),
                            ("learning_rate = [1e-3, 2e-3]", "validation_share = [0.2, 0.4]",
                             "validation_share: cannot be tuned: not a training hyperparameter"),
                            ("learning_rate = [1e-3, 2e-3]", "eval_questions = [5, 10]", "eval_questions: cannot be"),
                            ("learning_rate = [1e-3, 2e-3]", "pause_at = [1, 2]", "pause_at: cannot be tuned"),
                            ("learning_rate = [1e-3, 2e-3]", "learning_rat = [1e-3, 2e-3]",
                             "learning_rat: unknown option (did you mean learning_rate?)"),
                            ("eta = 3", "eta = 3\nlearning_rate = [1e-3, 2e-3]",
                             "[tune] itself takes method and eta; the options to tune go in a table per arm, e.g. "
                             "[tune.full]")]:
        path.write_text(text.replace(old, new))
        with pytest.raises(StudyError, match=None) as e:
            load_study(path, directory=tmp_path / "s")
        assert words in str(e.value), (words, str(e.value))
    # an arm may be called like a [tune] setting: its table is its own
    path.write_text(text.replace('name = "full"', 'name = "eta"').replace("[tune.full]", "[tune.eta]")
                    .replace("eta = 3\n", ""))
    study = load_study(path, directory=tmp_path / "s")
    assert study.eta == 3 and [g.arm for g in study.groups] == ["eta"] and len(study.groups[0].candidates) == 2


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


def test_candidates_and_final_runs_are_different_runs_and_rungs_score_every_validation_question(
        tmp_path, tiny_models, train_file):
    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-3, 2e-3]")
    study = load_study(path, directory=tmp_path / "s")
    (group,) = study.groups
    assert group.seeds == [1, 2] and group.tuning_seed == 0
    assert all(run.config.seed == 0 and run.point["seed"] == 0 for _, run in group.candidates)
    finals = [group.run({"learning_rate": 2e-3}, seed) for seed in group.seeds]
    assert {r.id for r in finals}.isdisjoint(run.id for _, run in group.candidates)
    assert study.final_runs == 2 and "2 tuning candidates in 1 configurations); 2 final runs" in study.size()
    # the file sets no eval_subset: the candidates' curves (the rungs) and the final runs' score all validation questions
    assert all(r.config.eval_subset is None for r in [*finals, *(run for _, run in group.candidates)])
    for extra in (["eval_subset=50"], ["full.eval_subset=50"]):  # set by the file or --set: kept
        (group,) = load_study(path, extra, directory=tmp_path / "s").groups
        assert all(run.config.eval_subset == 50 for _, run in group.candidates)
    path.write_text(path.read_text().replace("eval_steps = 1\n", "eval_steps = 1\neval_subset = 7\n"))
    (group,) = load_study(path, directory=tmp_path / "s").groups
    assert all(run.config.eval_subset == 7 for _, run in group.candidates)


# ---------------------------------------------------------------------------------------------- rung decisions
def _store_with(tmp_path, tiny_models, train_file, rates: str):
    """A study's store with its candidates registered, decided by hand (no training)."""
    from qatune.study import store

    study = load_study(write(tmp_path, tiny_models["distilbert"], train_file, rates), directory=tmp_path / "s")
    (group,) = study.groups
    db = store.connect(study.directory)
    store.register(db, study.runs)
    return db, group, [run.id for _, run in group.candidates], {run.id: v for v, run in group.candidates}


def _reach(db, rid, step, f1):
    scores = json.loads(db.execute("SELECT scores FROM runs WHERE id=?", (rid,)).fetchone()[0] or "[]") + \
        [{"step": step, "f1": f1}]
    db.execute("UPDATE runs SET status='pending', stage='paused', scores=? WHERE id=?", (json.dumps(scores), rid))


def _fail(db, rid, error="TrainingError: non-finite loss (nan) at step 2"):
    db.execute("UPDATE runs SET status='failed', attempts=1, error=? WHERE id=?", (error, rid))


def test_a_rung_whose_last_candidate_failed_is_decided_among_those_that_reached_it(tmp_path, tiny_models, train_file):
    from qatune.study import store, tuningstate

    db, group, ids, values = _store_with(tmp_path, tiny_models, train_file, "[1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]")
    assert group.schedule == [3, 9]
    take = lambda: decide(db, group, 3)  # noqa: E731
    for k, rid in enumerate(ids[:4]):
        _reach(db, rid, 3, [10.0, 40.0, 30.0, 20.0][k])
    _fail(db, ids[4])
    assert take() is None  # one is still on its way
    _fail(db, ids[5])  # the last one fails too: the rung is decided among the four that reached it
    assert take() is None  # 6 set out, 2 go on, to the end
    st = store.statuses(db, ids)
    assert [st[rid] for rid in ids] == ["pruned", "pending", "pending", "pruned", "pruned", "pruned"]
    assert store.claim(db, ids, store.Owner.new(), 60, 1, "w") == ids[1]  # the promoted ones train on
    _fail(db, ids[1])
    _reach(db, ids[2], 9, 31.0)
    decision = take()  # at the last rung one reached the end: it wins
    assert decision.chosen == values[ids[2]] and decision.winner == ids[2] and decision.step == 9 and decision.new
    assert store.statuses(db, ids)[ids[2]] == "winner" and store.statuses(db, ids)[ids[1]] == "pruned"
    assert tuningstate.decisions(db) == {group.id: values[ids[2]]} and tuningstate.failed_decisions(db) == {}
    assert store.claim(db, ids, store.Owner.new(), 60, 1, "w") is None  # a winner is never claimed
    again = take()
    assert again.chosen == values[ids[2]] and not again.new
    assert store.retry_failed(db, ids) == 0  # failed candidates of a decided rung are pruned: nothing to retry


def test_a_rung_that_no_candidate_reached_fails_its_configuration_until_retried(tmp_path, tiny_models, train_file):
    from qatune.study import store, tuningstate

    db, group, ids, values = _store_with(tmp_path, tiny_models, train_file, "[1e-3, 2e-3, 3e-3]")
    for rid in ids:
        _fail(db, rid)
    decision = decide(db, group, 3)
    assert decision.chosen is None and decision.new
    assert decision.error.startswith("no candidate reached step 3 (rung 1 of 2): ") and "non-finite loss" in decision.error
    assert all(rid in decision.error for rid in ids)
    assert tuningstate.decisions(db) == {} and tuningstate.failed_decisions(db) == {group.id: decision.error}
    assert set(store.statuses(db, ids).values()) == {"failed"}
    assert store.retry_failed(db, ids) == 3 and tuningstate.failed_decisions(db) == {}  # undecided again
    assert decide(db, group, 3) is None  # its candidates train again
    assert store.claim(db, ids, store.Owner.new(), 60, 1, "w") == ids[0]


def test_a_lone_candidate_is_chosen_without_training(tmp_path, tiny_models, train_file):
    from qatune.study import store, tuningstate

    db, group, ids, values = _store_with(tmp_path, tiny_models, train_file, "[1e-3]")
    decision = decide(db, group, 3)
    assert decision.chosen == {"learning_rate": 1e-3} and decision.step is None
    assert store.statuses(db, ids) == {ids[0]: "winner"}
    from qatune.report.tuningsummary import summarize

    (entry,) = summarize(store.rows(db), tuningstate.decisions(db))  # the report's entry names its option and value
    assert entry["option"] == "learning_rate" and entry["chosen"] == 1e-3
    assert [t["value"] for t in entry["tried"]] == [1e-3]


# ---------------------------------------------------------------------------------------------- studies
@pytest.fixture(scope="module")
def halving_study(tmp_path_factory, tiny_models, train_file):
    tmp = tmp_path_factory.mktemp("halving")
    rates = "[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]"
    study = load_study(write(tmp, tiny_models["distilbert"], train_file, rates), directory=tmp / "s")
    counts = run_study(study, LocalLauncher(workers=2, threads=1), poll_s=0.1, progress=False)
    return study, counts


def test_halving_with_nine_candidates_is_decided_when_one_is_left_and_every_seed_is_a_fresh_run(halving_study):
    study, counts = halving_study
    (group,) = study.groups
    assert group.schedule == [1, 3, 9]
    assert counts == {"finished": 2, "pruned": 8, "winner": 1}  # the chosen values at both seeds; no candidate
    by_id = db_rows(study.directory)
    candidates = [by_id[run.id] for _, run in group.candidates]
    reached = sorted(len(json.loads(r["scores"])) for r in candidates)
    assert reached == [1] * 6 + [2] * 3  # 9 at step 1, 3 at step 3: one left there, so none trains to step 9
    for r in candidates:
        steps = [s["step"] for s in json.loads(r["scores"])]
        assert steps == [1, 3][: len(steps)]
        assert json.loads(r["config"])["seed"] == 0  # the tuning seed, none of the final seeds
        # no candidate is test-evaluated or finished
        assert r["status"] == "pending" and not (study.directory / "runs" / r["id"] / "run.json").exists()
        assert not (study.directory / "runs" / r["id"] / "predictions.json").exists()
    (winner,) = [r for r in candidates if r["stage"] == "winner"]
    assert max(s["step"] for s in json.loads(winner["scores"])) == 3
    chosen = {"learning_rate": json.loads(winner["config"])["learning_rate"]}
    db = sqlite3.connect(study.directory / "study.sqlite")
    (row,) = db.execute("SELECT chosen, winner, step, failed FROM decisions").fetchall()
    assert (json.loads(row[0]), row[1], row[2], row[3]) == (chosen, winner["id"], 3, None)
    # the final runs: every seed, each a fresh run of the chosen values, none of them a candidate
    finals = [r for r in by_id.values() if r["grp"] is None]
    assert sorted(json.loads(r["config"])["seed"] for r in finals) == [1, 2]
    assert {r["id"] for r in finals} == {group.run(chosen, seed).id for seed in (1, 2)}
    assert not {r["id"] for r in finals} & {r["id"] for r in candidates}
    for r in finals:
        record = json.loads((study.directory / "runs" / r["id"] / "run.json").read_text())
        assert r["status"] == "finished" and record["timing"]["resumed_from_step"] == 0
        assert record["config"]["learning_rate"] == chosen["learning_rate"] and record["curve"][-1]["step"] == 9
    assert json.loads(db.execute("SELECT run_ids FROM grids ORDER BY seq DESC").fetchone()[0])[-2:] == \
        [group.run(chosen, seed).id for seed in (1, 2)]  # the report's grid covers them


def test_question_scores_are_saved_at_every_curve_step(halving_study):
    from qatune.rundir import RunDir

    study, _ = halving_study
    by_id = db_rows(study.directory)
    winner = next(r for r in by_id.values() if r["stage"] == "winner")
    final = next(r for r in by_id.values() if r["grp"] is None)
    for r, steps in [(winner, [1, 2, 3]), (final, list(range(1, 10)))]:
        run_dir = RunDir(study.directory / "runs" / r["id"])
        scores = run_dir.read_question_scores()
        curve = json.loads((run_dir.path / "curve.json").read_text())
        assert sorted(scores) == steps == [p["step"] for p in curve]  # the paused-and-resumed winner kept step 1
        for point in curve:  # each question's F1 (0-100): their mean is the curve's F1
            per_question = scores[point["step"]]
            assert len(per_question) == 6 and all(0 <= f1 <= 100 for f1 in per_question.values())
            assert sum(per_question.values()) / len(per_question) == pytest.approx(point["f1"])
        assert json.loads((run_dir.path / "question_scores.json").read_text()).keys() == {str(s) for s in steps}


def test_question_scores_file_merges_steps_and_reads_back_empty_when_damaged(tmp_path):
    from qatune.rundir import RunDir

    run_dir = RunDir(tmp_path)
    assert run_dir.read_question_scores() == {}
    for step in (2, 1, 3):
        run_dir.write_question_scores(step, {"q1": 50.0 * (step % 2), "q2": 100.0})
    assert run_dir.read_question_scores() == {1: {"q1": 50.0, "q2": 100.0}, 2: {"q1": 0.0, "q2": 100.0},
                                              3: {"q1": 50.0, "q2": 100.0}}
    run_dir.keep_question_scores(2)  # a run resumed from its step-2 checkpoint
    assert sorted(run_dir.read_question_scores()) == [1, 2]
    (tmp_path / "question_scores.json").write_text("{not json")
    assert run_dir.read_question_scores() == {}


def test_a_promoted_candidate_scores_as_one_trained_straight_to_its_rung(halving_study, tmp_path):
    """The winner paused at step 1 and went on from its checkpoint to step 3: a run trained straight to step 3
    with the same (full-run) schedule has the same curve, question scores and rung score."""
    from qatune.errors import Paused
    from qatune.rundir import RunDir

    study, _ = halving_study
    winner = next(r for r in db_rows(study.directory).values() if r["stage"] == "winner")
    config = json.loads(winner["config"])
    with pytest.raises(Paused) as paused:
        train(TrainConfig(**{**config, "output_dir": str(tmp_path / "straight"), "resume": False, "pause_at": 3,
                             "feature_cache_dir": None}), progress=False)
    assert paused.value.step == 3 and paused.value.score == json.loads(winner["scores"])[-1]["f1"]
    ours, straight = RunDir(study.directory / "runs" / winner["id"]), RunDir(tmp_path / "straight")
    assert json.loads((ours.path / "curve.json").read_text()) == json.loads((straight.path / "curve.json").read_text())
    assert ours.read_question_scores() == straight.read_question_scores()
    assert ours.read_pauses() == {1: json.loads(winner["scores"])[0]["f1"], 3: paused.value.score}


def test_a_lost_store_is_rebuilt_with_the_same_choice_and_nothing_retrained(halving_study, tmp_path):
    import shutil

    from qatune.study.driver import rebuild_store

    study, counts = halving_study
    copy = tmp_path / "s"
    shutil.copytree(study.directory, copy)
    (copy / "study.sqlite").write_bytes(b"not a database")
    for suffix in ("-wal", "-shm"):
        (copy / f"study.sqlite{suffix}").unlink(missing_ok=True)
    again = load_study(study.path, directory=copy)
    result = rebuild_store(again)
    assert result["finished"] == 2 and result["tuned"] == 1 and result["pending"] == 0
    old, new = db_rows(study.directory), db_rows(copy)
    assert {k: (r["stage"], r["status"], json.loads(r["scores"] or "null")) for k, r in new.items()} == \
        {k: (r["stage"], r["status"], json.loads(r["scores"] or "null")) for k, r in old.items()}
    assert run_study(again, LocalLauncher(workers=1, threads=1), poll_s=0.1, progress=False) == counts
    assert {k: r["attempts"] for k, r in db_rows(copy).items() if r["grp"] is None} == {
        k: 1 for k, r in old.items() if r["grp"] is None}  # the final runs were not trained again


def test_a_rebuild_without_the_winners_directory_keeps_the_final_runs_and_finds_them_again(halving_study, tmp_path,
                                                                                             capsys):
    import shutil

    from qatune.cli import main

    study, counts = halving_study
    copy = tmp_path / "s"
    shutil.copytree(study.directory, copy)
    old = db_rows(study.directory)
    winner = next(r for r in old.values() if r["stage"] == "winner")
    finals = {k: (copy / "runs" / k / "run.json").stat().st_mtime_ns for k, r in old.items() if r["grp"] is None}
    shutil.rmtree(copy / "runs" / winner["id"])  # its pauses are gone: the choice cannot be replayed
    (copy / "study.sqlite").write_bytes(b"not a database")
    for suffix in ("-wal", "-shm"):
        (copy / f"study.sqlite{suffix}").unlink(missing_ok=True)
    assert main(["study", str(study.path), "--dir", str(copy), "--rebuild-db", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["finished"] == 0 and result["tuned"] == 0 and result["awaiting_choice"] == len(finals) == 2
    again = load_study(study.path, directory=copy)
    assert run_study(again, LocalLauncher(workers=1, threads=1), poll_s=0.1, progress=False) == counts
    new = db_rows(copy)
    assert next(r for r in new.values() if r["stage"] == "winner")["id"] == winner["id"]  # trained again, same choice
    assert {k: (copy / "runs" / k / "run.json").stat().st_mtime_ns for k in finals} == finals  # found, not retrained


def test_the_choice_does_not_depend_on_the_test_data(tmp_path, tiny_models, train_file):
    """A grid: every candidate trains to the end (several are left at the last rung), the best validation F1 wins."""
    from dataclasses import replace

    from qatune.data.squad import write_squad_json
    from tests.conftest import make_examples

    other = tmp_path / "other-test.json"  # other articles (titles apart from the training ones)
    write_squad_json([replace(ex, title=f"Other_{ex.article}") for ex in make_examples(n_articles=2, per_article=5,
                                                                                        seed=7)], other)
    results = []
    for k, (test, articles) in enumerate([(train_file, "4"), (other, "1-2")]):
        d = tmp_path / f"t{k}"
        d.mkdir()
        study = load_study(write(d, tiny_models["distilbert"], train_file, "[1e-4, 1e-3, 1e-2]", method="grid",
                                 test=test, test_articles=articles), directory=d / "s")
        run_study(study, LocalLauncher(workers=2, threads=1), poll_s=0.1, progress=False)
        by_id = db_rows(d / "s")
        scores = {json.loads(r["config"])["learning_rate"]: json.loads(r["scores"]) for r in by_id.values() if r["grp"]}
        assert all([s["step"] for s in v] == [9] for v in scores.values())
        winner = next(r for r in by_id.values() if r["stage"] == "winner")
        assert json.loads(winner["scores"])[0]["f1"] == max(v[0]["f1"] for v in scores.values())
        results.append((scores, json.loads(winner["config"])["learning_rate"]))
    assert results[0] == results[1]  # the same validation scores, the same chosen learning rate


def test_the_report_shows_the_tuning_on_validation_and_the_expected_maximum(halving_study, capsys):
    from qatune.cli import main

    study, _ = halving_study
    assert main(["report", str(study.directory), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (t,) = out["tuning"]
    text = (study.directory / "report.md").read_text()
    winner = next(r for r in db_rows(study.directory).values() if r["stage"] == "winner")
    assert t["arm"] == "full" and t["option"] == "learning_rate" and len(t["tried"]) == 9
    assert t["chosen"] == json.loads(winner["config"])["learning_rate"]
    assert t["at_edge"] == (t["chosen"] in (1e-5, 1e-1))
    first = [x["rungs"][0]["validation_f1"] for x in t["tried"]]  # every candidate at the first rung's budget
    (expected,) = out["expected_max"]
    curve = expected["curve"]
    assert expected["arm"] == "full" and expected["budget_steps"] == 1
    assert [p["trials"] for p in curve] == list(range(1, 10))
    assert curve[0]["expected_f1"] == pytest.approx(sum(first) / 9)  # one trial: the mean of those tried
    assert curve[-1]["expected_f1"] <= max(first) + 1e-9
    # the choice against the runner-up where both were last scored, paired over the validation questions
    rungs = [{r["step"]: r["validation_f1"] for r in x["rungs"]} for x in t["tried"]]  # a rung by its step
    won = next(k for k, x in enumerate(t["tried"]) if x["value"] == t["chosen"])
    last = max(k for k in rungs[won] if sum(k in r for r in rungs) >= 2)
    others = [(r[last], x["value"]) for r, x in zip(rungs, t["tried"]) if last in r and x["value"] != t["chosen"]]
    best_other, runner_up = max(others, key=lambda o: o[0])
    assert t["runner_up"] == runner_up and t["margin"] == pytest.approx(rungs[won][last] - best_other)
    low, high = t["margin_ci"]
    assert low <= t["margin"] + 1e-9 and t["margin"] - 1e-9 <= high  # the mean of the per-question differences
    assert t["separable"] == (low > 0 or high < 0)
    assert "separable" in text and ("cannot separate from the runner-up" in text) == (not t["separable"])
    # the chosen value's final runs with both seeds; no candidate (seed 0)
    assert [sorted(x["seed"] for x in c["seeds"]) for c in out["configurations"]] == [[1, 2]]
    assert "## Tuning (validation data only)" in text and "Incomplete study" not in text
    assert (study.directory / "expected_max.png").exists()


def test_status_shows_candidates_as_tuned_and_the_final_runs(halving_study, capsys):
    from qatune.cli import main

    study, _ = halving_study
    assert main(["study", str(study.path), "--dir", str(study.directory), "--status", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["runs"] == 11 and out["finished"] == 2 and out["winner"] == 1 and out["pruned"] == 8
    assert out["failed_configurations"] == []
    assert [r["status"] for r in out["per_run"]][-3:] == ["pruned", "finished", "finished"]  # finals after candidates
    tuned = [r for r in out["per_run"] if r["status"] in ("pruned", "winner")]
    assert tuned and all(r["step"] == r["rungs"][-1]["step"] > 0 for r in tuned)  # the step each one paused at
    assert main(["study", str(study.path), "--dir", str(study.directory), "--status"]) == 0
    text = capsys.readouterr().out
    assert "2 finished; tuned: 1 winner, 8 pruned" in text
    assert "tuned: validation F1" in text and "at step 3" in text


def test_dry_run_shows_candidates_rungs_and_what_halving_saves(tmp_path, tiny_models, train_file, capsys):
    from qatune.cli import main

    rates = "[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]"
    path = write(tmp_path, tiny_models["distilbert"], train_file, rates)
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), "--dry-run", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    (t,) = json.loads(lines[-1])["tuning"]
    assert t["candidates"] == 9 and t["rungs"] == [1, 3, 9] and t["steps"] == 15 and t["grid_steps"] == 81
    assert t["final_seeds"] == 2 and t["tuning_seed"] == 0
    assert any("at seed 0" in line and "15 candidate steps instead of 81 for the grid (19%)" in line
               and "2 seed(s), each a fresh final run" in line for line in lines)
    assert not (tmp_path / "s").exists()


def test_the_projection_counts_the_halving_steps_and_the_final_seeds(tmp_path, tiny_models, train_file, monkeypatch):
    """9 candidates (15 halving steps in all, none tested), then the chosen value at both seeds (9 steps each): the
    projection trains 33 steps, not the grid's 9 x 9 + 18, and only the final runs are tested."""
    import qatune.study.calibrate
    from qatune.study.plan import RUN_OVERHEAD_S, curve_windows, dry_run, estimate, project
    from qatune.study.sizes import estimate_windows

    rates = "[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]"
    study = load_study(write(tmp_path, tiny_models["distilbert"], train_file, rates), directory=tmp_path / "s")
    monkeypatch.setattr(qatune.study.calibrate, "calibrate", lambda keys, **kw: dict.fromkeys(keys, 2.0))
    monkeypatch.setattr(qatune.study.calibrate, "calibrate_answers", lambda keys, **kw: dict.fromkeys(keys, (0.1, 0.3)))
    proj = project(study, slots=1, threads=1, progress=False)
    cands, finals = [p for p in proj["per_run"] if not p.get("final")], [p for p in proj["per_run"] if p.get("final")]
    assert len(cands) == 9 and [f["point"]["seed"] for f in finals] == [1, 2]
    assert sum(p["steps"] for p in cands) == pytest.approx(15) and [f["steps"] for f in finals] == [9, 9]
    test = estimate(study.runs[0])["eval_windows"]
    assert test > 0
    cfg = study.runs[0].config  # batch 4, a curve point every step on all the validation questions (no eval_subset)
    curve = curve_windows(cfg)
    assert cfg.eval_subset is None and curve == pytest.approx(0.34 * 18)  # the short contexts fit one window
    assert curve == pytest.approx(0.34 * estimate_windows(str(train_file), "train", "1-3", None, 0, "train", 96, 32))
    # a curve point every step and at the end: ceil(steps) points of `curve` windows at 0.1 s, the test at 0.3 s
    one = lambda steps, tested: RUN_OVERHEAD_S + steps * 2.0 + math.ceil(steps) * curve * 0.1 + tested * 0.3  # noqa: E731
    assert proj["serial_hours"] * 3600 == pytest.approx(9 * one(15 / 9, 0) + 2 * one(9, test))
    plan = dry_run(study)
    assert plan["summary"]["total_pflop"] == pytest.approx(estimate(study.runs[0])["train_pflop"] * (15 + 18) / 9)


def test_several_left_at_the_last_rung_train_to_their_own_end_in_epochs(tmp_path, tiny_models, train_file,
                                                                        monkeypatch):
    """With epochs instead of max_steps the rungs come from the estimated steps. The estimate is the real step
    count (windows from the questions' lengths, validation articles held out); skewed to twice the windows here,
    six candidates leave two at the first rung: they train to their real end and the better one wins; the final
    runs end there too."""
    import qatune.study.sizes
    from qatune.study.sizes import optimizer_steps

    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]")
    path.write_text(path.read_text().replace("max_steps = 9", "epochs = 2").replace("seed = [1, 2]", "seed = [1]"))
    true_estimate = optimizer_steps(load_study(path, directory=tmp_path / "s").groups[0].candidates[0][1].config)
    windows = qatune.study.sizes.train_windows
    monkeypatch.setattr(qatune.study.sizes, "train_windows", lambda cfg: 2 * windows(cfg))
    study = load_study(path, directory=tmp_path / "s")
    (group,) = study.groups
    estimated = optimizer_steps(group.candidates[0][1].config)
    assert estimated > true_estimate and group.schedule == [-(-estimated // 3), estimated]
    counts = run_study(study, LocalLauncher(workers=2, threads=1), poll_s=0.1, progress=False)
    assert counts == {"finished": 1, "pruned": 5, "winner": 1}
    by_id = db_rows(study.directory)
    final = next(r for r in by_id.values() if r["grp"] is None)
    real_end = json.loads((study.directory / "runs" / final["id"] / "run.json").read_text())["curve"][-1]["step"]
    assert real_end == true_estimate != estimated  # the skewed estimate was off; the runs went to their own end
    last = [r for r in by_id.values() if r["grp"] and len(json.loads(r["scores"])) == 2]
    assert len(last) == 2 and all([s["step"] for s in json.loads(r["scores"])] == [group.schedule[0], real_end]
                                  for r in last)
    (winner,) = [r for r in last if r["stage"] == "winner"]
    assert json.loads(winner["scores"])[-1]["f1"] == max(json.loads(r["scores"])[-1]["f1"] for r in last)


DIVERGING = """
[[arms]]
name = "other"
model = "{model}"
strategy = "full"
learning_rate = 1e-3
max_steps = 2
"""


def diverging_study(tmp_path, model, data, rates):
    """18 steps, rungs of 3 candidates at [6, 18]; weight decay 1e3 makes a learning rate near 1 flip and grow the
    weights about 900-fold a step, so its loss goes non-finite within a few steps (the others' decay is mild)."""
    path = write(tmp_path, model, data, rates)
    text = path.read_text().replace("max_steps = 9", "max_steps = 18\nweight_decay = 1e3\nwarmup_ratio = 0.0")
    path.write_text(text.replace("seed = [1, 2]", "seed = [1]").replace("[tune]", DIVERGING.format(model=model) + "\n[tune]"))
    return path


def test_a_diverging_last_candidate_is_left_out_and_the_rung_decided_among_the_others(
        tmp_path, tiny_models, train_file, capsys):
    """One worker trains the candidates in order: the two good ones pause at step 6 and wait for the third, which
    fails (non-finite loss) with no attempt left; the rung is decided among the two, and the study ends (exit 0)."""
    from qatune.cli import main

    path = diverging_study(tmp_path, tiny_models["distilbert"], train_file, "[1e-4, 3e-4, 0.9]")
    args = ["study", str(path), "--dir", str(tmp_path / "s"), "--workers", "1", "--threads", "1", "--max-attempts", "1"]
    assert main(args + ["--json"]) == 0
    out = capsys.readouterr().out
    counts = json.loads(out.strip().splitlines()[-1])
    assert {k: counts[k] for k in ("finished", "pruned", "winner")} == {"finished": 2, "pruned": 2, "winner": 1}
    assert "failed" not in counts and "failed_configurations" not in counts
    assert "(a tuning candidate, left out of the choice): TrainingError: non-finite loss" in out
    assert "chose {'learning_rate': 0.0001" in out or "chose {'learning_rate': 0.0003" in out
    study = load_study(path, directory=tmp_path / "s")
    by_id = db_rows(study.directory)
    (group,) = study.groups
    bad = by_id[group.candidates[2][1].id]
    assert bad["stage"] == "pruned" and bad["status"] == "failed" and "non-finite loss" in bad["error"]
    (winner,) = [r for r in by_id.values() if r["stage"] == "winner"]
    assert [s["step"] for s in json.loads(winner["scores"])] == [6]  # one left after the first rung: chosen there
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), "--status"]) == 0
    assert "tuned: validation F1" in capsys.readouterr().out


def test_a_configuration_whose_candidates_all_fail_ends_the_study_with_exit_2_naming_it(
        tmp_path, tiny_models, train_file, capsys):
    from qatune.cli import main
    from qatune.study import store, tuningstate

    path = diverging_study(tmp_path, tiny_models["distilbert"], train_file, "[0.9, 0.8]")
    args = ["study", str(path), "--dir", str(tmp_path / "s"), "--workers", "2", "--threads", "1", "--max-attempts", "1"]
    assert main(args) == 2
    captured = capsys.readouterr()
    study = load_study(path, directory=tmp_path / "s")
    (group,) = study.groups
    assert f"tuning failed for full (its one configuration), configuration {group.id}: no candidate reached the " \
           f"end of its run (rung 1 of 1)" in captured.out
    assert f"failed: tuned configuration {group.id} (full, its one configuration): no candidate reached" in captured.err
    assert "non-finite loss" in captured.err and "error: 2 run(s) failed" in captured.err
    by_id = db_rows(study.directory)
    other = [r for r in by_id.values() if r["arm"] == "other"]
    assert len(other) == 1 and other[0]["status"] == "finished"  # the rest of the study went on
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), "--status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["failed"] == 2 and status["failed_configurations"][0]["configuration"] == group.id
    # --retry-failed: undecided again, its candidates train again (and fail again)
    assert main(args + ["--retry-failed"]) == 2
    assert "retrying 2 failed run(s)" in capsys.readouterr().out
    db = store.connect(study.directory)
    assert list(tuningstate.failed_decisions(db)) == [group.id]
    assert all(r["attempts"] == 1 and r["status"] == "failed" for r in db_rows(study.directory).values() if r["grp"])
    db.close()
    from qatune.report.write import write_report

    text = Path(write_report(tmp_path / "s")["report"]).read_text()  # says what happened, not "not yet"
    assert "none: every candidate failed" in text and "not yet" not in text
