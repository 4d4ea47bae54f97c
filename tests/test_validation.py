"""Validation data apart from the test data: the curve, the kept checkpoint, early stopping and the v2 threshold
are chosen on it, and nothing the test data holds changes a choice."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from qatune.answer.inference import Reader
from qatune.config import TrainConfig
from qatune.data.splits import hold_out, load_training
from qatune.data.squad import SquadDataError, load_squad, write_squad_json
from qatune.errors import ConfigError
from qatune.train.recipe import train
from tests.conftest import make_examples


def cfg(model, data, out, **kw):
    base = dict(model=str(model), train_data=str(data), train_articles="1-3", eval_data=str(data),
                eval_articles="4", output_dir=str(out), max_seq_length=96, doc_stride=32, batch_size=4, max_steps=6,
                save_steps=2, eval_steps=2, precision="fp32", learning_rate=1e-3, validation_share=0.34)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("kw,words", [
    (dict(validation_data="d.json", validation_share=0.1), "not both"),
    (dict(validation_share=1.0), "must be in (0, 1)"),
    (dict(validation_articles="1-2"), "goes with validation_data"),
    (dict(keep="best"), "needs validation data"),
    (dict(validation_share=0.1, keep="best"), "and eval_steps"),
    (dict(early_stopping_patience=2, eval_data="d.json", eval_steps=5), "needs validation data"),
    (dict(early_stopping_patience=-1), "must be >= 0"),
    (dict(keep="first"), "choose one of best, last"),
    (dict(train_data="d.json", validation_data="d.json", train_articles="1-30", validation_articles="28-33"),
     "validation_articles '28-33' overlaps train_articles '1-30' of d.json in articles 28-30"),
    (dict(train_data="d.json", validation_data="d.json", validation_articles="31-33"),
     "give train_articles and validation_articles that do not overlap"),
    (dict(eval_steps=5), "needs validation data (validation_data or validation_share) or eval_data"),
])
def test_validation_options_that_cannot_work_are_refused(kw, words):
    with pytest.raises(ConfigError, match=None) as e:
        TrainConfig(**kw)
    assert words in str(e.value)


def test_defaults_keep_the_best_only_with_validation_and_a_curve():
    assert TrainConfig().resolved_keep() == "last"
    assert TrainConfig(validation_share=0.1).resolved_keep() == "last"  # no curve to choose from
    assert TrainConfig(validation_share=0.1, eval_steps=10).resolved_keep() == "best"
    assert TrainConfig(validation_share=0.1, eval_steps=10, keep="last").resolved_keep() == "last"
    ok = TrainConfig(train_data="d.json", validation_data="d.json", train_articles="1-30", validation_articles="31-33")
    assert ok.has_validation


def test_hold_out_is_by_article_and_the_same_for_every_seed_and_volume(tmp_path):
    path = tmp_path / "d.json"
    write_squad_json(make_examples(n_articles=10, per_article=4), path)
    data = load_squad(path)
    rest, held = hold_out(data, 0.2)
    assert len({ex.title for ex in held.examples}) == 2
    assert not {ex.title for ex in rest.examples} & {ex.title for ex in held.examples}
    assert len(rest) + len(held) == len(data)
    splits = {}
    for seed in (1, 2):
        for questions in (8, 20):
            train, val = load_training(TrainConfig(train_data=str(path), validation_share=0.2, seed=seed,
                                                   train_questions=questions))
            assert len(train) == questions and not {e.title for e in train.examples} & {e.title for e in val.examples}
            splits[seed, questions] = [e.id for e in val.examples]
    assert len({tuple(v) for v in splits.values()}) == 1  # one validation set for every run


def test_every_seed_is_tested_on_the_same_draw_of_eval_questions_and_trains_on_its_own(tmp_path):
    """A study's seeds are compared question by question: a per-seed test draw would leave few shared questions."""
    from qatune.data.splits import load_role

    path = tmp_path / "d.json"
    write_squad_json(make_examples(n_articles=10, per_article=6), path)
    configs = [TrainConfig(train_data=str(path), eval_data=str(path), train_articles="1-5", train_questions=10,
                           eval_articles="6-10", eval_questions=12, seed=seed) for seed in (1, 2, 3)]
    tests = {tuple(ex.id for ex in load_role(c, "eval").examples) for c in configs}
    trains = {tuple(ex.id for ex in load_role(c, "train").examples) for c in configs}
    assert len(tests) == 1 and len(next(iter(tests))) == 12 and len(trains) == 3


