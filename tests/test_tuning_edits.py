"""Tuning state that survives edits of the study file: values added or removed before or after a decision, a
finished run that becomes a candidate, a seed list that moves the tuning seed, and two arms that would share runs.
The state is a function of the candidates' scores (`qatune.study.tuning.play`), so each case is played again, not patched."""

import json

import pytest

from qatune.study import store, tuningstate
from qatune.study.driver import decide, run_study
from qatune.study.launch import LocalLauncher
from qatune.study.studyfile import StudyError, load_study
from qatune.study.tuning import finished_pauses, play
from tests.runs import db_rows
from tests.test_tuning import write

SUBSET = "eval_steps = 1\neval_subset = 50"  # set by the file: a fixed arm's runs and a tuned arm's are alike


def _study(tmp_path, tiny_models, train_file, rates: str):
    return load_study(write(tmp_path, tiny_models["distilbert"], train_file, rates), directory=tmp_path / "s")


def _pause(db, rid, step, f1):
    """A candidate reached a rung (as `tuningstate.pause` records it)."""
    row = db.execute("SELECT scores FROM runs WHERE id=?", (rid,)).fetchone()
    scores = json.loads(row[0] or "[]") + [{"step": step, "f1": f1}]
    db.execute("UPDATE runs SET status='pending', stage='paused', scores=? WHERE id=?", (json.dumps(scores), rid))


def _paused(tmp_path, tiny_models, train_file, scores: list[float]):
    """A study's store with one tuned configuration whose candidates (1e-3, 2e-3, ...) all paused at step 3 with
    ``scores``: (group, db, candidate ids)."""
    study = _study(tmp_path, tiny_models, train_file, f"[{', '.join(f'{k + 1}e-3' for k in range(len(scores)))}]")
    (group,) = study.groups
    db = store.connect(study.directory)
    store.register(db, study.runs)
    ids = [run.id for _, run in group.candidates]
    for rid, f1 in zip(ids, scores):
        _pause(db, rid, 3, f1)
    return group, db, ids


# ---------------------------------------------------------------------------------------------- the rule, pure
def test_play_promotes_prunes_and_chooses_from_scores_alone():
    ids = ["a", "b", "c", "d", "e", "f"]
    at3 = {"a": {3: 10.0}, "b": {3: 40.0}, "c": {3: 30.0}, "d": {3: 20.0}, "e": {3: 5.0}}
    p = play(ids, at3, set(), [3, 9], 3)  # f is on its way
    assert p.winner is None and p.failed_rung is None and p.stages["f"]["stage"] == "candidate"
    assert {p.stages[r]["stage"] for r in "abcde"} == {"paused"}
    p = play(ids, at3, {"f"}, [3, 9], 3)  # f failed: two of the six go on, to the end
    assert [p.stages[r]["stage"] for r in ids] == ["pruned", "candidate", "candidate", "pruned", "pruned", "pruned"]
    assert p.stages["b"] == {"stage": "candidate", "rung": 1, "pause_at": 2**31 - 1}
    p = play(ids, {**at3, "c": {3: 30.0, 9: 45.0}, "b": {3: 40.0, 9: 44.0}}, {"f"}, [3, 9], 3)
    assert p.winner == "c" and p.step == 9 and p.stages["c"]["stage"] == "winner" and p.stages["b"]["stage"] == "pruned"
    p = play(["a", "b"], {}, {"a", "b"}, [9], 3)
    assert p.failed_rung == 0 and p.unreached == ["a", "b"]
    assert play(["a"], {}, set(), [9], 3).winner == "a"  # a lone candidate: chosen without training
    # a run that ended before the last rung stands there with its end; a pause elsewhere is an earlier schedule's
    assert play(["a", "b"], {"a": {9: 1.0}, "b": {7: 2.0}}, set(), [9], 3, {"b": 7}).winner == "b"
    assert play(["a", "b"], {"a": {9: 1.0}, "b": {7: 2.0}}, set(), [9], 3).stages["b"]["stage"] == "candidate"
    assert play(["a", "b"], {"a": {1: 5.0}, "b": {1: 2.0}}, set(), [2, 3], 2).winner is None  # rungs were [1, 3]
    # a run shorter than a rung stands for it and every later one with its end
    p = play(["a", "b", "c"], {"a": {3: 5.0}, "b": {2: 9.0}, "c": {3: 1.0}}, set(), [3, 9], 3, {"b": 2})
    assert p.winner == "b" and p.step == 2


