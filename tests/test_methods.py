"""Fine-tuning methods as registry entries (qatune.methods): each starts as the pretrained model, trains only what it
declares, resumes exactly, exports merged and as ONNX with the parity probe passing and answers as its run did,
counts its training FLOPs, and mixes with the others in a study."""

import json

import pytest
import torch

from qatune.answer.inference import Reader
from qatune.cli import main
from qatune.config import TrainConfig
from qatune.data.splits import load_role
from qatune.errors import ConfigError
from qatune.methods import METHODS, NAMES, REFERENCE, apply_method, method
from qatune.model.flops import fit
from qatune.model.load import check_segment_inputs, load_qa_model, meta_model, model_from_config, random_batch
from qatune.train.recipe import train
from tests.conftest import method_settings, owners


def run_cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model), train_data=str(data), train_articles="1-2", eval_data=str(data),
                eval_articles="3-4", output_dir=str(out), max_seq_length=96, doc_stride=32, batch_size=4, max_steps=4,
                save_steps=2, logging_steps=1, precision="fp32", lora_rank=4)
    return TrainConfig(**{**base, **kw})


def test_the_registry_declares_what_every_other_module_asks():
    fields = set(TrainConfig.__dataclass_fields__)
    for m in METHODS.values():
        assert m.label and m.help and 0 < m.learning_rate < 1
        assert min(m.learning_rates) <= m.learning_rate <= max(m.learning_rates)
        assert set(m.options) <= fields and set(m.cost_options) <= set(m.options)
        assert m.rank is None or m.rank in m.options
        assert TrainConfig(strategy=m.name).resolved_learning_rate() == m.learning_rate
    assert REFERENCE in METHODS
    with pytest.raises(ConfigError, match="strategy = 'lora-plus' is not allowed: choose one of full, lora, dora"):
        TrainConfig(strategy="lora-plus")
    with pytest.raises(Exception, match="unknown fine-tuning method .* choose from full, lora, dora, pissa"):
        method("lora-plus")


@pytest.mark.parametrize("name", NAMES)
def test_every_method_starts_as_the_pretrained_model_and_trains_only_its_parameters(name, tiny_models):
    base = load_qa_model(str(tiny_models["mobilebert"])).eval()
    batch = {k: v for k, v in random_batch(base, 2, 16, torch.device("cpu")).items() if "positions" not in k}
    with torch.no_grad():
        before = base(**batch).start_logits.clone()
        total = sum(p.numel() for p in base.parameters())
        model = apply_method(base, name, method_settings(name, lora_rank=4)).eval()
        after = model(**batch).start_logits
    assert float((after - before).abs().max()) < 1e-5  # PiSSA moves weights into its adapter, losing nothing
    check_segment_inputs(model)  # segment ids reach the base model under every method
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("qa_outputs" in n for n in trainable)  # the span head always trains
    body = {n for n in trainable if "qa_outputs" not in n}
    expected = {"full": lambda n: True, "lora": lambda n: "lora_A" in n or "lora_B" in n,
                "dora": lambda n: "lora_" in n, "pissa": lambda n: "lora_A" in n or "lora_B" in n,
                "loha": lambda n: "hada_" in n, "ia3": lambda n: "ia3_l" in n, "bitfit": lambda n: n.endswith(".bias")}[name]
    assert body and all(expected(n) for n in body), sorted(body)[:5]
    if name == "dora":
        assert any("lora_magnitude_vector" in n for n in body)
    if name == "bitfit":  # every bias of the encoder, and nothing else of it
        assert body == {n for n, _ in model.named_parameters() if n.endswith(".bias") and "qa_outputs" not in n}
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert (n_trainable == total) == (name == "full")


@pytest.mark.parametrize("name", NAMES)
def test_building_a_model_to_count_leaves_the_random_state_alone(name):
    """PEFT draws its initialisations even on the meta device: counted outside a fork, a run's dropout masks would
    depend on whether its shape had been counted before in the process (two identical runs would differ)."""
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    model_from_config("distilbert-base-uncased", name, method_settings(name, lora_rank=8), meta=True)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_each_method_counts_what_it_computes():
    """Counted on the meta device: the methods that freeze weights skip their gradients, so their backward pass
    costs less than full fine-tuning's at a like forward pass; DoRA (PEFT's) computes its weight norms once per
    micro-batch and, with dropout on its input, multiplies by every adapted base weight a second time."""
    counts = {n: fit(meta_model("distilbert-base-uncased", n, method(n).key(TrainConfig(strategy=n, lora_rank=8))))
              for n in NAMES}
    full = counts["full"]
    for name in ("lora", "pissa", "ia3", "bitfit"):
        c = counts[name]
        assert c.backward(128) < 0.8 * full.backward(128), name
        assert 0.99 * full.forward(128) <= c.forward(128) < 1.2 * full.forward(128), name
        assert c.per_batch == 0
    assert counts["dora"].forward(128) > 1.5 * full.forward(128) and counts["dora"].per_batch > 0  # dropout 0.1
    no_dropout = fit(meta_model("distilbert-base-uncased", "dora", method("dora").key(
        TrainConfig(strategy="dora", lora_rank=8, lora_dropout=0.0))))
    assert no_dropout.forward(128) == counts["lora"].forward(128) and no_dropout.per_batch == counts["dora"].per_batch
    assert counts["pissa"] == counts["lora"]  # the same shapes; only the initialisation differs


