"""A finished run's record (run.json): what it was and what it cost, read off the recipe (``self``, a
:class:`qatune.train.recipe.Recipe`) that trained it."""

from __future__ import annotations

from dataclasses import asdict

from qatune.methods import effective_alpha
from qatune.model.machine import environment, peak_memory
from qatune.record import RunRecord


def run_record(self, metrics: dict, eval_s: float, inference: dict, validation: dict) -> RunRecord:
    """What this run was and what it cost: configuration, resolved settings, data, parameters, metrics, times."""
    cfg, train_s, world = self.cfg, self.train_s, self.world
    run_flops = self.costs.between(0, self.end_step)
    whole = self._history(train_s, self.load["process_cpu_s"])  # every attempt: the rates cover every step
    if whole["train_s"] is None:  # an earlier version's checkpoint: this attempt's steps only
        whole = {**whole, "train_s": train_s, "windows": self.windows_seen, "tokens": self.tokens_seen}
        run_flops_timed = self.costs.between(self.start_step, self.end_step)
    else:
        run_flops_timed = run_flops
    return RunRecord(
        config=asdict(cfg),
        resolved={"learning_rate": cfg.resolved_learning_rate(), "precision": self.precision,
                  "model_type": self.model_type, "attention": self.attention,
                  "eval_attention": self.eval_attention, "attention_dropout": self.attention_dropout,
                  "compile": cfg.compile,
                  "world_size": world, "total_steps": self.total_steps,
                  "steps_per_epoch": self.steps_per_epoch, "train_windows": len(self.feats),
                  "lora_alpha_effective": effective_alpha(self.method.settings(cfg))
                  if "alpha_policy" in self.method.options else None},
        seed=cfg.seed,
        data={"train_source": self.train_data.source, "train_questions": len(self.train_data),
              "train_windows": len(self.feats),
              "eval_source": self.eval_data.source if self.eval_data else None,
              "eval_questions": len(self.eval_data) if self.eval_data else 0,
              "validation_questions": len(self.val_data) if self.val_data else 0,
              "curve_on": ("validation" if self.val_data else "eval") if self.cfg.eval_steps else None,
              # where a SQuAD v2 null threshold was tuned: "eval" is an oracle (tuned on the test questions)
              "null_threshold_on": "validation" if self.val_data and self.val_data.version.startswith("2")
              else "eval" if not self.val_data and self.eval_data and self.eval_data.version.startswith("2")
              else None},
        params=self.counts,
        metrics=metrics,
        timing={"setup_s": self.setup_s, "train_s": train_s, "eval_s": eval_s,
                # every attempt's training time (a resumed run, a tuning candidate promoted rung by rung)
                "train_s_total": None if self.before["train_s"] is None else whole["train_s"],
                "steps_run": self.end_step - self.start_step, "resumed_from_step": self.start_step,
                # rates over every step the run trained (every attempt), and its CPU time
                "train_windows_per_s": whole["windows"] * world / whole["train_s"] if whole["train_s"] else None,
                "train_tokens_per_s": whole["tokens"] * world / whole["train_s"] if whole["train_s"] else None,
                "train_flops": run_flops,  # counted FLOPs of the whole run (all ranks)
                "train_flop_per_s": run_flops_timed / whole["train_s"] if whole["train_s"] else None,
                "process_cpu_s": whole["process_cpu_s"], "device_s": self.load.get("device_s"),
                "others_cores": self.load["others_cores"], "cores": self.load["cores"],
                "curve_eval_s": self.curve_eval_s},
        memory=peak_memory(self.acc.device),
        environment=environment(self.acc.device),
        loss={"final": whole["loss_curve"][-1][1] if whole["loss_curve"] else None, "curve": whole["loss_curve"]},
        curve=self.eval_curve,
        inference=inference,
        validation=validation,
    )