def test_a_finished_run_stands_for_the_pauses_of_the_model_it_kept_at_each_rung():
    curve = [{"step": 1, "f1": 10.0}, {"step": 2, "f1": 30.0}, {"step": 3, "f1": 20.0}, {"step": 6, "f1": 25.0}]
    assert finished_pauses(curve, [2, 6], "best") == ({2: 30.0, 6: 30.0}, 6)
    assert finished_pauses(curve, [2, 6], "last") == ({2: 30.0, 6: 25.0}, 6)
    assert finished_pauses(curve, [1, 3, 9], "last") == ({1: 10.0, 3: 20.0, 6: 25.0}, 6)  # ended at 6: its end stands
    adopted, end = finished_pauses(curve, [9], "last")
    assert play(["a", "b"], {"a": {9: 24.0}, "b": adopted}, set(), [9], 3, {"b": end}).winner == "b"


# ---------------------------------------------------------------------------------------------- the store
def test_a_value_added_between_rungs_reopens_the_rung_instead_of_crashing(tmp_path, tiny_models, train_file):
    group, db, ids = _paused(tmp_path, tiny_models, train_file, [10.0, 40.0, 30.0, 20.0, 15.0, 12.0])
    assert decide(db, group, 3) is None  # two go on: ids[1], ids[2]
    assert [store.statuses(db, ids)[r] for r in ids[:3]] == ["pruned", "pending", "pending"]
    (group,) = _study(tmp_path, tiny_models, train_file, "[1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3]").groups
    assert group.schedule == [3, 9]
    store.register(db, [run for _, run in group.candidates])
    new = group.candidates[-1][1].id
    assert decide(db, group, 3) is None  # the first rung is on again, for the newcomer
    st = store.statuses(db, [*ids, new])
    assert st[new] == "pending" and tuningstate.pause_at(db, new) == 3 and all(st[r] == "paused" for r in ids)
    assert store.claim(db, [*ids, new], store.Owner.new(), 60, 1, "w") == new
    db.execute("UPDATE runs SET owner=NULL WHERE id=?", (new,))
    _pause(db, new, 3, 50.0)
    assert decide(db, group, 3) is None  # seven set out, two go on: the newcomer and ids[1]
    st = store.statuses(db, [*ids, new])
    assert st[new] == st[ids[1]] == "pending" and st[ids[2]] == "pruned"
    assert tuningstate.pause_at(db, new) == tuningstate.pause_at(db, ids[1]) == 2**31 - 1


def test_a_decision_is_taken_again_when_its_values_change_and_stands_otherwise(tmp_path, tiny_models, train_file):
    group, db, ids = _paused(tmp_path, tiny_models, train_file, [10.0, 40.0, 30.0, 20.0])
    first = decide(db, group, 3)
    assert first.winner == ids[1] and first.chosen == {"learning_rate": 2e-3} and first.step == 3 and first.new
    assert not decide(db, group, 3).new  # the same candidates: it stands
    # the chosen value removed from the file (the rungs stay [3, 9]): chosen again among the others, the removed run
    # leaves the group
    (fewer,) = _study(tmp_path, tiny_models, train_file, "[1e-3, 3e-3, 4e-3]").groups
    assert fewer.id == group.id and fewer.schedule == group.schedule == [3, 9]
    assert tuningstate.decisions(db, {g.id: [r.id for _, r in g.candidates] for g in [fewer]}) == {}  # stale until retaken
    again = decide(db, fewer, 3)
    assert again.new and again.chosen == {"learning_rate": 3e-3} and again.winner == ids[2]
    assert db.execute("SELECT grp, stage FROM runs WHERE id=?", (ids[1],)).fetchone()[:] == (None, None)
    assert tuningstate.decisions(db, {fewer.id: [ids[0], ids[2], ids[3]]}) == {fewer.id: {"learning_rate": 3e-3}}
    # and put back: its saved pause counts again, nothing to train
    back = decide(db, group, 3)
    assert back.new and back.winner == ids[1]
    db.close()


# ---------------------------------------------------------------------------------------------- studies
def test_a_value_added_to_a_finished_study_is_tried_and_the_choice_taken_again(tmp_path, tiny_models, train_file):
    study = _study(tmp_path, tiny_models, train_file, "[1e-4, 3e-3, 1e-2]")
    counts = run_study(study, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False)
    assert counts == {"finished": 2, "pruned": 2, "winner": 1}
    more = _study(tmp_path, tiny_models, train_file, "[1e-4, 3e-3, 1e-2, 3e-2]")
    counts = run_study(more, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False)  # no hang
    assert counts == {"finished": 2, "pruned": 3, "winner": 1}
    (group,) = more.groups
    rows = db_rows(more.directory)
    added = rows[group.candidates[-1][1].id]
    assert json.loads(added["scores"])[0]["step"] == 3 and added["attempts"] == 0  # it trained to the rung
    trained_before = [rows[run.id] for _, run in group.candidates[:3]]
    assert all(len(json.loads(r["scores"])) == 1 for r in trained_before)  # nothing retrained
    db = store.connect(more.directory)
    (chosen,) = tuningstate.decisions(db).values()
    best = max(group.candidates, key=lambda c: json.loads(rows[c[1].id]["scores"])[0]["f1"])[0]
    assert chosen == best
    finals = [group.run(chosen, seed).id for seed in group.seeds]
    assert all(rows[rid]["status"] == "finished" for rid in finals)
    db.close()


