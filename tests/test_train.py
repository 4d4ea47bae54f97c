import json

import pytest
import torch
from safetensors.torch import load_file

from qatune.answer.inference import Reader, window_logits
from qatune.cli import main
from qatune.config import TrainConfig
from qatune.data.features import build_features
from qatune.data.squad import SquadDataError
from qatune.errors import TrainingError
from qatune.methods import apply_method
from qatune.model.load import ModelError, load_qa_model
from qatune.train.recipe import train
from tests.conftest import method_settings


def cfg(model, data, out, **kw):
    base = dict(model=str(model), train_data=str(data), train_articles="1-2", eval_data=str(data),
                eval_articles="3-4", output_dir=str(out), max_seq_length=96, doc_stride=32, batch_size=4, max_steps=4,
                save_steps=2, precision="fp32", learning_rate=1e-3)
    return TrainConfig(**{**base, **kw})


def weights(model_dir):
    return load_file(str(next(model_dir.glob("*.safetensors"))))


@pytest.mark.parametrize("kind", ["mobilebert", "distilbert"])
def test_full_finetune_writes_everything(tmp_path, tiny_models, train_file, kind):
    out = tmp_path / "run"
    r = train(cfg(tiny_models[kind], train_file, out), progress=False)
    for name in ["predictions.json", "nbest.json", "metrics.json", "run.json", "model/qatune.json"]:
        assert (out / name).exists(), name
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["strategy"] == "full" and run["seed"] == 42
    assert run["params"]["trainable_params"] == run["params"]["total_params"] > 0
    assert run["environment"]["torch"] == torch.__version__ and "transformers" in run["environment"]
    assert run["timing"]["train_s"] > 0 and run["timing"]["train_windows_per_s"] > 0
    assert run["memory"]["peak_rss_mb"] > 0
    assert run["resolved"]["total_steps"] == 4
    assert run["resolved"]["attention"] == "eager"  # attention="auto" on a CPU trains with eager attention
    assert run["resolved"]["eval_attention"] == "sdpa"  # and answers with SDPA
    assert run["resolved"]["attention_dropout"] == 0.1  # the model's own
    assert len(run["loss"]["curve"]) == 1 and run["loss"]["final"] == run["loss"]["curve"][-1][1] > 0
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == r.metrics["total"] == 12  # articles 3-4 of the training file
    before, after = weights(tiny_models[kind]), weights(out / "model")
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2  # every weight trains in full fine-tuning


@pytest.mark.parametrize("kind", ["mobilebert", "distilbert"])
def test_attention_kernels_learn_the_same_and_attention_dropout_reaches_the_model(tmp_path, tiny_models, train_file,
                                                                                 kind):
    """The kernel is how a run computes, not what: with the attention maps undropped, an eager and an SDPA run of one
    seed draw the same hidden-dropout masks and learn the same (one run id). attention_dropout reaches the model
    (another run, another id) and run.json records both."""
    from qatune.config import config_hash

    configs = {name: cfg(tiny_models[kind], train_file, tmp_path / name, logging_steps=1, **kw) for name, kw in
               {"eager": {"attention": "eager", "attention_dropout": 0.0},
                "sdpa": {"attention": "sdpa", "attention_dropout": 0.0},
                "dropped": {"attention": "eager", "attention_dropout": 0.5}}.items()}
    runs = {}
    for name, c in configs.items():
        train(c, progress=False)
        runs[name] = json.loads((tmp_path / name / "run.json").read_text())
    assert [runs[n]["resolved"]["attention"] for n in configs] == ["eager", "sdpa", "eager"]
    assert [runs[n]["resolved"]["attention_dropout"] for n in configs] == [0.0, 0.0, 0.5]
    losses = {n: [loss for _, loss in runs[n]["loss"]["curve"]] for n in configs}
    assert len(losses["eager"]) == 4 and losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-4)
    gap = {n: max(abs(a - b) for a, b in zip(losses[n], losses["eager"])) for n in ("sdpa", "dropped")}
    assert gap["dropped"] > 100 * gap["sdpa"] + 1e-5  # the kernels agree far closer than the dropout settings
    assert config_hash(configs["eager"]) == config_hash(configs["sdpa"]) != config_hash(configs["dropped"])
    # an unset attention_dropout is the run of earlier versions (the model's own), whatever the default
    assert config_hash(cfg(tiny_models[kind], train_file, tmp_path)) != config_hash(configs["eager"])