@pytest.mark.parametrize("name", NAMES)
def test_each_method_resumes_exactly_exports_and_answers_as_its_run(name, tmp_path, tiny_models, train_file,
                                                                    monkeypatch, capsys):
    import qatune.train.recipe as t

    model = tiny_models["mobilebert"]
    whole = train(run_cfg(model, train_file, tmp_path / "a", strategy=name), progress=False)
    assert whole.timing["train_flops"] > 0 and whole.config["strategy"] == name

    original = t.save_checkpoint

    def crash_after_first(*args, **kw):
        original(*args, **kw)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(t, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        train(run_cfg(model, train_file, tmp_path / "b", strategy=name), progress=False)
    monkeypatch.setattr(t, "save_checkpoint", original)
    resumed = train(run_cfg(model, train_file, tmp_path / "b", strategy=name, resume=True), progress=False)
    assert resumed.timing["resumed_from_step"] == 2
    assert [p[1] for p in resumed.loss["curve"]] == pytest.approx([p[1] for p in whole.loss["curve"]], abs=1e-5)
    run_predictions = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert json.loads((tmp_path / "b" / "predictions.json").read_text()) == run_predictions
    assert resumed.timing["train_flops"] == whole.timing["train_flops"]

    assert main(["export", "--model", str(tmp_path / "a"), "--output-dir", str(tmp_path / "merged"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["max_abs_logit_diff"] < 1e-3
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert f"fine-tuning method {method(name).label}" in (tmp_path / "merged" / "README.md").read_text()
    eval_data = load_role(whole.config, "eval")
    _, decoded = Reader.load(tmp_path / "merged").evaluate(eval_data)
    assert decoded.predictions == run_predictions
    pytest.importorskip("onnxruntime")
    assert main(["export", "--model", str(tmp_path / "a"), "--format", "onnx", "--output-dir",
                 str(tmp_path / "onnx")]) == 0
    _, decoded = Reader.load(tmp_path / "onnx").evaluate(eval_data)
    assert decoded.predictions == run_predictions


def test_a_pissa_run_saves_merged_weights_that_load_on_their_own(tmp_path, tiny_models, train_file):
    """A PiSSA adapter only fits the residual base it was trained on, so the run saves merged weights: a full model
    directory that answers as the run did, no adapter beside it."""
    r = train(run_cfg(tiny_models["mobilebert"], train_file, tmp_path / "p", strategy="pissa", max_steps=2),
              progress=False)
    assert not (tmp_path / "p" / "model" / "adapter_config.json").exists()
    assert (tmp_path / "p" / "model" / "model.safetensors").exists()
    assert r.params["trainable_params"] < r.params["total_params"] / 2
    _, decoded = Reader.load(tmp_path / "p").evaluate(load_role(r.config, "eval"))
    assert decoded.predictions == json.loads((tmp_path / "p" / "predictions.json").read_text())


def test_a_study_mixing_every_method_is_planned_and_foreign_options_are_refused(tmp_path, tiny_models, train_file,
                                                                                 capsys):
    arms = "\n".join(f'[[arms]]\nname = "{n}"\nmodel = "{tiny_models["distilbert"]}"\nstrategy = "{n}"\n'
                     for n in NAMES)
    path = tmp_path / "methods.toml"
    path.write_text(f'[study]\nname = "methods"\n\n[defaults]\ntrain_data = "{train_file}"\ntrain_articles = "1-3"\neval_data = "{train_file}"\n'
                    f'eval_articles = "4"\nmax_steps = 2\nmax_seq_length = 96\ndoc_stride = 32\n\n{arms}\n'
                    f'[grid]\nlora_rank = [4, 8]\nseed = [1]\n')
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_method = {}
    for r in plan["estimates"]:
        by_method.setdefault(r["strategy"], []).append(r)
    assert set(by_method) == set(NAMES)
    for name, runs in by_method.items():  # the rank axis multiplies the methods that have a rank only
        assert len(runs) == (2 if method(name).rank else 1), name
        assert all(0 < r["trainable_params"] <= r["total_params"] for r in runs)
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), "--dry-run", "--set", "bitfit.lora_rank=8"]) == 2
    assert f"lora_rank is an option of {owners('lora_rank')}; arm 'bitfit' fine-tunes with bitfit" in \
        capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_qatune_train_with_each_method_on_real_minilm_exports_merged_and_answers_as_the_run(name, tmp_path, train_file,
                                                                                            capsys):
    out = tmp_path / name
    assert main(["train", "--model", "minilm-l6", "--strategy", name, "--lora-rank", "8", "--train-data",
                 str(train_file), "--train-articles", "1-2", "--eval-data", str(train_file), "--eval-articles", "3-4",
                 "--max-seq-length", "96", "--doc-stride", "32", "--batch-size", "4", "--max-steps", "3",
                 "--precision", "fp32", "--output-dir", str(out), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (trained["trainable_params"] == trained["total_params"]) == (name == "full")
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["strategy"] == name and run["timing"]["train_flops"] > 0
    assert main(["export", "--model", str(out), "--output-dir", str(tmp_path / "merged"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_abs_logit_diff"] < 1e-3
    _, decoded = Reader.load(tmp_path / "merged").evaluate(load_role(run["config"], "eval"))
    assert decoded.predictions == json.loads((out / "predictions.json").read_text())