def test_a_finished_run_that_becomes_a_candidate_is_compared_on_its_curve(tmp_path, tiny_models, train_file):
    """An arm ran at lr 1e-3 with seed 0; then the file tunes lr over [1e-3, 3e-3] with final seed 1 (tuning seed 0):
    the finished run is the 1e-3 candidate, scored from its learning curve; only 3e-3 trains as a candidate."""
    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-3]")
    text = path.read_text().replace("seed = [1, 2]", "seed = [1]").replace("eval_steps = 1", SUBSET)
    fixed = text.replace("[tune.full]\nlearning_rate = [1e-3]\n", "").replace(
        'strategy = "full"', 'strategy = "full"\nlearning_rate = 1e-3').replace("seed = [1]", "seed = [0]")
    path.write_text(fixed)
    study = load_study(path, directory=tmp_path / "s")
    assert run_study(study, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False) == {"finished": 1}
    (done,) = study.runs
    path.write_text(text.replace("learning_rate = [1e-3]", "learning_rate = [1e-3, 3e-3]"))
    tuned = load_study(path, directory=tmp_path / "s")
    (group,) = tuned.groups
    assert group.tuning_seed == 0 and group.candidates[0][1].id == done.id
    counts = run_study(tuned, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False)
    assert counts.get("finished", 0) == 1 and counts["pruned"] + counts["winner"] == 2
    rows = db_rows(tuned.directory)
    was = rows[done.id]
    assert was["status"] == "finished" and was["stage"] in ("winner", "pruned") and was["grp"] == group.id
    curve = json.loads(was["curve"])
    assert json.loads(was["scores"])[-1]["f1"] == max(p["f1"] for p in curve)  # keep = best, at its end (step 9)
    other = rows[group.candidates[1][1].id]
    assert other["stage"] in ("winner", "pruned") and json.loads(other["scores"])[-1]["step"] == 9


def test_identical_arms_and_an_arm_whose_run_another_trains_are_refused(tmp_path, tiny_models, train_file):
    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-3, 3e-3]")
    base = path.read_text().replace("eval_steps = 1", SUBSET)
    twin = '\n[[arms]]\nname = "twin"\nmodel = "{m}"\nstrategy = "full"\n'.format(m=tiny_models["distilbert"])
    path.write_text(base.replace("[tune]", twin + "\n[tune]").replace("[tune.full]", "[tune.twin]\nlearning_rate = "
                                                                      "[1e-3, 3e-3]\n\n[tune.full]"))
    with pytest.raises(StudyError, match=r"arms 'full' and 'twin' would train the same run \(.*seed=0"):
        load_study(path, directory=tmp_path / "s")
    fixed = twin.replace('strategy = "full"', 'strategy = "full"\nlearning_rate = 3e-3')
    path.write_text(base.replace("[tune]", fixed + "\n[tune]"))  # twin's runs at seeds 1, 2 = full's finals at 3e-3
    with pytest.raises(StudyError, match=r"arms 'twin' and 'full' would train the same run .* if its tuning "
                                         r"chooses \{'learning_rate': 0.003\}.*Make the arms differ"):
        load_study(path, directory=tmp_path / "s")
    path.write_text(base.replace("[tune]", fixed.replace("3e-3", "5e-3") + "\n[tune]"))
    assert len(load_study(path, directory=tmp_path / "s").runs) == 4  # two candidates, two fixed runs


def test_a_second_version_of_the_file_is_refused_while_a_driver_trains_the_first(tmp_path, tiny_models, train_file):
    study = _study(tmp_path, tiny_models, train_file, "[1e-3, 2e-3, 3e-3]")
    (group,) = study.groups
    db = store.connect(study.directory)
    store.register(db, study.runs)
    assert decide(db, group, 3) is None
    ids = [run.id for _, run in group.candidates]
    other = store.Owner.new()
    assert store.claim(db, ids, other, 600, 3, "w") == ids[0]  # the first version's driver trains 1e-3
    (edited,) = _study(tmp_path, tiny_models, train_file, "[2e-3, 3e-3, 4e-3]").groups
    store.register(db, [run for _, run in edited.candidates])
    with pytest.raises(store.StoreError, match=rf"another driver \({other}\) is training candidate {ids[0]}"):
        decide(db, edited, 3)
    assert db.execute("SELECT grp FROM runs WHERE id=?", (ids[0],)).fetchone()[0] == group.id  # nothing changed
    db.execute("UPDATE runs SET lease_until=0 WHERE id=?", (ids[0],))  # that driver is gone: the edit goes ahead
    assert decide(db, edited, 3) is None
    assert db.execute("SELECT grp FROM runs WHERE id=?", (ids[0],)).fetchone()[0] is None