def test_validation_file_sharing_articles_with_training_is_refused(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    examples = make_examples(n_articles=4, per_article=3)
    write_squad_json(examples, a)
    write_squad_json(examples[6:], b)  # articles 3 and 4 again, under the same titles
    with pytest.raises(SquadDataError, match="validation article"):
        load_training(TrainConfig(train_data=str(a), validation_data=str(b)))


# ------------------------------------------------------------------------------ the test data is never trained on
@pytest.mark.parametrize("kw,words", [
    (dict(train_articles="1-40", eval_articles="37-48"),
     ["option eval_articles = '37-48'", "eval_articles '37-48' overlaps train_articles '1-40' of d.json in articles "
      "37-40", "give train_articles and eval_articles that do not overlap", "--eval-articles"]),
    (dict(train_articles="1-36", validation_data="d.json", validation_articles="37-40", eval_articles="37-48"),
     ["eval_articles '37-48' overlaps validation_articles '37-40' of d.json in articles 37-40",
      "give validation_articles and eval_articles that do not overlap"]),
    (dict(train_articles="1-40", validation_share=0.1, eval_articles="37-48"),
     ["eval_articles '37-48' overlaps train_articles '1-40' of d.json in articles 37-40",
      "validation_share holds its validation articles out of train_articles"]),
    (dict(train_articles="1-36"),  # an unset range is every article
     ["eval_articles (unset: every article) overlaps train_articles '1-36' of d.json in articles 1-36"]),
    (dict(), ["eval_articles (unset: every article) overlaps train_articles (unset: every article) of d.json in "
              "every article"]),
    (dict(train_data="./d.json", train_articles="5", eval_articles="1-3,5"),  # one file, spelt two ways
     ["eval_articles '1-3,5' overlaps train_articles '5' of ./d.json in article 5"]),
    (dict(train_data="rajpurkar/squad", eval_data="rajpurkar/squad:train", eval_articles="1-10"),  # one split
     ["eval_articles '1-10' overlaps train_articles (unset: every article) of rajpurkar/squad:train in articles 1-10"]),
])
def test_test_articles_that_are_training_or_validation_articles_are_refused(kw, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{"train_data": "d.json", "eval_data": "d.json", **kw})
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)


def test_test_articles_apart_from_the_training_and_validation_ones_are_accepted():
    TrainConfig(train_data="d.json", train_articles="1-36", eval_data="d.json", eval_articles="37-48")
    TrainConfig(train_data="d.json", train_articles="1-36", validation_share=0.1, eval_data="d.json",
                eval_articles="37-48")
    TrainConfig(train_data="d.json", train_articles="1-30", validation_data="d.json", validation_articles="31-36",
                eval_data="d.json", eval_articles="37-48")
    TrainConfig(train_data="a.json", eval_data="b.json")  # other files: their titles are checked when they load
    TrainConfig(train_data="rajpurkar/squad:train", eval_data="rajpurkar/squad:validation")  # other splits
    TrainConfig(train_data="rajpurkar/squad", eval_data="rajpurkar/squad")  # train_split train, eval_split validation


def _retitled(examples, prefix: str):
    return [replace(ex, title=f"{prefix}_{ex.article}") for ex in examples]


