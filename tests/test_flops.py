"""Counted training FLOPs, machine-load readings and the report's marks for runs slowed by their neighbours."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, BertConfig

from qatune.methods import apply_method
from qatune.model.flops import COUNT_WIDTHS, count_window, fit
from qatune.model.machine import LoadMeter
from tests.conftest import method_settings

L, D, FF, H = 2, 64, 128, 2  # tiny BERT: layers, width, feed-forward, heads


def tiny_bert(strategy="full", rank=4):
    with torch.device("meta"):
        model = AutoModelForQuestionAnswering.from_config(
            BertConfig(num_hidden_layers=L, hidden_size=D, intermediate_size=FF, num_attention_heads=H,
                       vocab_size=1000))
    return apply_method(model, strategy, method_settings(strategy, lora_rank=rank, lora_alpha=8, lora_dropout=0.0))


def hand_forward(width: int) -> int:
    """2 FLOPs per multiply-add: Q, K, V, output (D x D each) and the feed-forward pair per token and layer, the
    span head (D x 2), and attention's QK^T and AV (width x D per token, per layer)."""
    linear = L * (4 * D * D + 2 * D * FF) + D * 2
    return 2 * width * linear + L * 2 * (2 * width * width * D)


@pytest.mark.parametrize("width", [8, 40, 96])
def test_counted_flops_match_a_hand_count(width):
    fwd, bwd = count_window(tiny_bert(), width)
    assert fwd == pytest.approx(hand_forward(width), rel=0.05)
    assert bwd == pytest.approx(2 * hand_forward(width), rel=0.05)  # gradients of inputs and of weights


@pytest.mark.parametrize("strategy", ["full", "dora"])
def test_three_counts_fix_every_width_and_batch_exactly(strategy):
    """DoRA computes its weight norms once per forward pass: a cost per micro-batch, not per window, which the
    fit keeps apart (0 for full fine-tuning)."""
    model = tiny_bert(strategy)
    per_window = fit(model)
    assert (per_window.per_batch > 0) == (strategy == "dora")
    for width in (*COUNT_WIDTHS, 24, 200, 384):
        for rows in (1, 3):
            assert per_window.train(rows, width) == sum(count_window(model, width, rows))
    if strategy == "full":
        assert (per_window.forward(40), per_window.backward(40)) == count_window(model, 40)


def test_lora_backward_cheaper_at_small_rank_dearer_above_the_width():
    full = fit(tiny_bert()).backward(128)
    small = fit(tiny_bert("lora", rank=2)).backward(128)
    large = fit(tiny_bert("lora", rank=4 * D)).backward(128)  # rank 256 > width 64
    assert small < full < large
    # forward: LoRA adds its two small matmuls to every adapted layer, never removes any
    assert fit(tiny_bert("lora", rank=2)).forward(128) > fit(tiny_bert()).forward(128)


STUDY = """
[study]
name = "load"

[defaults]
train_data = "{data}"
train_articles = "1-3"
eval_data = "{data}"
eval_articles = "4"
max_seq_length = 96
doc_stride = 32
batch_size = 4
precision = "fp32"
save_steps = 10000
max_steps = {steps}

[[arms]]
name = "full"
model = "{model}"
strategy = "full"

[grid]
learning_rate = [1e-3, 2e-3]
"""


@pytest.mark.slow
def test_a_loaded_run_counts_the_same_flops_and_is_marked(tmp_path, train_file):
    from qatune.report.write import write_report
    from qatune.study.driver import run_study
    from qatune.study.launch import LocalLauncher
    from qatune.study.studyfile import load_study
    from tests.conftest import save_tiny_model

    meter = LoadMeter()
    time.sleep(2.0)
    if (meter.read()["others_cores"] or 0) >= 0.25:  # the run meant to be alone could not be
        pytest.skip("another process keeps this machine busy; the unloaded reference run cannot be measured")
    model = save_tiny_model(tmp_path / "m", "distilbert")
    path = tmp_path / "load.toml"
    path.write_text(STUDY.format(data=train_file, model=model, steps=300))
    quiet = load_study(path, ["learning_rate=[1e-3]"], directory=tmp_path / "s")
    # Everything on one CPU (workers inherit the affinity), one thread per run: two busy processes beside it
    # leave the run a quarter of that CPU, whatever else the machine has.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    burners = []
    try:
        assert run_study(quiet, LocalLauncher(1, threads=1), poll_s=0.1, progress=False) == {"finished": 1}
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
        assert run_study(load_study(path, directory=tmp_path / "s"), LocalLauncher(1, threads=1), poll_s=0.1,
                         progress=False) == {"finished": 2}
    finally:
        for b in burners:
            b.kill()
        os.sched_setaffinity(0, affinity)
    runs = {r.config.learning_rate: json.loads((tmp_path / "s" / "runs" / r.id / "run.json").read_text())["timing"]
            for r in load_study(path, directory=tmp_path / "s").runs}
    alone, loaded = runs[1e-3], runs[2e-3]
    assert alone["train_flops"] == loaded["train_flops"] > 0  # counted, so exactly equal
    assert loaded["train_s"] > 1.3 * alone["train_s"]
    assert loaded["others_cores"] >= 0.25 > alone["others_cores"]
    text = Path(write_report(tmp_path / "s")["report"]).read_text()
    marked = [line for line in text.splitlines() if "† machine loaded" in line]
    ids = {r.config.learning_rate: r.id for r in load_study(path, directory=tmp_path / "s").runs}
    assert len(marked) == 1 and ids[2e-3] in marked[0]
    assert "training compute (counted PFLOP)" not in text  # the axis label is in the figure, not the text
    assert (tmp_path / "s" / "pareto.png").stat().st_size > 1000
