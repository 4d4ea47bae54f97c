"""One inference configuration and one code path: evaluate reproduces a run, Reader loads any model form, threads."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from qatune.answer.inference import InferenceConfig, Reader, plan_batches
from qatune.cli import main
from qatune.data.features import build_features
from qatune.data.squad import write_squad_json
from qatune.errors import ConfigError
from qatune.train.recipe import train
from tests.conftest import make_examples, save_tiny_model
from tests.runs import CONTEXT, qa_data, tiny_config, tiny_lora_run, tiny_run  # noqa: F401 - fixtures


def _evaluate(run, data, out, *extra):
    assert main(["evaluate", "--model", str(run), "--data", str(data), "--output-dir", str(out), *extra]) == 0
    return json.loads((out / "predictions.json").read_text())


@pytest.mark.parametrize("which", ["tiny_run", "tiny_lora_run"])
def test_evaluate_reproduces_the_runs_predictions(request, which, qa_data, tmp_path):
    run = request.getfixturevalue(which)
    reference = json.loads((run / "predictions.json").read_text())
    # the run directory itself (train's --output-dir) and its model directory both load; the run's own
    # config.json (a training configuration, not a model's) does not make the run directory look like a model
    (run / "config.json").write_text(json.dumps({"config": {}}))
    assert _evaluate(run, qa_data, tmp_path / "a", "--articles", "3-4") == reference
    assert _evaluate(run / "model", qa_data, tmp_path / "b", "--articles", "3-4") == reference
    saved = json.loads((run / "model" / "qatune.json").read_text())
    assert saved["max_seq_length"] == 96 and saved["doc_stride"] == 32 and saved["max_answer_length"] == 30
    assert saved["precision"] == "auto" and saved["version_2"] is False


def test_evaluate_uses_the_saved_max_answer_length(tiny_run, qa_data, tmp_path):
    """A setting saved with the model changes what evaluate answers (it used to fall back to 30)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_run / "model", model)
    settings = json.loads((model / "qatune.json").read_text())
    (model / "qatune.json").write_text(json.dumps({**settings, "max_answer_length": 1}))
    preds = _evaluate(model, qa_data, tmp_path / "ev")
    assert Reader.load(model).config.max_answer_length == 1

    def tokens(text):
        return len(Reader.load(model).tokenizer(text, add_special_tokens=False)["input_ids"])

    reference = json.loads((tiny_run / "predictions.json").read_text())
    assert any(tokens(p) > 1 for p in reference.values())  # at 30 tokens the run answered longer spans ...
    assert all(tokens(p) <= 1 for p in preds.values())  # ... at the saved 1 token, evaluate answers single tokens


def test_v2_run_tunes_and_saves_its_null_threshold(tmp_path):
    exs = make_examples(n_articles=3, per_article=4, unanswerable=4)  # article 1 holds the unanswerable ones
    data = tmp_path / "v2.json"
    write_squad_json(exs, data, version="2.0")
    model = save_tiny_model(tmp_path / "base", "distilbert")
    # no validation data: the threshold is tuned on the test questions (an oracle, as `qatune train` allows)
    r = train(tiny_config(model, data, tmp_path / "run", train_articles="3", eval_articles="1-2"), progress=False)
    saved = json.loads((tmp_path / "run" / "model" / "qatune.json").read_text())
    assert saved["version_2"] is True
    assert saved["null_threshold"] == r.metrics["null_threshold"] == r.metrics["best_f1_thresh"]
    assert r.metrics["f1"] == pytest.approx(r.metrics["best_f1"])  # predictions use the tuned threshold
    assert _evaluate(tmp_path / "run", data, tmp_path / "ev", "--articles", "1-2") == \
        json.loads((tmp_path / "run" / "predictions.json").read_text())


def test_reader_is_thread_safe(tiny_run):
    reader = Reader.load(tiny_run, device="cpu")
    items = [(f"What is the {t} called?", CONTEXT * (1 + i % 4)) for i, t in enumerate(["bridge", "river"] * 12)]
    serial = [reader.answer(q, c, top_k=3) for q, c in items]
    barrier = threading.Barrier(6)

    def ask(k):
        barrier.wait()
        return [reader.answer(q, c, top_k=3) for q, c in items[k::6]]

    with ThreadPoolExecutor(6) as pool:
        parallel = list(pool.map(ask, range(6)))
    for k in range(6):
        assert parallel[k] == serial[k::6]


def test_windows_are_safe_while_the_shared_tokenizer_is_used_elsewhere(tokenizer):
    """The windowing uses its own configured copy: calls of the tokenizer itself (which set truncation and
    padding on its backend) in other threads do not change the windows."""
    exs = make_examples(n_articles=2, per_article=4, filler=30)
    expected = build_features(exs, tokenizer, 64, 16)
    stop = threading.Event()

    def disturb():
        while not stop.is_set():
            tokenizer(["a question"] * 4, ["a context"] * 4, truncation=True, max_length=24, padding="max_length")

    thread = threading.Thread(target=disturb)
    thread.start()
    try:
        for _ in range(20):
            got = build_features(exs, tokenizer, 64, 16)
            assert [x.tolist() for x in got.input_ids] == [x.tolist() for x in expected.input_ids]
    finally:
        stop.set()
        thread.join()


def test_batches_respect_the_token_bound():
    lengths = np.array([10, 300, 40, 300, 12, 200, 64])
    batches = plan_batches(lengths, batch_size=4, max_batch_tokens=600)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 4 and (len(b) == 1 or len(b) * lengths[b].max() <= 600)
    assert [len(b) for b in batches] == [2, 3, 2]  # longest first: two 300-token windows fill a batch


def test_inference_config_checks_its_values():
    with pytest.raises(ConfigError, match="doc_stride"):
        InferenceConfig(max_seq_length=64, doc_stride=64)
    with pytest.raises(ConfigError, match="precision"):
        InferenceConfig(precision="int4")
    with pytest.raises(ConfigError, match="null_threshold"):
        InferenceConfig(null_threshold=float("inf"))
    assert InferenceConfig.from_dict({"max_seq_length": 256, "strategy": "full"}).max_seq_length == 256


def test_reader_precision_and_device_defaults(tiny_run):
    reader = Reader.load(tiny_run, device="cpu")
    assert str(reader.device) == "cpu" and reader.precision == "fp32"  # a CPU keeps fp32 unless told otherwise
    assert Reader.load(tiny_run, device="cpu", precision="bf16").precision == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        Reader.load(tiny_run, device="cpu", precision="fp16")


def test_evaluate_during_training_leaves_the_model_in_training_mode(tiny_run, qa_data):
    """The learning-curve evaluation of a model being trained: same answers as a Reader, mode kept."""
    from qatune.data.squad import load_squad

    reader = Reader.load(tiny_run, device="cpu")
    data = load_squad(qa_data)
    expected, _ = reader.evaluate(data)
    reader.model.train()
    got, decoded = Reader.live(reader.model, reader.tokenizer, reader.config, "fp32").evaluate(data)
    assert reader.model.training
    assert got == expected