def test_a_test_file_sharing_an_article_with_the_training_or_validation_data_is_refused_when_it_loads(tmp_path):
    """Two files can hold one article (dev-v1.1 and dev-v2.0 share their titles): the loader compares titles."""
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    examples = make_examples(n_articles=4, per_article=3)
    write_squad_json(examples, a)
    write_squad_json(examples[6:], b)  # articles 3 and 4 of a.json again, in another file
    write_squad_json(_retitled(make_examples(n_articles=3, per_article=3), "Other"), c)
    with pytest.raises(SquadDataError) as e:
        load_training(TrainConfig(train_data=str(a), train_articles="1-3", eval_data=str(b)))
    assert str(e.value).startswith(f"{b} (all articles): 1 test article(s) are also training articles of {a} "
                                   f"(train_articles '1-3'), by title: 'Article_2'; test articles must never be "
                                   f"trained on")
    with pytest.raises(SquadDataError) as e:  # the held-out validation articles are training articles too
        load_training(TrainConfig(train_data=str(a), train_articles="2-4", validation_share=0.34, eval_data=str(b),
                                  eval_articles="2"))
    assert f"{b} (eval_articles '2'): 1 test article(s) are also training articles of {a} (train_articles " \
           f"'2-4'), by title: 'Article_3'" in str(e.value)
    with pytest.raises(SquadDataError) as e:
        load_training(TrainConfig(train_data=str(c), validation_data=str(a), validation_articles="3-4",
                                  eval_data=str(b)))
    assert f"2 test article(s) are also validation articles of {a} (validation_articles '3-4'), by title: " \
           f"'Article_2', 'Article_3'" in str(e.value)
    train, validation = load_training(TrainConfig(train_data=str(a), train_articles="1-2", eval_data=str(b)))
    assert len(train) == 6 and validation is None
    given = load_squad(b)  # the caller's own test selection is checked the same way
    with pytest.raises(SquadDataError, match="test article"):
        load_training(TrainConfig(train_data=str(a), train_articles="3"), given)


def test_a_v2_run_without_validation_data_refuses_an_oracle_threshold_where_asked(tmp_path):
    """A study sets oracle_threshold off: v2 test data and no validation data is refused when the data loads (the
    version is known then); `qatune train` keeps it on and its threshold is tuned on the test questions."""
    path = tmp_path / "v2.json"
    write_squad_json(make_examples(n_articles=4, per_article=3, unanswerable=4), path, version="2.0")
    base = dict(train_data=str(path), train_articles="1-2", eval_data=str(path), eval_articles="3-4")
    with pytest.raises(ConfigError) as e:
        load_training(TrainConfig(**base, oracle_threshold=False))
    assert str(e.value) == (f"{path}: SQuAD v2 test data without validation data: its null threshold would be tuned "
                            f"on the test questions (an oracle); give validation data (validation_share, e.g. 0.1, or "
                            f"validation_data) so the threshold is tuned there")
    assert load_training(TrainConfig(**base))[1] is None  # allowed by default
    assert load_training(TrainConfig(**base, validation_share=0.5, oracle_threshold=False))[1] is not None
    v1 = tmp_path / "v1.json"
    write_squad_json(make_examples(n_articles=4, per_article=3), v1)
    load_training(TrainConfig(**{**base, "train_data": str(v1), "eval_data": str(v1)}, oracle_threshold=False))
    from qatune.config import config_hash

    assert config_hash(TrainConfig(**base, oracle_threshold=False)) == config_hash(TrainConfig(**base))  # same run


def test_a_datasets_id_with_a_split_loads_that_split(monkeypatch):
    """`rajpurkar/squad:validation` names its split; the split options (eval_split ...) apply to ids without one."""
    import datasets

    from qatune.data.splits import load_split
    from qatune.data.squad import source_identity

    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        raise RuntimeError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for source in ("rajpurkar/squad:validation", "rajpurkar/squad"):
        with pytest.raises(SquadDataError):
            load_split(source, "train", None, None, 0, False, "eval")
    assert asked == [("rajpurkar/squad", "validation"), ("rajpurkar/squad", "train")]
    assert source_identity("rajpurkar/squad:validation", "train") == source_identity("rajpurkar/squad", "validation")


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, tiny_models, train_file):
    out = tmp_path_factory.mktemp("best") / "run"
    record = train(cfg(tiny_models["distilbert"], train_file, out, max_steps=8, keep_checkpoints=1), progress=False)
    return out, record