def test_a_former_candidate_whose_seed_becomes_a_final_seed_trains_as_a_final_run(tmp_path, tiny_models, train_file):
    """Seeds [1] tune at seed 0; the file then keeps the chosen value alone and trains seeds [0, 1]: the chosen
    candidate (paused at its rung, stage winner) is now the seed-0 final run. It leaves the old configuration and
    trains to its end, so every final run is finished, not a candidate left waiting while the study exits 0."""
    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-3, 3e-3, 1e-2]")
    path.write_text(path.read_text().replace("seed = [1, 2]", "seed = [1]").replace("eval_steps = 1", SUBSET))
    study = load_study(path, directory=tmp_path / "s")
    assert run_study(study, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False) == \
        {"finished": 1, "pruned": 2, "winner": 1}
    db = store.connect(study.directory)
    ((grp, chosen),) = tuningstate.decisions(db).items()
    db.close()
    old = study.groups[0].run(chosen, 0)
    assert db_rows(study.directory)[old.id]["stage"] == "winner"  # paused at step 3 of 9
    rate = chosen["learning_rate"]
    path.write_text(path.read_text().replace("[1e-3, 3e-3, 1e-2]", f"[{rate}]").replace("seed = [1]", "seed = [0, 1]"))
    again = load_study(path, directory=tmp_path / "s")
    counts = run_study(again, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False)
    assert counts == {"finished": 2, "winner": 1}  # the lone candidate (seed 2) is chosen without training
    row = db_rows(again.directory)[old.id]
    assert row["status"] == "finished" and row["grp"] is None and row["stage"] is None
    assert json.loads(row["curve"])[-1]["step"] == 9  # trained on from its rung to the end


def test_a_renamed_arm_keeps_its_runs_under_its_new_name(tmp_path, tiny_models, train_file):
    """Run ids do not depend on arm names: after a rename nothing retrains, and the store (so --status and the
    report) names the runs as the file does now."""
    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-3, 3e-3]")
    fixed = '\n[[arms]]\nname = "fix"\nmodel = "{m}"\nstrategy = "full"\nlearning_rate = 5e-3\n'.format(
        m=tiny_models["distilbert"])
    text = path.read_text().replace("seed = [1, 2]", "seed = [1]").replace("eval_steps = 1", SUBSET)
    path.write_text(text.replace("[tune]", fixed + "\n[tune]"))
    study = load_study(path, directory=tmp_path / "s")
    run_study(study, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False)
    before = db_rows(study.directory)
    renamed = path.read_text().replace('name = "fix"', 'name = "fixed2"').replace('name = "full"', 'name = "tuned"')
    path.write_text(renamed.replace("[tune.full]", "[tune.tuned]"))
    again = load_study(path, directory=tmp_path / "s")
    assert {r.id for r in again.runs} == {r.id for r in study.runs}
    run_study(again, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False)
    after = db_rows(again.directory)
    assert {rid: r["curve"] for rid, r in after.items()} == {rid: r["curve"] for rid, r in before.items()}
    assert {r["arm"] for r in after.values()} == {"fixed2", "tuned"}


def test_new_rungs_are_trained_to_not_answered_with_an_earlier_schedules_scores(tmp_path, tiny_models, train_file):
    """Halving chose at step 3 of 9; the file then asks for a grid (one rung, the end): every candidate trains on
    from its checkpoint to step 9 and the choice is taken there, as a fresh grid study would take it."""
    path = write(tmp_path, tiny_models["distilbert"], train_file, "[1e-3, 3e-3, 1e-2]")
    path.write_text(path.read_text().replace("seed = [1, 2]", "seed = [1]").replace("eval_steps = 1", SUBSET))
    study = load_study(path, directory=tmp_path / "s")
    run_study(study, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False)
    path.write_text(path.read_text().replace('method = "halving"', 'method = "grid"'))
    grid = load_study(path, directory=tmp_path / "s")
    (group,) = grid.groups
    assert group.schedule == [9] and group.id != study.groups[0].id
    counts = run_study(grid, LocalLauncher(workers=1, threads=1), poll_s=0.05, progress=False)
    assert counts["winner"] == 1 and counts["pruned"] == 2
    rows = db_rows(grid.directory)
    for _, run in group.candidates:
        scores = json.loads(rows[run.id]["scores"])
        assert [s["step"] for s in scores] == [3, 9] and scores[-1]["rung"] == 0  # the old pause kept, not counted
    db = store.connect(grid.directory)
    decision = decide(db, group, 3)
    db.close()
    assert decision.step == 9
    assert decision.chosen == max(group.candidates, key=lambda c: json.loads(rows[c[1].id]["scores"])[-1]["f1"])[0]
