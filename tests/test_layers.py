"""Fewer layers of a pretrained encoder (``num_layers``): the first N layers' weights, exactly, and a model that
trains, is evaluated, exported and served like any other."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qatune.answer.inference import Reader
from qatune.cli import main
from qatune.config import TrainConfig
from qatune.errors import ConfigError
from qatune.model.load import ModelError, load_qa_model, model_depth
from qatune.study.plan import count_params
from qatune.train.recipe import train


def test_a_three_layer_cut_of_minilm_holds_its_first_three_layers_exactly():
    full, cut = load_qa_model("minilm-l6"), load_qa_model("minilm-l6", 3)
    assert model_depth(full.config) == 6 and model_depth(cut.config) == 3
    fs, cs = full.state_dict(), cut.state_dict()
    encoder = [k for k in cs if "qa_outputs" not in k]
    assert all(torch.equal(fs[k], cs[k]) for k in encoder)  # embeddings and layers 0-2, as pretrained
    assert not any(f"layer.{i}." in k for k in cs for i in (3, 4, 5))
    dropped = sum(v.numel() for k, v in fs.items() if any(f"encoder.layer.{i}." in k for i in (3, 4, 5)))
    assert sum(p.numel() for p in cut.parameters()) == sum(p.numel() for p in full.parameters()) - dropped
    # the dry run counts the same, from the config alone
    assert count_params(TrainConfig(model="minilm-l6", num_layers=3))["total_params"] == \
        sum(p.numel() for p in cut.parameters())


def test_a_layer_count_the_model_does_not_have_is_refused(tiny_models):
    with pytest.raises(ModelError, match="it has 6 transformer layers; keep 1 to 6"):
        load_qa_model("minilm-l6", 7)
    with pytest.raises(ModelError, match="it has 2 transformer layers"):
        load_qa_model(str(tiny_models["distilbert"]), 3)  # DistilBERT counts them as n_layers
    with pytest.raises(ConfigError, match="num_layers = 0"):
        TrainConfig(num_layers=0)


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_a_cut_model_trains_evaluates_exports_and_serves(tmp_path, tiny_models, train_file, strategy, capsys):
    out = tmp_path / "run"
    r = train(TrainConfig(model=str(tiny_models["distilbert"]), strategy=strategy, num_layers=1, lora_rank=2,
                          train_data=str(train_file), train_articles="1-3", eval_data=str(train_file),
                          eval_articles="4", output_dir=str(out), max_seq_length=96, doc_stride=32, batch_size=4,
                          max_steps=2, precision="fp32", learning_rate=1e-3), progress=False)
    assert r.config["num_layers"] == 1
    whole = load_qa_model(str(tiny_models["distilbert"]))
    assert r.params["total_params"] < sum(p.numel() for p in whole.parameters())
    reader = Reader.load(out)  # a LoRA adapter's base is cut again from what the run saved
    assert model_depth(reader.model.config) == 1
    assert reader.answer("What is the bridge of Marlow called?", "The bridge of Marlow is called Kestrel7.")
    assert json.loads((out / "model" / "qatune.json").read_text())["num_layers"] == 1
    assert main(["export", "--model", str(out), "--output-dir", str(tmp_path / "ship")]) == 0
    assert "cut to its first 1 transformer layers" in (tmp_path / "ship" / "README.md").read_text()
    shipped = load_file(str(tmp_path / "ship" / "model.safetensors"))
    assert not any(".layer.1." in k for k in shipped)  # one transformer layer, merged
    from qatune.data.splits import load_role

    _, decoded = Reader.load(tmp_path / "ship").evaluate(load_role(r.config, "eval"))
    assert decoded.predictions == json.loads((out / "predictions.json").read_text())
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qatune.answer.serve import create_app

    with TestClient(create_app(Reader.load(tmp_path / "ship"))) as client:
        reply = client.post("/answer", json={"question": "Who?", "context": "Kestrel7 is a bridge."})
    assert reply.status_code == 200 and reply.json()[0]["answer"] in "Kestrel7 is a bridge."