def test_lora_keeps_base_and_trains_head(tmp_path, tiny_models, train_file):
    out = tmp_path / "lora"
    r = train(cfg(tiny_models["distilbert"], train_file, out, strategy="lora", lora_rank=4, lora_alpha=8,
                  alpha_policy="fixed"), progress=False)
    assert 0 < r.params["trainable_percent"] < 100
    adapter = weights(out / "model")
    assert any("lora_A" in k for k in adapter) and any("qa_outputs" in k for k in adapter)
    assert not any("q_lin.weight" in k and "lora" not in k and "base_layer" not in k for k in adapter)
    base = weights(tiny_models["distilbert"])
    trained = Reader.load(out / "model").model
    state = {k.replace("base_model.model.", "").replace(".base_layer", "").replace(".modules_to_save.default", ""): v
             for k, v in trained.state_dict().items() if "original_module" not in k}
    for k, v in base.items():
        if k.startswith("qa_outputs"):
            assert not torch.equal(state[k], v), "the span head must train"
        else:
            assert torch.equal(state[k], v), f"base weight {k} changed"


@pytest.mark.parametrize("policy,expected", [("fixed", 8 / 4), ("proportional", 2.0), ("rslora", 8 / 2)])
def test_alpha_policies(tiny_models, policy, expected):
    model = apply_method(load_qa_model(str(tiny_models["distilbert"])), "lora",
                         method_settings("lora", lora_rank=4, lora_alpha=8, alpha_policy=policy))
    layer = next(m for n, m in model.named_modules() if n.endswith("q_lin") and hasattr(m, "scaling"))
    assert layer.scaling["default"] == pytest.approx(expected)


def test_bad_lora_targets_list_real_modules(tiny_models):
    model = load_qa_model(str(tiny_models["distilbert"]))
    with pytest.raises(ModelError, match=r"\['query'\] match no linear layer.*q_lin"):
        apply_method(model, "lora", method_settings("lora", lora_targets=["query"]))


def test_fp16_mobilebert_refused(tmp_path, tiny_models, train_file):
    with pytest.raises(ModelError, match="MobileBERT gives NaN losses in fp16"):
        train(cfg(tiny_models["mobilebert"], train_file, tmp_path / "x", precision="fp16"), progress=False)


def test_bad_paths_are_clear(tmp_path, tiny_models, train_file):
    with pytest.raises(SquadDataError, match="no such SQuAD JSON file"):
        train(cfg(tiny_models["distilbert"], tmp_path / "missing.json", tmp_path / "x"), progress=False)
    with pytest.raises(ModelError, match="no-model: no such model directory"):
        train(cfg(tmp_path / "no-model", train_file, tmp_path / "y"), progress=False)


def test_resume_equals_uninterrupted(tmp_path, tiny_models, train_file, monkeypatch):
    import qatune.train.recipe as t

    full = cfg(tiny_models["mobilebert"], train_file, tmp_path / "a", max_steps=6, save_steps=3, logging_steps=1)
    train(full, progress=False)

    original = t.save_checkpoint

    def crash_after_first(*args, **kw):
        original(*args, **kw)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(t, "save_checkpoint", crash_after_first)
    part = cfg(tiny_models["mobilebert"], train_file, tmp_path / "b", max_steps=6, save_steps=3, logging_steps=1)
    with pytest.raises(KeyboardInterrupt):
        train(part, progress=False)
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-3").exists()
    with pytest.raises(TrainingError, match="--resume"):
        train(part, progress=False)
    monkeypatch.setattr(t, "save_checkpoint", original)
    part.resume = True
    r = train(part, progress=False)
    assert r.timing["resumed_from_step"] == 3 and r.timing["steps_run"] == 3
    assert r.timing["train_s_total"] > r.timing["train_s"] > 0  # the first attempt's 3 steps count too
    whole = json.loads((tmp_path / "a" / "run.json").read_text())  # the record covers all six steps, as unresumed
    assert [p[0] for p in r.loss["curve"]] == [p[0] for p in whole["loss"]["curve"]] == list(range(1, 7))
    assert [p[1] for p in r.loss["curve"]] == pytest.approx([p[1] for p in whole["loss"]["curve"]], abs=1e-5)
    windows_per_step = whole["timing"]["train_windows_per_s"] * whole["timing"]["train_s"] / 6
    assert r.timing["train_windows_per_s"] * r.timing["train_s_total"] == pytest.approx(6 * windows_per_step)
    assert r.timing["train_flop_per_s"] * r.timing["train_s_total"] == pytest.approx(r.timing["train_flops"])
    assert r.timing["process_cpu_s"] > 0
    wa, wb = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    assert json.loads((tmp_path / "a" / "predictions.json").read_text()) == \
        json.loads((tmp_path / "b" / "predictions.json").read_text())


