"""Training: one run, top to bottom — data, features, model + strategy, AdamW loop, checkpoints, evaluation.

Why a hand-written loop on `accelerate` rather than `transformers.Trainer`: the data order here is a
pure function of (seed, step) — length-grouped, dynamically padded batches built from the unpadded
windows — so ``--resume`` needs only the weights, optimizer, scheduler and RNG states to continue
exactly where an interrupted run stopped; a NaN/inf loss is caught before it reaches the weights; and
the whole path stays readable in one file. `accelerate` provides device placement and data-parallel
wrapping, so the same code runs under ``accelerate launch`` or ``torchrun`` (each rank takes its slice
of every global batch; only rank 0 writes).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from qatune.answer.inference import InferenceConfig, save_settings
from qatune.config import TrainConfig
from qatune.data.batches import BatchPlan, Prefetcher
from qatune.data.features import PAD_MULTIPLE, cached_features, collate
from qatune.data.splits import load_role, load_training, subsample
from qatune.errors import Interrupted, Paused, TrainingError
from qatune.methods import adapter_widths, apply_method, method, to_save
from qatune.model import flops
from qatune.model.load import (
    attention_kernel,
    check_segment_inputs,
    check_seq_length,
    eval_attention,
    load_qa_model,
    load_tokenizer,
    parameter_counts,
    set_attention,
)
from qatune.model.machine import LoadMeter, reset_peak_memory, resolve_precision
from qatune.record import RunRecord
from qatune.rundir import RunDir, write_evaluation
from qatune.train.checkpoints import (
    apply_checkpoint,
    latest_intact_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from qatune.train.guard import LossGuard
from qatune.train.keep import Keeper
from qatune.train.runrecord import run_record
from qatune.train.signals import STOP
from qatune.train.stepcost import StepCosts
from qatune.train.tracking import tensorboard_writer

COMPILE_PAD_MULTIPLE = 64  # torch.compile: few distinct batch widths, so few recompilations / CUDA graphs
PROGRESS_EVERY_S = 2.0
# a run's training record before its first step: the time, CPU, windows, tokens and loss points of its attempts
FRESH = {"train_s": 0.0, "process_cpu_s": 0.0, "windows": 0, "tokens": 0, "loss_curve": []}
CURVE_SEED = 0  # one learning-curve subset for every run and seed, so curves compare


# ---------------------------------------------------------------------------------------------- the run
class Recipe:
    """One training run in three stages — :meth:`setup` (data, model, optimizer, resume), :meth:`train`
    (the optimizer loop) and :meth:`finish` (save, evaluate, write the :class:`RunRecord`).

    The loop never waits for the device inside a step: losses are summed on the device and read every
    ``logging_steps``; a non-finite loss is caught on the device (:class:`qatune.train.guard.LossGuard`) and the run
    stops at the next check (logging step or checkpoint, whichever comes first).
    """

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output_dir)
        self.dir = RunDir(self.out)

    # ------------------------------------------------------------------ setup
    def setup(self) -> RunRecord | None:
        """Everything before the first step; returns the stored record when ``resume`` finds a finished run."""
        from accelerate import Accelerator, PartialState
        from accelerate.state import AcceleratorState
        from transformers import get_linear_schedule_with_warmup, set_seed

        cfg = self.cfg
        cpu = not torch.cuda.is_available()  # accelerate only starts gloo data parallelism on CPUs when told
        state = PartialState(cpu=cpu)  # knows the device and the data-parallel ranks (torchrun / accelerate)
        self.main = state.is_main_process
        ckpts = list_checkpoints(self.dir.checkpoints)
        done = self.dir.claim(cfg, ckpts[-1][1] if ckpts else None, write=self.main)
        if done is not None:
            return done
        set_seed(cfg.seed)
        reset_peak_memory(state.device)
        t_setup = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg.model)
        self.eval_data = load_role(cfg, "eval") if cfg.eval_data else None
        self.train_data, self.val_data = load_training(cfg, self.eval_data)  # no test article in the training data
        self.infer = InferenceConfig.for_run(cfg, self.train_data.version.startswith("2"))
        self.feats = cached_features(self.train_data.examples, self.tokenizer, cfg.max_seq_length, cfg.doc_stride,
                                     cfg.feature_cache_dir)
        if cfg.eval_steps:  # up to eval_subset questions (all when None), the same draw for every run
            source = self.val_data or self.eval_data  # validation data when there is some: never the test questions
            n = min(cfg.eval_subset or len(source), len(source))
            self.curve_data = source.with_examples(subsample(source.examples, n, CURVE_SEED))

        model = load_qa_model(cfg.model, cfg.num_layers, cfg.attention_dropout,
                              attention_kernel(cfg.attention, state.device))
        check_seq_length(model.config, cfg.max_seq_length, cfg.model)
        self.model_type = model.config.model_type
        self.attention = getattr(model.config, "_attn_implementation", None)
        self.eval_attention = eval_attention(cfg.attention, model)
        self.attention_dropout = getattr(model.config, "attention_probs_dropout_prob",
                                         getattr(model.config, "attention_dropout", None))
        self.precision = resolve_precision(cfg.precision, state.device, self.model_type)
        # Accelerate runs the forward pass under autocast for bf16/fp16 and scales fp16 losses. Its state is a
        # process-wide singleton: reset it so runs in one process may use different precisions.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = acc = Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(self.precision, self.precision))
        self.method = method(cfg.strategy)
        model = apply_method(model, cfg.strategy, self.method.settings(cfg))
        check_segment_inputs(model, self.tokenizer)  # the model sees every input a window has, or no run
        self.counts = {**parameter_counts(model),
                       **adapter_widths(model, getattr(cfg, self.method.rank) if self.method.rank else None)}

        self.world, self.rank = acc.num_processes, acc.process_index
        self._pad_multiple = COMPILE_PAD_MULTIPLE if cfg.compile else PAD_MULTIPLE
        # counted on the architecture, on the meta device
        self.costs = StepCosts(self._plan(), self.feats.lengths, flops.for_config(cfg), cfg.grad_accum, self.world,
                               cfg.max_seq_length, cfg.pad_to_max_length, self._pad_multiple)
        self.n_batches = self.costs.plan.n_batches
        self.steps_per_epoch = max(1, self.n_batches // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        if cfg.max_train_flops:
            self.total_steps = self.costs.steps_for(cfg.max_train_flops)
        decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n)]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n)]
        # The fused kernel updates every parameter in a few launches and honours ``found_inf``.
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.resolved_learning_rate(), fused=True)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * self.total_steps),
                                                         self.total_steps)
        model.to(acc.device)
        self.start_step, self.before = 0, dict(FRESH)
        self.last_ckpt = None
        if ckpts:
            self.last_ckpt, weights, state = latest_intact_checkpoint(ckpts)
            # the earlier attempts' record; from checkpoints of earlier versions only their time (None: not known)
            self.before = state.get("history") or {**FRESH, "train_s": state.get("train_s")}
            self.start_step = apply_checkpoint(self.last_ckpt, weights, state, model, self.optimizer, self.scheduler)
        if cfg.early_stopping_patience and self.world > 1:
            raise TrainingError("early_stopping_patience needs one process (its ranks would have to agree on the "
                                "step to stop at); run without torchrun/accelerate launch, or without early stopping")
        self.model, self.acc_optimizer = acc.prepare(model, self.optimizer)
        # A compiled view for the forward pass; saving and evaluation use the module itself.
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.setup_s = time.perf_counter() - t_setup
        return None

    def _plan(self) -> BatchPlan:
        cfg = self.cfg
        return BatchPlan(self.feats.lengths, cfg.batch_size, self.world, cfg.seed, cfg.group_by_length)

    def _batch(self, m: int) -> tuple[int, dict]:
        rows = self.plan.rows(m, self.rank)
        return len(rows), collate(self.feats, rows, self.tokenizer.pad_token_id, self.cfg.pad_to_max_length,
                                  self._pad_multiple)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc, device = self.cfg, self.acc, self.acc.device
        self.guard = LossGuard(device, cfg.grad_accum, (lambda t: acc.reduce(t, reduction="sum"))
                               if self.world > 1 else None)
        if self.precision != "fp16":  # fp16: accelerate's GradScaler already skips non-finite steps
            self.optimizer.found_inf, self.optimizer.grad_scale = self.guard.bad, None
        loss_sum, loss_n = torch.zeros((), device=device), 0
        self.curve: list[list[float]] = []
        # learning-curve points of an interrupted attempt, up to the checkpoint this one resumed from
        self.eval_curve = self.dir.read_curve(self.start_step) if cfg.eval_steps and self.start_step else []
        if cfg.eval_steps and self.main:  # and their per-question scores (none for a run that starts afresh)
            self.dir.keep_question_scores(self.start_step)
        self.keeper = Keeper(cfg.resolved_keep(), cfg.early_stopping_patience, self.dir.checkpoints, self.eval_curve)
        if self.main:
            self.keeper.restore(self.start_step)
        self.curve_eval_s = 0.0
        self.windows_seen = self.tokens_seen = 0
        self.plan = self._plan()
        graceful = self.world == 1  # with several ranks a stop would need agreeing on the step: they just end
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"train {cfg.strategy}", unit="step",
                   disable=not (self.progress and self.main), dynamic_ncols=True)
        prefetch = Prefetcher(self._batch, self.start_step * cfg.grad_accum, self.total_steps * cfg.grad_accum,
                              pin=device.type == "cuda")
        self.model.train()
        self.end_step = self.start_step if self.keeper.stalled() else self.total_steps  # an early stop, resumed
        if cfg.pause_at is not None:  # a tuning candidate trains up to its rung
            self.end_step = max(self.start_step, min(self.end_step, cfg.pause_at))
        events = [] if device.type == "cuda" else None  # (start, end) per step: device time, read at the end
        load = LoadMeter()
        self.cpu0 = load.cpu0
        t0 = last_progress = self.t0 = time.perf_counter()
        self._write_progress(self.start_step, t0)
        try:
            for step in range(self.start_step, self.end_step):
                if events is not None:
                    events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                    events[-1][0].record()
                for micro in range(cfg.grad_accum):
                    m = step * cfg.grad_accum + micro
                    n_rows, batch = prefetch.next()
                    self.tokens_seen += int(batch["attention_mask"].sum())  # host tensor: no device sync
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    sync = acc.no_sync(self.model) if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                    with sync:
                        loss = self.forward(**batch).loss
                        self.guard.flag(loss, m)
                        acc.backward(loss / cfg.grad_accum)
                    loss_sum += loss.detach().float()
                    loss_n += 1
                    self.windows_seen += n_rows
                acc.clip_grad_norm_(self.model.parameters(), 1.0)
                self.acc_optimizer.step()
                self.scheduler.step()
                self.acc_optimizer.zero_grad(set_to_none=True)
                if events is not None:
                    events[-1][1].record()
                bar.update(1)
                done = step + 1
                if done % cfg.logging_steps == 0 or done == self.total_steps:
                    self.guard.check(self.last_ckpt)
                    mean = float(loss_sum / loss_n)
                    self.curve.append([done, mean])
                    loss_sum.zero_()
                    loss_n = 0
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{mean:.3f}", win_s=f"{self.windows_seen * self.world / elapsed:.1f}")
                    if self.writer:
                        self.writer.add_scalar("train/loss", mean, done)
                        self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], done)
                if cfg.eval_steps and (done % cfg.eval_steps == 0 or done == self.total_steps):
                    self._curve_point(done)
                early = self.keeper.stalled()
                stopping = graceful and STOP.is_set()
                if done % cfg.save_steps == 0 or done == self.end_step or stopping or early:
                    self.guard.check(self.last_ckpt)
                    self._save_checkpoint(done)
                if early:  # the schedule is the full run's: stopping early only leaves out its last steps
                    self.end_step = done
                    break
                if stopping:
                    raise Interrupted(f"stopped at step {done} of {self.total_steps}; checkpoint saved at "
                                      f"{self.last_ckpt}; run again with --resume to continue")
                if self.main and time.perf_counter() - last_progress > PROGRESS_EVERY_S:
                    last_progress = time.perf_counter()
                    self._write_progress(done, t0)
        finally:
            prefetch.close()
            bar.close()
        self.guard.check(self.last_ckpt)
        if cfg.pause_at is not None:
            self._pause()
        self.train_s = time.perf_counter() - t0 - self.curve_eval_s
        self.load = load.read()
        if events is not None:
            torch.cuda.synchronize()
            self.load["device_s"] = sum(a.elapsed_time(b) for a, b in events) / 1000
        self._write_progress(self.end_step, t0)

    def _pause(self) -> None:
        """A candidate at its rung: the validation score of the model it would keep, then :class:`Paused` (its
        checkpoint at this step is written; the test data is not touched)."""
        if not self.eval_curve or self.eval_curve[-1]["step"] != self.end_step:
            self._curve_point(self.end_step)
        if not any(step == self.end_step for step, _ in list_checkpoints(self.dir.checkpoints)):
            self._save_checkpoint(self.end_step)
        score = self.keeper.kept()["f1"]
        # a run that stopped early stands for its rung there; one shorter than the rung pauses at its end
        at = min(self.cfg.pause_at, self.total_steps)
        if self.main:
            self.dir.write_pause(at, score, end=at == self.total_steps)
        raise Paused(at, score, end=at == self.total_steps)

    def windows_through(self, step: int) -> int:
        """Training windows (all ranks) that went into optimizer steps [0, step): every epoch passes each once."""
        epochs, batches = divmod(step * self.cfg.grad_accum, self.n_batches)
        return epochs * len(self.feats) + min(batches * self.cfg.batch_size * self.world, len(self.feats))

    def _curve_point(self, step: int) -> None:
        """F1/EM of the model as it is now on the learning-curve questions, and each question's F1 (0-100, in
        question_scores.json); its time is not training time."""
        if self.main:
            from qatune.answer.inference import Reader
            from qatune.answer.metrics import squad_v1_scores, squad_v2_scores

            t = time.perf_counter()
            module = self.acc.unwrap_model(self.model)
            reader = Reader.live(module, self.tokenizer, self.infer, self.precision)
            with self._evaluating(module):
                m, decoded = reader.evaluate(self.curve_data, cache_dir=self.cfg.feature_cache_dir)
            point = {"step": step, "windows": self.windows_through(step), "flops": self.costs.through(step),
                     "exact_match": m["exact_match"],
                     "f1": m["f1"]}
            self.keeper.add(point, self.acc.unwrap_model(self.model))
            self.dir.write_curve(self.eval_curve)
            refs = self.curve_data.references()
            scores = (squad_v2_scores(refs, decoded.predictions, decoded.null_odds)  # as the curve's F1 counts them
                      if self.curve_data.version.startswith("2") else squad_v1_scores(refs, decoded.predictions))
            self.dir.write_question_scores(step, {q: 100 * f1 for q, (_, f1) in scores.items()})
            if self.writer:
                self.writer.add_scalar("curve/f1", point["f1"], step)
                self.writer.add_scalar("curve/exact_match", point["exact_match"], step)
            self.curve_eval_s += time.perf_counter() - t
        self.acc.wait_for_everyone()

    @contextlib.contextmanager
    def _evaluating(self, module):
        """A learning-curve evaluation with the evaluation kernel, then back to the training one."""
        if self.eval_attention == self.attention:
            yield
            return
        set_attention(module, self.eval_attention)
        try:
            yield
        finally:
            set_attention(module, self.attention)

    def _save_checkpoint(self, step: int) -> None:
        self.acc.wait_for_everyone()
        if self.main:
            self.last_ckpt = save_checkpoint(self.dir.checkpoints, step, self.acc.unwrap_model(self.model),
                                             self.optimizer, self.scheduler, self.cfg.keep_checkpoints, self.cfg,
                                             self._history(time.perf_counter() - self.t0 - self.curve_eval_s,
                                                           time.process_time() - self.cpu0))
            self.keeper.checkpointed()

    def _history(self, train_s: float, cpu_s: float) -> dict:
        """The training record of every attempt through now: the earlier attempts' and this one's."""
        b = self.before
        return {"train_s": None if b["train_s"] is None else b["train_s"] + train_s,
                "process_cpu_s": b["process_cpu_s"] + cpu_s, "windows": b["windows"] + self.windows_seen,
                "tokens": b["tokens"] + self.tokens_seen, "loss_curve": b["loss_curve"] + self.curve}

    def _write_progress(self, step: int, t0: float) -> None:
        """The run's progress for a study's --status: which step, how fast, where (advisory)."""
        if not self.main:
            return
        elapsed = time.perf_counter() - t0
        self.dir.write_progress({
            "step": step, "total_steps": self.total_steps, "host": platform.node(), "pid": os.getpid(),
            "device": str(self.acc.device), "loss": self.curve[-1][1] if self.curve else None,
            "windows_per_s": self.windows_seen * self.world / elapsed if elapsed > 0 else None,
            "updated_at": time.time()})

    # ------------------------------------------------------------------ finish
    def finish(self) -> RunRecord | None:
        """Save the model, evaluate it, write metrics and run.json; returns the record (None on ranks > 0)."""
        cfg, record = self.cfg, None
        if self.main:
            # without accelerate's autocast wrapper: the evaluation runs at the inference precision, as a Reader would
            module = self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)
            if self.eval_attention != self.attention:  # training is over: evaluate (and save) with its kernel
                set_attention(module, self.eval_attention)
            validation = self._keep(module)
            self.dir.save_model(to_save(module, cfg.strategy), self.tokenizer, cfg.model, self._write_settings)
            eval_s, metrics, inference = 0.0, {}, {}
            if self.eval_data is not None:
                from qatune.answer.inference import Reader

                t1 = time.perf_counter()
                reader = Reader(module, self.tokenizer, self.infer, device=self.acc.device)
                v2 = self.eval_data.version.startswith("2")
                tune = v2 and self.val_data is None  # with validation data its tuned threshold is applied unchanged
                metrics, decoded = reader.evaluate(self.eval_data, self.progress, cfg.feature_cache_dir,
                                                   tune_null_threshold=tune)
                if tune:  # the model is saved with the threshold its predictions used
                    self.infer = replace(self.infer, null_threshold=metrics["null_threshold"])
                    self._write_settings(self.dir.model)
                eval_s = time.perf_counter() - t1
                write_evaluation(self.out, metrics, decoded, v2)
                if cfg.inference_cost:
                    from qatune.answer.cost import measure

                    inference = measure(self.dir.model, self.eval_data, progress=self.progress)
            else:
                write_evaluation(self.out, metrics)
            record = run_record(self, metrics, eval_s, inference, validation)
            record.save(self.dir.record)
            if self.writer:
                for k, v in metrics.items():
                    if isinstance(v, float):
                        self.writer.add_scalar(f"eval/{k}", v, self.end_step)
        self.acc.wait_for_everyone()
        return record

    def _keep(self, module) -> dict:
        """Put the kept step's weights into ``module`` (keep = best), tune a SQuAD v2 null threshold on the validation
        data, and return what the kept model scored there (run.json's ``validation``); {} without validation data."""
        if self.val_data is None:
            return {}
        from qatune.answer.inference import Reader

        kept = self.keeper.load_kept(module, self.end_step)
        out = {"keep": self.keeper.keep, "source": self.val_data.source, "stopped_at": None}
        if self.end_step < self.total_steps:
            out["stopped_at"] = self.end_step
        reader = Reader(module, self.tokenizer, self.infer, device=self.acc.device)
        if kept is None:  # no learning curve: the final model on the validation data
            m, _ = reader.evaluate(self.val_data, cache_dir=self.cfg.feature_cache_dir)
            kept = {"step": self.end_step, "exact_match": m["exact_match"], "f1": m["f1"]}
        out.update(best_step=kept["step"], exact_match=kept["exact_match"], f1=kept["f1"],
                   questions=len(self.curve_data) if self.cfg.eval_steps else len(self.val_data))
        if self.val_data.version.startswith("2"):
            m, _ = reader.evaluate(self.val_data, cache_dir=self.cfg.feature_cache_dir, tune_null_threshold=True)
            self.infer = replace(self.infer, null_threshold=m["null_threshold"])
            out.update(null_threshold=m["null_threshold"], threshold_questions=len(self.val_data))
        return out

    def _write_settings(self, model_dir: Path) -> None:
        """The saved model's inference configuration, and what the model is (qatune.json)."""
        save_settings(model_dir, self.infer, strategy=self.cfg.strategy, base_model=self.cfg.model, format="torch",
                      num_layers=self.cfg.num_layers)


def train(cfg: TrainConfig, progress: bool = True) -> RunRecord | None:
    """Train, save and evaluate one run; returns its record (also written as run.json), None on ranks > 0."""
    recipe = Recipe(cfg, progress)
    done = recipe.setup()
    if done is not None:
        return done
    recipe.writer = tensorboard_writer(cfg.report_to, recipe.dir.tensorboard) if recipe.main else None
    try:
        recipe.train()
        return recipe.finish()
    finally:
        if recipe.writer:
            recipe.writer.close()


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "layernorm" in name.lower()