def test_keep_best_saves_the_best_validation_step(best_run, train_file):
    out, r = best_run
    run = json.loads((out / "run.json").read_text())
    curve = run["curve"]
    assert [p["step"] for p in curve] == [2, 4, 6, 8] and run["data"]["curve_on"] == "validation"
    best = max(curve, key=lambda p: (p["f1"], -p["step"]))  # the first of equals
    v = run["validation"]
    assert v["keep"] == "best" and v["best_step"] == best["step"] and v["f1"] == max(p["f1"] for p in curve)
    assert v["exact_match"] == best["exact_match"] and v["stopped_at"] is None
    assert run["data"]["validation_questions"] > 0
    # the saved model is the best step's weights, and evaluating it reproduces the run's test predictions
    kept = load_file(str(out / "checkpoints" / f"best-{v['best_step']}" / "trainable.safetensors"))
    assert _tensors_equal({k: load_file(str(out / "model" / "model.safetensors"))[k] for k in kept}, kept)
    metrics, decoded = Reader.load(out).evaluate(load_training_eval(run["config"]))
    assert decoded.predictions == json.loads((out / "predictions.json").read_text())
    assert metrics["f1"] == r.metrics["f1"]


def test_the_kept_model_is_an_earlier_best_steps_not_the_last(tiny_models, train_file, tmp_path, monkeypatch):
    """Validation F1 scripted to peak at step 4 of 8: the saved model holds step 4's weights, not step 8's."""
    scores = iter([50.0, 80.0, 60.0, 40.0])

    class Scripted:
        def evaluate(self, data, **kw):
            f1 = next(scores)
            answers = SimpleNamespace(predictions={ex.id: "" for ex in data.examples}, null_odds={})
            return {"exact_match": f1 / 2, "f1": f1}, answers

    monkeypatch.setattr(Reader, "live", classmethod(lambda cls, *a, **kw: Scripted()))
    out = tmp_path / "run"
    r = train(cfg(tiny_models["distilbert"], train_file, out, max_steps=8), progress=False)
    assert r.validation["best_step"] == 4 and r.validation["f1"] == 80.0 and r.validation["exact_match"] == 40.0
    saved = load_file(str(out / "model" / "model.safetensors"))
    best = load_file(str(out / "checkpoints" / "best-4" / "trainable.safetensors"))
    last = load_file(str(out / "checkpoints" / "checkpoint-8" / "trainable.safetensors"))
    assert _tensors_equal({k: saved[k] for k in best}, best)
    assert not _tensors_equal({k: saved[k] for k in last}, last)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best-4", "checkpoint-8"]  # others pruned
    metrics, decoded = Reader.load(out).evaluate(load_training_eval(r.config))  # the test data scored the kept model
    assert decoded.predictions == json.loads((out / "predictions.json").read_text())


def load_training_eval(config: dict):
    from qatune.data.splits import load_role

    return load_role(config, "eval")


def test_the_test_data_changes_no_choice(best_run, tiny_models, train_file, tmp_path):
    """Same run, another test file: the same curve, the same kept step, the same validation numbers."""
    out, _ = best_run
    other = tmp_path / "other-test.json"  # other articles: a test article may not be a training one
    write_squad_json([replace(ex, title=f"Other_{ex.article}") for ex in make_examples(n_articles=2, per_article=5)],
                     other)
    again = train(cfg(tiny_models["distilbert"], train_file, tmp_path / "again", max_steps=8, eval_data=str(other),
                      eval_articles=None), progress=False)
    first = json.loads((out / "run.json").read_text())
    assert again.curve == first["curve"]
    assert again.validation == first["validation"]
    assert again.metrics["total"] != first["metrics"]["total"]  # it really was scored on other questions


