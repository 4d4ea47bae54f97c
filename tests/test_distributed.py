"""Data-parallel training: 2 CPU processes (gloo) under torchrun give the run of 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import save_tiny_model


def _train(args, out, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qatune.cli", "train", *args, "--output-dir", str(out)]
    # CPU processes (gloo) even on a GPU machine: two ranks cannot share one GPU under NCCL.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, train_file):
    model = save_tiny_model(tmp_path / "m", "distilbert", dropout=0.0)  # no dropout: ranks draw no random masks
    common = ["--model", str(model), "--train-data", str(train_file), "--train-articles", "1-3", "--eval-data",
              str(train_file), "--eval-articles", "4", "--max-seq-length", "96", "--doc-stride", "32",
              "--max-steps", "6", "--precision", "fp32", "--learning-rate", "1e-3", "--save-steps", "100",
              "--pad-to-max-length"]  # HF QA heads put padding positions in the softmax: equal widths, equal losses
    one = _train([*common, "--batch-size", "8"], tmp_path / "one", 1)
    two = _train([*common, "--batch-size", "4"], tmp_path / "two", 2)  # the same global batch of 8
    assert two["resolved"]["world_size"] == 2 and one["resolved"]["world_size"] == 1
    assert not (tmp_path / "two" / "checkpoints" / "checkpoint-6" / ".rank1").exists()
    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    # Two ranks sum gradients in another order; Adam's early updates are about lr in size whatever the gradient's,
    # so a weight whose gradient is at noise level may move by a fraction of lr: bound the largest difference by
    # one lr step (1e-3) and require almost every weight to agree to 1e-6.
    diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert float(diffs.max()) < 1e-3 and float(diffs.median()) < 1e-6 and float(diffs.mean()) < 1e-5
    assert one["metrics"]["exact_match"] == pytest.approx(two["metrics"]["exact_match"], abs=5.0)
    assert one["metrics"]["f1"] == pytest.approx(two["metrics"]["f1"], abs=5.0)
