"""What a trained model costs to run: latency per question, size on disk, and the accuracy of its int8 export.

Called once per run after its evaluation (``TrainConfig.inference_cost``; the study presets turn it on), so a
study's report can put accuracy beside the cost of shipping each arm. The model is exported the ways it would be
shipped — merged fp32 PyTorch weights and an int8 ONNX model — into a temporary directory, and measured there:

* latency of one question at a time (batch 1: tokenise, forward, decode, as ``Reader.answer`` does for a client),
  p50 and p95 in ms over ``questions`` questions of the evaluation data, with 1 thread and with all the threads
  the run had, for the PyTorch model and for the int8 ONNX model;
* questions per second when the same questions go in one ``answer_many`` call (batched);
* bytes on disk of the merged and the int8 model;
* EM/F1 of the int8 model on the whole evaluation set (the fp32 numbers are the run's own).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qatune.data.squad import SquadData
from qatune.errors import QatuneError

LATENCY_QUESTIONS = 32
WARMUP = 2


def latency_ms(reader, items: list[tuple[str, str]]) -> dict[str, float]:
    """p50/p95 wall time (ms) of answering each question alone, after a short warm-up."""
    for q, c in items[:WARMUP]:
        reader.answer(q, c)
    times = []
    for q, c in items:
        t = time.perf_counter()
        reader.answer(q, c)
        times.append(1000 * (time.perf_counter() - t))
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def batched_qps(reader, items: list[tuple[str, str]]) -> float:
    t = time.perf_counter()
    reader.answer_many(items)
    return len(items) / (time.perf_counter() - t)


def _sample(data: SquadData, n: int) -> list[tuple[str, str]]:
    return [(ex.question, ex.context) for ex in data.examples[:n]]


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run a block with ``n`` intra-op threads, restoring the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure(model_dir: str | Path, data: SquadData, questions: int = LATENCY_QUESTIONS, device=None,
            progress: bool = False) -> dict:
    """The inference costs of the model in ``model_dir`` (see the module docstring). A failure (an optional
    dependency missing, an export failing its parity probe) is recorded as ``{"error": ...}``: the run it belongs to
    has finished training and keeps its results."""
    import torch

    from qatune.answer.export import export
    from qatune.answer.inference import Reader

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    items = _sample(data, questions)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    try:
        with tempfile.TemporaryDirectory(prefix="qatune-cost-") as tmp:
            say("inference cost: exporting merged fp32 and int8 ONNX models ...")
            merged = export(model_dir, Path(tmp) / "merged", "merged")
            int8 = export(model_dir, Path(tmp) / "int8", "onnx", "int8")
            fp32_reader = Reader.load(Path(tmp) / "merged", device=device)
            result = {"questions": len(items), "threads": threads, "device": str(fp32_reader.device),
                      "merged_size_bytes": merged["size_bytes"], "int8_size_bytes": int8["size_bytes"],
                      "int8_parity_max_abs_logit_diff": int8["max_abs_logit_diff"]}
            say("inference cost: latency of the PyTorch model ...")
            with _torch_threads(1):
                one = latency_ms(fp32_reader, items)
            result["torch"] = {"precision": fp32_reader.precision,
                               "p50_ms_1_thread": one["p50_ms"], "p95_ms_1_thread": one["p95_ms"],
                               **latency_ms(fp32_reader, items), "batched_qps": batched_qps(fp32_reader, items)}
            say("inference cost: latency and accuracy of the int8 ONNX model ...")
            one = latency_ms(Reader.load(Path(tmp) / "int8", threads=1), items)
            int8_reader = Reader.load(Path(tmp) / "int8", threads=threads)
            metrics, _ = int8_reader.evaluate(data)
            result["int8"] = {"p50_ms_1_thread": one["p50_ms"], "p95_ms_1_thread": one["p95_ms"],
                              **latency_ms(int8_reader, items), "batched_qps": batched_qps(int8_reader, items),
                              "exact_match": metrics["exact_match"], "f1": metrics["f1"]}
    except QatuneError as e:
        say(f"inference cost not measured: {e}")
        return {"error": f"{type(e).__name__}: {e}"}
    result["measure_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------- report