def poison_third_forward(monkeypatch, factor: float) -> None:
    """Make the span head's third forward pass (step 3 at grad_accum 1) return non-finite logits."""
    import qatune.train.recipe as t

    real = t.load_qa_model
    calls = {"n": 0}

    def poisoned(name, *args):
        model = real(name, *args)

        def hook(module, inputs, output):
            if not module.training:  # setup's input probe, evaluation: not training steps
                return output
            calls["n"] += 1
            return output * factor if calls["n"] == 3 else output

        model.qa_outputs.register_forward_hook(hook)
        return model

    monkeypatch.setattr(t, "load_qa_model", poisoned)


def test_nan_loss_stops_with_step(tmp_path, tiny_models, train_file, monkeypatch):
    poison_third_forward(monkeypatch, float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3.*checkpoint-2"):
        train(cfg(tiny_models["distilbert"], train_file, tmp_path / "nan", save_steps=2), progress=False)
    assert (tmp_path / "nan" / "checkpoints" / "checkpoint-2").exists()


def test_export_merge_matches_adapter(tmp_path, tiny_models, train_file, capsys):
    out = tmp_path / "lora"
    train(cfg(tiny_models["distilbert"], train_file, out, strategy="lora", lora_rank=8, alpha_policy="rslora"),
          progress=False)
    assert main(["export", "--model", str(out / "model"), "--format", "merged", "--output-dir",
                 str(tmp_path / "merged"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_abs_logit_diff"] < 1e-4
    adapter, merged = Reader.load(out / "model"), Reader.load(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    from qatune.data.squad import load_squad

    feats = build_features(load_squad(train_file).examples, adapter.tokenizer, 96, 32)
    sa, ea = window_logits(adapter.model, feats, adapter.tokenizer.pad_token_id)
    sm, em = window_logits(merged.model, feats, merged.tokenizer.pad_token_id)
    finite = torch.isfinite(torch.from_numpy(sa))
    assert float((torch.from_numpy(sa - sm)[finite]).abs().max()) < 1e-4
    assert float((torch.from_numpy(ea - em)[finite]).abs().max()) < 1e-4


def test_cli_train_evaluate_predict(tmp_path, tiny_models, train_file, capsys):
    out = tmp_path / "cli"
    conf = tmp_path / "run.toml"
    conf.write_text(f'model = "{tiny_models["distilbert"]}"\nmax_seq_length = 96\ndoc_stride = 32\nmax_steps = 2\n'
                    f'batch_size = 4\nprecision = "fp32"\n')
    assert main(["train", "--config", str(conf), "--strategy", "lora", "--lora-rank", "4", "--train-data",
                 str(train_file), "--train-articles", "1-2", "--train-questions", "10", "--eval-data", str(train_file),
                 "--eval-articles", "3-4", "--output-dir", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["max_steps"] == 2 and run["config"]["lora_rank"] == 4
    assert run["data"]["train_questions"] == 10 and run["data"]["eval_questions"] == 12
    assert r["trainable_params"] < r["total_params"]
    assert main(["evaluate", "--model", str(out / "model"), "--data", str(train_file), "--output-dir",
                 str(tmp_path / "ev"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["total"] == 24 and (tmp_path / "ev" / "predictions.json").exists()
    ctx = "The bridge of Marlow is called Kestrel7. Visitors often walk near the river in spring."
    assert main(["predict", "--model", str(out / "model"), "--question", "What is the bridge of Marlow called?",
                 "--context", ctx, "--top-k", "3", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answers"]
    assert len(answers) == 3
    for a in answers:
        assert ctx[a["start"] : a["end"]] == a["text"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "question": "What?", "context": ctx}) + "\n" + "not json\n")
    assert main(["predict", "--model", str(out / "model"), "--input", str(jsonl)]) == 2
    assert "q.jsonl, line 2" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_learns_a_few_dozen_questions(tmp_path, train_file):
    from qatune.data.squad import load_squad

    # scored on its own training questions by a separate evaluation: a run may not evaluate on its training articles
    r = train(TrainConfig(model="minilm-l6", train_data=str(train_file), output_dir=str(tmp_path / "minilm"),
                          max_seq_length=128, doc_stride=32, batch_size=8, max_steps=60, learning_rate=2e-4,
                          warmup_ratio=0.1, save_steps=1000), progress=False)
    metrics, _ = Reader.load(tmp_path / "minilm").evaluate(load_squad(train_file))
    assert metrics["total"] == 24
    assert metrics["exact_match"] >= 90.0
    assert r.resolved["attention"] == "eager" and r.resolved["eval_attention"] == "sdpa"  # auto on a CPU


def test_nonfinite_loss_leaves_the_weights_untouched(tmp_path, tiny_models, train_file, monkeypatch):
    """The check is deferred (no host sync per step), so later steps run, but no update reaches the weights."""
    import qatune.train.recipe as t

    poison_third_forward(monkeypatch, float("inf"))
    recipe = t.Recipe(cfg(tiny_models["distilbert"], train_file, tmp_path / "inf", max_steps=6, save_steps=100,
                          logging_steps=100), progress=False)
    assert recipe.setup() is None
    recipe.writer = None
    snapshots = []
    recipe.optimizer.register_step_post_hook(
        lambda opt, args, kw: snapshots.append([p.detach().clone() for g in opt.param_groups for p in g["params"]]))
    with pytest.raises(TrainingError, match=r"non-finite loss \((inf|nan)\) at step 3 .*none \(the run had not saved"):
        recipe.train()
    assert len(snapshots) == 6  # every step ran: the flag was read once, at the end
    moved = [any(not torch.equal(a, b) for a, b in zip(snapshots[i], snapshots[i + 1])) for i in range(5)]
    assert moved == [True, False, False, False, False]  # steps 1-2 trained; from step 3 on, nothing changed
    assert not list((tmp_path / "inf").glob("checkpoints/checkpoint-*"))  # no checkpoint after a bad step


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, train_file):
    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "m", "distilbert", dropout=0.0)  # compiled dropout draws other masks
    common = dict(max_steps=3, pad_to_max_length=True, eval_data=None)  # equal widths: the same batches
    eager = train(cfg(model, train_file, tmp_path / "eager", **common), progress=False)
    compiled = train(cfg(model, train_file, tmp_path / "compiled", compile=True, **common), progress=False)
    assert compiled.resolved["compile"] is True
    assert compiled.loss["final"] == pytest.approx(eager.loss["final"], rel=1e-4)
    wa, wb = weights(tmp_path / "eager" / "model"), weights(tmp_path / "compiled" / "model")
    # Adam's first updates are about lr in size whatever the gradient's, so a noise-level gradient difference
    # can move a weight by up to lr per step: at most 3 x lr after 3 steps, and far less almost everywhere.
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    assert float(diffs.max()) <= 3 * 1e-3 and float(diffs.median()) < 1e-6


def test_learning_curve_survives_an_interruption(tmp_path, tiny_models, train_file, monkeypatch):
    """A run stopped after its first curve point resumes with that point kept, and adds the rest."""
    from qatune.train import recipe as train_module

    first = train_module.Recipe._curve_point

    def stop_after_first_point(self, step):
        first(self, step)
        train_module.STOP.set()  # as Ctrl-C would: checkpoint at this step, then Interrupted

    out = tmp_path / "run"
    c = cfg(tiny_models["distilbert"], train_file, out, eval_steps=2, eval_subset=3)
    monkeypatch.setattr(train_module.Recipe, "_curve_point", stop_after_first_point)
    try:
        with pytest.raises(train_module.Interrupted):
            train(c, progress=False)
    finally:
        train_module.STOP.clear()
    assert [p["step"] for p in json.loads((out / "curve.json").read_text())] == [2]
    monkeypatch.setattr(train_module.Recipe, "_curve_point", first)
    c.resume = True
    r = train(c, progress=False)
    assert r.timing["resumed_from_step"] == 2
    assert [p["step"] for p in r.curve] == [2, 4] and [p["windows"] for p in r.curve] == [8, 16]


def test_a_flops_budget_ends_the_run_at_the_first_step_that_reaches_it(tmp_path, tiny_models, train_file):
    """max_train_flops instead of steps: the run counts its batches in advance and trains to the first step at
    which its counted FLOPs reach the budget (one step fewer would not: a run of that many steps, same seed and
    batches, counts less); the dry run's estimate at a typical width is close."""
    from qatune.study.sizes import optimizer_steps

    model = tiny_models["distilbert"]
    probe = train(cfg(model, train_file, tmp_path / "probe", max_steps=6), progress=False)
    budget = 3.5 * probe.timing["train_flops"] / 6
    c = cfg(model, train_file, tmp_path / "budget", max_steps=0, max_train_flops=budget, eval_steps=1)
    r = train(c, progress=False)
    steps = r.resolved["total_steps"]
    assert r.timing["steps_run"] == steps and 2 <= steps <= 5 and r.timing["train_flops"] >= budget
    flops = [p["flops"] for p in r.curve]  # each learning-curve point's compute: the curve against FLOPs
    assert len(flops) == steps and flops == sorted(set(flops)) and flops[-1] == r.timing["train_flops"]
    shorter = train(cfg(model, train_file, tmp_path / "shorter", max_steps=steps - 1), progress=False)
    assert shorter.timing["train_flops"] < budget
    assert abs(optimizer_steps(c) - steps) <= 2
    with pytest.raises(ValueError, match="max_train_flops.*max_steps = 4 is set too, and a run has one end"):
        cfg(model, train_file, tmp_path / "both", max_train_flops=budget)  # with max_steps = 4
