"""The run record: what one training run hands back (to the CLI, a study driver or a launcher), as `run.json`.

Free of torch (the ground floor: it imports nothing of qatune), so the study driver, the report and the command
line read and store records without loading a model stack; the run directory around it is :mod:`qatune.rundir`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class RunRecord:
    """One finished run: its full configuration and what it measured."""

    config: dict  # every TrainConfig field as given
    resolved: dict  # what the run decided: learning rate, precision, steps, attention implementation, ...
    seed: int
    data: dict  # sources, question and window counts
    params: dict  # trainable_params, total_params, trainable_percent; lora_min_width, lora_layers(_at_full_rank)
    metrics: dict  # the official SQuAD metric on the evaluation data ({} without evaluation)
    # setup_s, train_s (this attempt), train_s_total (every attempt), eval_s, steps_run, resumed_from_step, train_windows_per_s, train_tokens_per_s, train_flops,
    # train_flop_per_s, process_cpu_s, device_s (GPU), others_cores, cores, curve_eval_s
    timing: dict
    memory: dict  # peak_rss_mb, cuda_peak_mb on a GPU
    environment: dict  # library versions and hardware
    loss: dict = field(default_factory=dict)  # final (last logging window's mean) and curve [[step, mean]]
    curve: list = field(default_factory=list)  # learning curve: [{step, windows, exact_match, f1}] (eval_steps)
    inference: dict = field(default_factory=dict)  # what the model costs to run (qatune.answer.cost.measure); {} if not measured
    # the kept model on the validation data: keep, best_step, exact_match, f1, questions, stopped_at (early
    # stopping), null_threshold (v2, tuned here); {} without validation data
    validation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    def costs(self) -> dict:
        """The cost columns a study stores and reports: parameter counts, time, throughput, memory."""
        t, m = self.timing, self.memory
        return {**self.params, "train_s": t.get("train_s_total") or t["train_s"], "eval_s": t["eval_s"],
                "train_windows_per_s": t["train_windows_per_s"], "train_tokens_per_s": t["train_tokens_per_s"],
                "peak_rss_mb": m["peak_rss_mb"], "cuda_peak_mb": m.get("cuda_peak_mb"),
                "resumed_from_step": t["resumed_from_step"], "train_questions": self.data["train_questions"],
                "train_windows": self.data["train_windows"], "precision": self.resolved["precision"],
                "final_loss": self.loss.get("final"), "train_flops": t.get("train_flops"),
                "train_flop_per_s": t.get("train_flop_per_s"), "process_cpu_s": t.get("process_cpu_s"),
                "device_s": t.get("device_s"), "others_cores": t.get("others_cores"), "cores": t.get("cores"),
                "inference": self.inference or None, "validation": self.validation or None,
                "curve_on": self.data.get("curve_on")}


def exact_match(metrics: dict) -> float:
    """A run's exact match whatever its SQuAD version (v2 records written before 2026-12-02 call it "exact")."""
    return metrics.get("exact_match", metrics.get("exact", float("nan")))


def write_json_atomic(path: Path, obj, durable: bool = True) -> None:
    """Write to a temporary file (fsync unless ``durable`` is off), then rename: readers see the old file or
    the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
