"""Calibration: time a few optimizer steps of each distinct run shape on this machine, and project wall times.

A dry run's FLOP estimate says little about wall time on a given CPU or GPU (MobileBERT's many small ops,
LoRA's extra matmuls at high rank, bf16 support), so ``qatune study --dry-run --calibrate`` measures instead.
Step time depends on the architecture, the strategy and the tensor shapes, not on the weight values, so
each model is built from its config with random weights: this works offline for hub ids whose config is
the transformers default (the seed study's models) and for local directories.

"""

from __future__ import annotations

import dataclasses
import heapq
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qatune.config import TrainConfig
from qatune.methods import method
from qatune.model.load import (
    attention_kernel,
    eval_attention,
    model_config,
    model_from_config,
    random_batch,
    set_attention,
)

if TYPE_CHECKING:
    import torch

# Mean padded width of a training batch at max_seq_length 384 / doc_stride 128. SQuAD v1.1 dev windows
# (MiniLM/BERT uncased WordPiece) average 176 tokens (p50 164, p95 304); qatune pads each batch to its
# longest window rounded up to a multiple of 8 and groups windows of similar length, which gives batches
# 183-186 tokens wide on average for batch sizes 4-64 (measured with qatune.data.batches.epoch_batches).
TYPICAL_PADDED_WIDTH = 184
# The same with ``compile``, which pads to multiples of 64 (qatune.train.recipe.COMPILE_PAD_MULTIPLE): 211-214.
TYPICAL_PADDED_WIDTH_COMPILED = 216

# Windows per timed answering batch: enough for the per-window cost of a run's evaluation batches, few enough to
# keep calibration short (the evaluation of a CPU run is in fp32, about 4x a bf16 step's matmul cost per FLOP).
ANSWER_WINDOWS = 8


@dataclass(frozen=True)
class StepKey:
    """Everything that sets the cost of one optimizer step; runs with equal keys share one measurement.

    ``method`` holds the options of the fine-tuning method that change a step's cost (a LoRA rank, not its
    alpha), so runs differing only in other or unused method settings share a key. ``full_width`` means batches
    padded to max_seq_length rather than to their longest window; ``compile`` means a torch.compile'd model.
    """

    model: str
    strategy: str
    method: tuple
    max_seq_length: int
    batch_size: int
    precision: str
    full_width: bool = False
    compile: bool = False
    num_layers: int | None = None
    attention_dropout: float | None = None
    attention: str = "auto"

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> StepKey:
        """The key of a training run. Without length grouping a batch of 32 random SQuAD windows pads to
        ~352 of 384 tokens, so it is timed at full width too (an upper bound for smaller batches)."""
        return cls(model=cfg.model, strategy=cfg.strategy, method=method(cfg.strategy).cost_key(cfg),
                   max_seq_length=cfg.max_seq_length, batch_size=cfg.batch_size, precision=cfg.precision,
                   full_width=cfg.pad_to_max_length or not cfg.group_by_length,
                   compile=cfg.compile, num_layers=cfg.num_layers, attention_dropout=cfg.attention_dropout,
                   attention=cfg.attention)

    @property
    def width(self) -> int:
        """Tokens per window in the timed batch."""
        if self.full_width:
            return self.max_seq_length
        return min(self.max_seq_length, TYPICAL_PADDED_WIDTH_COMPILED if self.compile else TYPICAL_PADDED_WIDTH)

    def describe(self) -> str:
        m = method(self.strategy)
        how = m.describe(dict(self.method, alpha_policy=None)) if m.rank else m.label
        layers = f" ({self.num_layers} layers)" if self.num_layers else ""
        return (f"{self.model}{layers} {how} batch={self.batch_size} width={self.width} "
                f"{self.precision}{' compiled' if self.compile else ''}"
                + (f" attention dropout {self.attention_dropout:g}" if self.attention_dropout is not None else "")
                + (f" {self.attention} attention" if self.attention != "auto" else ""))


