"""The report's inference-cost table: latency, size and int8 accuracy of each run's model as measured after its
evaluation (:func:`qatune.answer.cost.measure`), and the runs whose measurement failed."""

from __future__ import annotations

COST_INTRO = ("Measured after each run's evaluation (`inference_cost`): latency of one question at a time (tokenise, "
              "forward, decode) over the first questions of the evaluation data, p50/p95 in ms with 1 thread and with "
              "the run's threads; size of the merged fp32 model and of its int8 ONNX export (ONNX Runtime dynamic "
              "quantization); EM/F1 of the int8 export on the whole evaluation set.")
COST_HEADER = ["run", "configuration", "F1", "int8 F1", "int8 EM", "p50 ms (1 thread) fp32 / int8",
               "p95 ms (1 thread) fp32 / int8", "p50 ms (threads) fp32 / int8", "threads", "fp32 MiB", "int8 MiB"]


def measured(runs: list[dict]) -> list[dict]:
    """The runs whose costs hold an inference-cost measurement."""
    return [r for r in runs if (r["costs"].get("inference") or {}).get("int8")]


def not_measured(runs: list[dict]) -> list[tuple[str, str]]:
    """(run id, error) of each run whose inference-cost measurement was attempted and failed."""
    return [(r["id"], str(c["error"])) for r in runs if isinstance(c := r["costs"].get("inference"), dict)
            and c.get("error")]


def cost_rows(runs: list[dict], label) -> list[list[str]]:
    """One row per measured run, in the order of :data:`COST_HEADER`; ``label`` names a run's configuration."""
    rows = []
    for r in measured(runs):
        c = r["costs"]["inference"]
        t, q = c["torch"], c["int8"]
        rows.append([f"`{r['id']}`", label(r), f"{r['metrics']['f1']:.2f}", f"{q['f1']:.2f}", f"{q['exact_match']:.2f}",
                     f"{t['p50_ms_1_thread']:.1f} / {q['p50_ms_1_thread']:.1f}",
                     f"{t['p95_ms_1_thread']:.1f} / {q['p95_ms_1_thread']:.1f}", f"{t['p50_ms']:.1f} / {q['p50_ms']:.1f}",
                     str(c["threads"]), f"{c['merged_size_bytes'] / 2**20:.1f}", f"{c['int8_size_bytes'] / 2**20:.1f}"])
    return rows