def test_early_stopping_stops_after_patience_evaluations_without_gain(tiny_models, train_file, tmp_path):
    # a learning rate too small to move F1: every evaluation ties the first, which stays the best
    r = train(cfg(tiny_models["distilbert"], train_file, tmp_path / "es", max_steps=20, eval_steps=1,
                  learning_rate=1e-12, early_stopping_patience=2), progress=False)
    assert [p["step"] for p in r.curve] == [1, 2, 3]
    assert r.validation["stopped_at"] == 3 and r.validation["best_step"] == 1
    assert r.timing["steps_run"] == 3 and r.resolved["total_steps"] == 20  # the schedule stays the full run's


def test_an_interrupted_keep_best_run_resumes_to_the_same_model(best_run, tiny_models, train_file, tmp_path,
                                                               monkeypatch):
    import qatune.train.recipe as t

    out, _ = best_run
    original = t.save_checkpoint

    def crash_after_third(*args, **kw):  # checkpoint 6 written (best steps up to 6 known), then killed
        original(*args, **kw)
        if args[1] == 6:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(t, "save_checkpoint", crash_after_third)
    part = cfg(tiny_models["distilbert"], train_file, tmp_path / "b", max_steps=8, keep_checkpoints=1)
    with pytest.raises(KeyboardInterrupt):
        train(part, progress=False)
    monkeypatch.setattr(t, "save_checkpoint", original)
    part.resume = True
    r = train(part, progress=False)
    assert r.timing["resumed_from_step"] == 6
    first = json.loads((out / "run.json").read_text())
    assert r.curve == first["curve"] and r.validation == first["validation"]
    assert json.loads((tmp_path / "b" / "predictions.json").read_text()) == \
        json.loads((out / "predictions.json").read_text())


def test_v2_threshold_is_tuned_on_validation_and_applied_unchanged_to_the_test_data(tiny_models, tmp_path):
    path = tmp_path / "v2.json"
    write_squad_json(make_examples(n_articles=6, per_article=4, unanswerable=8), path, version="2.0")
    runs = {}
    for test in ("5-6", "6"):
        out = tmp_path / f"v2-{test}"
        runs[test] = train(cfg(tiny_models["distilbert"], path, out, train_articles="1-4", eval_articles=test,
                               validation_share=0.5), progress=False)
        threshold = runs[test].validation["null_threshold"]
        assert runs[test].metrics["null_threshold"] == threshold  # applied to the test data unchanged
        assert json.loads((out / "model" / "qatune.json").read_text())["null_threshold"] == threshold
    assert runs["5-6"].validation == runs["6"].validation  # whatever the test data
    assert runs["5-6"].metrics["total"] != runs["6"].metrics["total"]


def test_a_study_with_validation_reports_where_its_choices_were_made(tiny_models, train_file, tmp_path):
    from qatune.report.write import write_report
    from qatune.study.driver import run_study
    from qatune.study.launch import LocalLauncher
    from qatune.study.studyfile import load_study

    path = tmp_path / "v.toml"
    path.write_text(f"""
[study]
name = "v"
headline = ["full", "lora"]
[defaults]
train_data = "{train_file}"
train_articles = "1-3"
validation_share = 0.34
eval_data = "{train_file}"
eval_articles = "4"
max_seq_length = 96
doc_stride = 32
batch_size = 4
precision = "fp32"
max_steps = 4
eval_steps = 2
learning_rate = 1e-3
[[arms]]
name = "full"
model = "{tiny_models['distilbert']}"
strategy = "full"
[[arms]]
name = "lora"
model = "{tiny_models['distilbert']}"
strategy = "lora"
[grid]
lora_rank = [2]
seed = [1]
""")
    study = load_study(path, directory=tmp_path / "s")
    assert run_study(study, LocalLauncher(workers=1, threads=1), progress=False) == {"finished": 2}
    result = write_report(tmp_path / "s")
    for c in result["configurations"]:
        run = json.loads((tmp_path / "s" / "runs" / c["run_ids"][0] / "run.json").read_text())
        assert c["best_step"] == [run["validation"]["best_step"]] and c["validation_f1"] == [run["validation"]["f1"]]
    assert "measured on validation questions" in (tmp_path / "s" / "report.md").read_text()
