"""LoRA models see every input a window has (segment ids included): training, merging, export, cost, the guard."""

from __future__ import annotations

import json

import pytest
import torch

from qatune.answer.export import probe_batch
from qatune.answer.inference import load_inference_config
from qatune.cli import main
from qatune.config import config_hash
from qatune.methods import apply_method
from qatune.model.load import (
    ModelError,
    check_segment_inputs,
    has_segment_embeddings,
    load_trained,
)
from qatune.train.recipe import train
from tests.conftest import method_settings, save_tiny_model
from tests.runs import qa_data, tiny_config  # noqa: F401 - fixtures

POLICIES = ("fixed", "rslora", "proportional")


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return torch.stack([out.start_logits, out.end_logits])


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    return {"minilm": "minilm-l6", **{k: str(save_tiny_model(root / k, k, dropout=0.0))
                                      for k in ("mobilebert", "distilbert")}}


def _lora_run(base: str, policy: str, data, out):
    # lora_alpha 64 and a high learning rate: the adapters move far from B = 0 within a few steps
    return train(tiny_config(base, data, out, strategy="lora", lora_rank=8, lora_alpha=64.0, alpha_policy=policy,
                             learning_rate=5e-3, max_steps=6), progress=False)


@pytest.mark.parametrize("arch", ["minilm", "mobilebert", "distilbert"])
@pytest.mark.parametrize("policy", POLICIES)
def test_trained_adapter_merges_exactly_on_windows_with_both_segments(arch, policy, bases, qa_data, tmp_path):
    record = _lora_run(bases[arch], policy, qa_data, tmp_path / "run")
    model_dir = tmp_path / "run" / "model"
    model = load_trained(model_dir).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.abs().max()) for p in lora_b) > 1e-3  # trained: B moved away from 0
    batch = probe_batch(model_dir_tokenizer(model_dir), load_inference_config(model_dir))
    if has_segment_embeddings(model):
        assert batch["token_type_ids"].min() == 0 and batch["token_type_ids"].max() == 1  # both segments
    before = _logits(model, batch)
    merged = model.merge_and_unload().eval()
    after = _logits(merged, batch)
    real = batch["attention_mask"].bool()
    assert float((before - after).abs()[:, real].max()) < 1e-4
    assert record.resolved["lora_alpha_effective"] == (16.0 if policy == "proportional" else 64.0)


def model_dir_tokenizer(model_dir):
    from qatune.model.load import load_tokenizer

    return load_tokenizer(str(model_dir))


class DropsSegments(torch.nn.Module):
    """A wrapper that loses token_type_ids on the way to its model, as PEFT's question-answering task type does."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kw):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)


class InventsSegments(DropsSegments):
    """A forward whose logits depend on token_type_ids although the architecture has no segment embeddings."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kw):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        out.start_logits = out.start_logits + token_type_ids
        return out


@pytest.mark.parametrize("arch", ["minilm", "mobilebert", "distilbert"])
def test_segment_probe_tells_architectures_apart(arch, bases):
    from qatune.model.load import load_qa_model

    model = load_qa_model(bases[arch])
    assert has_segment_embeddings(model) == (arch != "distilbert")
    check_segment_inputs(model)  # the plain model and its LoRA wrapper pass
    lora = apply_method(model, "lora", method_settings("lora", lora_rank=4))
    check_segment_inputs(lora)
    if arch == "distilbert":
        check_segment_inputs(DropsSegments(model))  # nothing to lose
        with pytest.raises(ModelError, match="no segment embeddings, yet its logits change with token_type_ids"):
            check_segment_inputs(InventsSegments(model))
    else:
        with pytest.raises(ModelError, match="ignores the input token_type_ids.*DropsSegments"):
            check_segment_inputs(DropsSegments(model))


def test_a_run_whose_model_ignores_segment_ids_refuses_to_train(bases, qa_data, tmp_path, monkeypatch):
    import qatune.train.recipe as t

    real = t.apply_method
    monkeypatch.setattr(t, "apply_method", lambda model, name, settings: DropsSegments(real(model, name, settings)))
    with pytest.raises(ModelError, match="token_type_ids"):
        train(tiny_config(bases["mobilebert"], qa_data, tmp_path / "run", strategy="lora"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.xfail(reason="PEFT bug (peft 0.21.2): PeftModelForQuestionAnswering.forward takes token_type_ids by "
                          "name and does not pass it to the base model; qatune uses the generic PeftModel instead")
def test_peft_question_answering_wrapper_passes_token_type_ids(bases):
    """The minimal reproduction of the upstream bug; it passes (XPASS) once PEFT forwards the argument."""
    from peft import LoraConfig, TaskType, get_peft_model

    from qatune.model.load import load_qa_model

    model = get_peft_model(load_qa_model(bases["minilm"]), LoraConfig(task_type=TaskType.QUESTION_ANS, r=4,
                                                                     target_modules=["query"]))
    ids = torch.tensor([[101, 2040, 102, 1996, 2338, 102]])
    typed = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        a = model(input_ids=ids, token_type_ids=typed).start_logits
        b = model(input_ids=ids, token_type_ids=torch.zeros_like(typed)).start_logits
    assert not torch.equal(a, b)


@pytest.fixture(scope="module")
def mobilebert_lora_run(bases, qa_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mb-lora") / "run"
    record = train(tiny_config(bases["mobilebert"], qa_data, out, strategy="lora", lora_rank=8, lora_alpha=64.0,
                               learning_rate=5e-3, max_steps=6, inference_cost=True), progress=False)
    return out, record


def test_exports_of_a_segment_lora_run_answer_exactly_as_the_run(mobilebert_lora_run, qa_data, tmp_path):
    run, _ = mobilebert_lora_run
    expected = json.loads((run / "predictions.json").read_text())
    for fmt in ("merged", "onnx"):
        out = tmp_path / fmt
        assert main(["export", "--model", str(run), "--format", fmt, "--output-dir", str(out)]) == 0
        assert main(["evaluate", "--model", str(out), "--data", str(qa_data), "--articles", "3-4",
                     "--output-dir", str(tmp_path / f"eval-{fmt}")]) == 0
        assert json.loads((tmp_path / f"eval-{fmt}" / "predictions.json").read_text()) == expected, fmt


def test_inference_cost_is_measured_for_a_lora_run(mobilebert_lora_run):
    run, record = mobilebert_lora_run
    cost = record.inference
    assert "error" not in cost, cost.get("error")
    assert cost["int8"]["f1"] >= 0 and cost["merged_size_bytes"] > 0
    assert json.loads((run / "run.json").read_text())["inference"]["torch"]["p50_ms"] > 0


def test_lora_runs_have_new_ids_full_runs_keep_theirs(qa_data, tmp_path):
    """LoRA runs trained before the fix never saw segment ids: a study must not take them as finished."""
    import hashlib
    from dataclasses import asdict

    from qatune.config import IN_HASH_WHEN_SET, NOT_IN_HASH

    def before_fix(cfg) -> str:
        d = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_HASH and not (k in IN_HASH_WHEN_SET and
                                                                                  v == IN_HASH_WHEN_SET[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    full = tiny_config("m", qa_data, tmp_path, strategy="full")
    lora = tiny_config("m", qa_data, tmp_path, strategy="lora")
    assert config_hash(full) == before_fix(full)
    assert config_hash(lora) != before_fix(lora)