# ---------------------------------------------------------------------------------------------- timing
@contextmanager
def _timing_model(key: StepKey, threads: int | None, device: torch.device) -> Iterator[torch.nn.Module]:
    """``key``'s model with random weights on ``device`` (the method's cost options as keyed, the others, which only
    scale values, at the method's defaults), torch's intra-op ``threads`` set for the measurement only (None: leave
    them as they are); threads restored and GPU memory released after."""
    import torch

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    model = None
    try:
        settings = {**method(key.strategy).settings(TrainConfig()), **{k: list(v) if isinstance(v, tuple) else v
                                                                   for k, v in key.method}}
        model = model_from_config(key.model, key.strategy, settings,
                                  num_layers=key.num_layers, attention_dropout=key.attention_dropout,
                                  attention=attention_kernel(key.attention, device))
        yield model.to(device)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.set_num_threads(old_threads)


def _median_s(run: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """The median seconds of ``steps`` calls of ``run`` after ``warmup`` untimed ones (GPU work synchronised)."""
    import torch

    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_step(key: StepKey, threads: int | None = None, steps: int = 3, warmup: int = 1,
              device: str | torch.device = "cpu") -> float:
    """Seconds per optimizer step of ``key``'s run shape: forward, backward, clipping and a fused AdamW step.

    Returns the **median** of ``steps`` timed steps after ``warmup`` untimed ones: a projection needs the
    typical step of a long run, which the minimum understates (it catches the luckiest cache and clock
    state), while the median ignores a one-off stall. ``threads`` sets torch's intra-op threads for the
    measurement only (None: leave them as they are). A compiled key always gets at least one warm-up step:
    it pays for the compilation, which a run pays once.
    """
    import torch

    from qatune.answer.inference import autocast_context
    from qatune.model.machine import resolve_precision

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if key.compile:
        warmup = max(warmup, 1)
    device = torch.device(device)
    with _timing_model(key, threads, device) as model:
        precision = resolve_precision(key.precision, device, model.config.model_type)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        batch = random_batch(model, key.batch_size, key.width, device)
        forward = torch.compile(model) if key.compile else model

        def step() -> None:
            with autocast_context(device, precision):
                loss = forward(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = _median_s(step, steps, warmup, device)
    return seconds


def time_answer(key: StepKey, precision: str, threads: int | None = None, steps: int = 2,
                device: str | torch.device = "cpu", windows: int = ANSWER_WINDOWS) -> float:
    """Seconds per window to answer with ``key``'s model as a run's evaluation does: eval mode, no gradients,
    ``precision`` (a learning-curve point runs at the training precision, the test at the inference precision: fp32
    on a CPU), the evaluation's attention kernel (:func:`qatune.model.load.eval_attention`), LoRA unmerged.
    Median of ``steps`` timed batches of ``windows`` windows at the key's width, after one untimed."""
    import torch

    from qatune.answer.inference import autocast_context

    device = torch.device(device)
    with _timing_model(key, threads, device) as model:
        kernel = eval_attention(key.attention, model)
        if kernel and kernel != getattr(model.config, "_attn_implementation", None):
            set_attention(model, kernel)
        model.eval()
        batch = {k: v for k, v in random_batch(model, windows, key.width, device).items()
                 if k not in ("start_positions", "end_positions")}

        def answer() -> None:
            with torch.inference_mode(), autocast_context(device, precision):
                model(**batch)

        seconds = _median_s(answer, steps, 1, device)
    return seconds / windows


def calibrate_answers(keys: Iterable[StepKey], threads: int | None = None, progress: bool = True,
                      device: str | torch.device = "cpu") -> dict[StepKey, tuple[float, float]]:
    """Per key, seconds per window of a learning-curve evaluation (at the training precision) and of the test
    evaluation (at the inference precision), each distinct shape timed once."""
    import torch

    from qatune.model.machine import resolve_precision

    keys = list(dict.fromkeys(keys))
    canonical = {k: _canonical(k, device) for k in keys}
    measured: dict[StepKey, tuple[float, float]] = {}
    for n, shape in enumerate(dict.fromkeys(canonical.values()), 1):
        if progress:
            print(f"[answer {n}] {shape.describe()} ...", end="", file=sys.stderr, flush=True)
        model_type = getattr(model_config(shape.model), "model_type", "")
        test = resolve_precision("auto", torch.device(device), model_type, training=False)
        curve = time_answer(shape, shape.precision, threads, device=device)
        measured[shape] = (curve, curve if test == shape.precision else time_answer(shape, test, threads, device=device))
        if progress:
            print(f" {measured[shape][0] * 1e3:.1f} / {measured[shape][1] * 1e3:.1f} ms per window", file=sys.stderr,
                  flush=True)
    return {k: measured[canonical[k]] for k in keys}


def _canonical(key: StepKey, device: str | torch.device) -> StepKey:
    """The key with its precision resolved on ``device`` ('auto' and 'bf16' are one shape on a bf16 CPU)."""
    import torch

    from qatune.model.machine import resolve_precision

    model_type = getattr(model_config(key.model), "model_type", "")
    return dataclasses.replace(key, precision=resolve_precision(key.precision, torch.device(device), model_type))


def calibrate(keys: Iterable[StepKey], threads: int | None = None, steps: int = 3, progress: bool = True,
              device: str | torch.device = "cpu", warmup: int = 1) -> dict[StepKey, float]:
    """Seconds per step for every key, each distinct shape timed once; progress goes to stderr (one line per
    shape, each may take a minute on a small CPU) so that stdout stays machine-readable."""
    keys = list(dict.fromkeys(keys))
    canonical = {k: _canonical(k, device) for k in keys}
    shapes = list(dict.fromkeys(canonical.values()))
    measured: dict[StepKey, float] = {}
    for n, shape in enumerate(shapes, 1):
        if progress:
            print(f"[calibrate {n}/{len(shapes)}] {shape.describe()} ...", end="", file=sys.stderr, flush=True)
        measured[shape] = time_step(shape, threads, steps, warmup, device)
        if progress:
            print(f" {measured[shape]:.3f} s/step", file=sys.stderr, flush=True)
    return {k: measured[canonical[k]] for k in keys}


# ---------------------------------------------------------------------------------------------- projection
def project_run_seconds(total_steps: float, s_per_step: float, curve_windows: float, test_windows: float,
                        s_per_window: tuple[float, float], setup_s: float = 0.0, grad_accum: int = 1) -> float:
    """Projected wall time of one run: setup + training steps + its learning-curve evaluations + its test.

    Assumes an optimizer step of ``grad_accum`` micro-batches costs ``grad_accum`` measured steps (the
    optimizer update is a small part of a step); ``s_per_window`` is the measured cost of answering one window in a
    learning-curve evaluation and in the test (:func:`calibrate_answers`). Decoding answers and saving the model
    are not counted."""
    if min(total_steps, curve_windows, test_windows, setup_s, s_per_step, *s_per_window) < 0 or grad_accum < 1:
        raise ValueError("steps, times and window counts must be >= 0, grad_accum >= 1")
    return (setup_s + total_steps * grad_accum * s_per_step + curve_windows * s_per_window[0]
            + test_windows * s_per_window[1])


def makespan(durations: list[float], slots: int, longest_first: bool = True) -> float:
    """Wall time of running ``durations`` on ``slots`` parallel workers, each taking the next run when free.

    ``longest_first``: longest-processing-time-first list scheduling (within 4/3 of the optimal makespan);
    otherwise the runs start in the given order, as the study driver claims them.
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if any(d < 0 for d in durations):
        raise ValueError("durations must be >= 0")
    loads = [0.0] * min(slots, len(durations))
    for d in sorted(durations, reverse=True) if longest_first else durations:
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads, default=0.0)
