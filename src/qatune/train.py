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
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import queue
import random
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from qatune import flops
from qatune.data import SquadData, SquadDataError, load_squad, select_articles, subsample
from qatune.errors import ConfigError, FileError, QatuneError
from qatune.features import MIN_SEQ_LENGTH, PAD_MULTIPLE, batch_width, cached_features, collate
from qatune.models import (
    LoraSettings,
    ModelError,
    apply_strategy,
    check_segment_inputs,
    load_qa_model,
    load_tokenizer,
    parameter_counts,
)
from qatune.record import RunRecord, write_json_atomic
from qatune.tracking import REPORT_TO, tensorboard_writer

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_PAD_MULTIPLE = 64  # torch.compile: few distinct batch widths, so few recompilations / CUDA graphs
PROGRESS_EVERY_S = 2.0
CURVE_SEED = 0  # one learning-curve subset for every run and seed, so curves compare


class TrainingError(QatuneError, RuntimeError):
    """A run that cannot go on; the message says at which step and what was kept."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that defines a training run (what `run.json` records and a study varies)."""

    model: str = _f("minilm-l6", "hub id, local directory or alias (minilm-l6)")
    strategy: str = _f("full", "full | lora")
    lora_rank: int = _f(32, "LoRA rank r")
    lora_alpha: float = _f(32.0, "LoRA alpha (ignored by the proportional policy, which uses 2r)")
    alpha_policy: str = _f("fixed", "fixed (alpha/r) | proportional (alpha=2r) | rslora (alpha/sqrt(r))")
    lora_dropout: float = _f(0.1, "dropout on the LoRA input")
    lora_targets: list[str] | None = _f(None, "module-name suffixes to adapt (default: per architecture)")
    train_data: str = _f("", "SQuAD JSON file or datasets id[:split]")
    train_split: str = _f("train", "split when train_data is a datasets id")
    train_articles: str | None = _f(None, "1-based article ranges in file order, e.g. 1-36")
    train_questions: int | float | None = _f(None, "question count (int) or fraction (float) drawn with the seed")
    eval_data: str | None = _f(None, "SQuAD JSON file or datasets id[:split]; none skips evaluation")
    eval_split: str = _f("validation", "split when eval_data is a datasets id")
    eval_articles: str | None = _f(None, "1-based article ranges, e.g. 37-48")
    eval_questions: int | float | None = _f(None, "question count or fraction drawn with the seed")
    repair_answers: bool = _f(False, "move answers not found at answer_start to the nearest occurrence")
    output_dir: str = _f("runs/qatune", "where checkpoints, the model and results go")
    max_seq_length: int = _f(384, "tokens per window")
    doc_stride: int = _f(128, "overlap between windows, in tokens")
    epochs: float = _f(2.0, "passes over the training windows (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps; 0 means use epochs")
    learning_rate: float | None = _f(None, "peak learning rate (default 1e-4 full, 5e-4 lora)")
    warmup_ratio: float = _f(0.1, "fraction of steps with linear warm-up")
    weight_decay: float = _f(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    batch_size: int = _f(32, "windows per batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    eval_batch_size: int = _f(64, "windows per evaluation batch")
    seed: int = _f(42, "seed for data subsets, order, initialisation and dropout")
    precision: str = _f("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 where the hardware has it)")
    pad_to_max_length: bool = _f(False, "pad every batch to max_seq_length (for comparisons)")
    group_by_length: bool = _f(True, "batch windows of similar length together")
    save_steps: int = _f(200, "checkpoint every N optimizer steps (and at the end)")
    keep_checkpoints: int = _f(1, "how many recent checkpoints to keep")
    logging_steps: int = _f(10, "log loss every N steps")
    eval_steps: int = _f(0, "learning curve: F1 on eval_subset every N optimizer steps and at the end (0: off)")
    eval_subset: int | None = _f(500, "learning-curve questions: up to this many of the evaluation data (fixed draw)")
    n_best: int = _f(20, "start/end candidates per window when decoding")
    max_answer_length: int = _f(30, "longest answer in tokens")
    null_threshold: float = _f(0.0, "SQuAD v2: answer '' when null score - best span > this (with v2 evaluation "
                                    "data the run tunes it for the best F1 and saves that with the model)")
    resume: bool = _f(False, "continue from the last checkpoint in output_dir")
    report_to: str = _f("none", "none | tensorboard | mlflow")
    feature_cache_dir: str | None = _f(None, "reuse tokenised windows across runs from this directory")
    compile: bool = _f(False, "torch.compile the model (batches padded to multiples of 64 to bound recompiles)")
    inference_cost: bool = _f(False, "after evaluation, measure what the model costs to run: latency, size on disk, "
                                     "int8 ONNX accuracy (needs qatune[onnx]; the study presets turn it on)")

    def __post_init__(self) -> None:
        check_config(self)

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.strategy == "full" else 5e-4

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# Allowed values and ranges, checked whenever a TrainConfig is built (CLI, TOML, study files, Python):
# a bad value is refused before any data or weights load, with the option, the value and what is allowed.
CHOICES = {"strategy": ("full", "lora"), "alpha_policy": ("fixed", "proportional", "rslora"),
           "precision": PRECISIONS, "report_to": REPORT_TO}
AT_LEAST_1 = ("lora_rank", "max_steps_if_set", "batch_size", "grad_accum", "eval_batch_size", "save_steps",
              "keep_checkpoints", "logging_steps", "n_best", "max_answer_length")


def _type_ok(value, hint) -> bool:
    import types
    import typing

    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _type_name(hint) -> str:
    import typing

    return str(hint).replace("typing.", "") if typing.get_args(hint) else hint.__name__


def check_config(cfg: TrainConfig) -> None:
    """Refuse a configuration with a wrong type or an out-of-range value; the message names the option
    (as in a TOML file; the flag is the same with dashes), the value and what is allowed."""
    import typing

    from qatune.data import SquadDataError, parse_ranges

    def bad(name: str, allowed: str) -> ConfigError:
        return ConfigError(f"option {name} = {getattr(cfg, name)!r} is not allowed: {allowed} "
                           f"(flag --{name.replace('_', '-')})")

    for f, hint in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, f)
        if not _type_ok(value, hint):
            raise bad(f, f"expected {_type_name(hint)}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(f, "must be a finite number")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise bad(name, f"choose one of {', '.join(allowed)}")
    for name in AT_LEAST_1:
        if name == "max_steps_if_set":
            if cfg.max_steps < 0:
                raise bad("max_steps", "must be >= 0 (0 trains for --epochs)")
        elif getattr(cfg, name) < 1:
            raise bad(name, "must be a whole number >= 1")
    if not cfg.model.strip():
        raise bad("model", "give a hub id, a local directory or the alias minilm-l6")
    if cfg.max_seq_length < MIN_SEQ_LENGTH:
        raise bad("max_seq_length", f"must be >= {MIN_SEQ_LENGTH} tokens")
    if not 0 <= cfg.doc_stride < cfg.max_seq_length:
        raise bad("doc_stride", f"must be >= 0 and smaller than max_seq_length ({cfg.max_seq_length})")
    if cfg.eval_steps < 0:
        raise bad("eval_steps", "must be >= 0 (0: no learning curve)")
    if cfg.eval_steps and not cfg.eval_data:
        raise bad("eval_steps", "needs eval_data: the learning curve is measured on evaluation questions")
    if cfg.eval_subset is not None and cfg.eval_subset < 1:
        raise bad("eval_subset", "must be >= 1 question (or unset for all evaluation questions)")
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        raise bad("epochs", "must be > 0 (or set max_steps)")
    if cfg.learning_rate is not None and not 0 < cfg.learning_rate < 1:
        raise bad("learning_rate", "must be in (0, 1), e.g. 1e-4")
    if not 0 <= cfg.warmup_ratio < 1:
        raise bad("warmup_ratio", "must be in [0, 1)")
    if cfg.weight_decay < 0:
        raise bad("weight_decay", "must be >= 0")
    if not 0 <= cfg.lora_dropout < 1:
        raise bad("lora_dropout", "must be in [0, 1)")
    if cfg.lora_alpha <= 0:
        raise bad("lora_alpha", "must be > 0")
    if cfg.lora_targets is not None and not all(t.strip() for t in cfg.lora_targets) or cfg.lora_targets == []:
        raise bad("lora_targets", "give module-name suffixes such as q_lin v_lin, or leave it unset")
    for name in ("train_questions", "eval_questions"):
        q = getattr(cfg, name)
        if isinstance(q, float) and not 0 < q <= 1:
            raise bad(name, "a fraction must be in (0, 1]; a question count is a whole number >= 1")
        if isinstance(q, int) and q < 1:
            raise bad(name, "a question count must be >= 1 (or a fraction in (0, 1])")
    for name in ("train_articles", "eval_articles"):
        spec = getattr(cfg, name)
        if spec is not None:
            try:
                parse_ranges(spec)
            except SquadDataError as e:
                raise bad(name, str(e)) from None



NOT_IN_HASH = ("output_dir", "resume", "report_to", "feature_cache_dir", "compile", "inference_cost")  # where/how
# Options added later: part of a run's identity only when set, so the runs of existing studies keep their ids.
IN_HASH_WHEN_SET = ("eval_steps", "eval_subset")


def config_hash(cfg: TrainConfig | dict, leave_out: tuple[str, ...] = ()) -> str:
    """What one run *is*: a hash of its configuration without where or how it runs (a study's run id)."""
    d = asdict(cfg) if isinstance(cfg, TrainConfig) else cfg
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name in IN_HASH_WHEN_SET}
    d = {k: v for k, v in d.items() if k not in NOT_IN_HASH and k not in leave_out
         and not (k in defaults and v == defaults[k])}
    if d.get("strategy") == "lora":  # LoRA runs before this mark never saw segment ids: they are other runs
        d["lora_forward"] = "all inputs"
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def config_differences(stored: dict, cfg: TrainConfig) -> list[str]:
    """The settings in which a stored run differs from ``cfg`` ("name: stored -> given")."""
    given = asdict(cfg)
    try:  # fill options an older version did not record with their defaults
        stored = asdict(TrainConfig.from_dict({k: v for k, v in stored.items() if k in given}))
    except ValueError:
        pass
    return [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in given.items()
            if k not in NOT_IN_HASH and stored.get(k) != v]


def stored_config(out: Path) -> dict | None:
    """The configuration of the run already in ``out`` (config.json, else run.json), None when there is none
    or it cannot be read."""
    for name in ("config.json", "run.json"):
        try:
            config = json.loads((out / name).read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(config, dict):
            return config
    return None


def finished_record(out: Path, cfg: TrainConfig) -> tuple[RunRecord | None, str]:
    """The record of this configuration's finished run in ``out`` and "" — or None and why it cannot be
    trusted (missing or damaged run.json, metrics, model or predictions, another configuration)."""
    try:
        record = RunRecord.load(out / "run.json")
    except FileNotFoundError:
        return None, "it has no run.json"
    except (OSError, ValueError, TypeError, KeyError) as e:
        return None, f"its run.json is damaged ({type(e).__name__})"
    if config_differences(record.config, cfg):
        return None, "its run.json belongs to another configuration"
    needed = ["metrics.json", "model"] + (["predictions.json"] if cfg.eval_data else [])
    missing = [n for n in needed if not (out / n).exists()]
    if missing:
        return None, f"{', '.join(missing)} missing"
    for name in ("metrics.json", "predictions.json"):
        if (out / name).exists():
            try:
                json.loads((out / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                return None, f"its {name} is damaged ({type(e).__name__})"
    return record, ""


# ---------------------------------------------------------------------------------------------- data
def load_split(source: str, split: str, articles: str | None, questions, seed: int, repair: bool,
               role: str = "") -> SquadData:
    """The articles, then the questions, of one data source; ``role`` (train/eval) names the options in errors."""
    data = load_squad(source, split=split, repair=repair)
    try:
        data = select_articles(data, articles)
        return data.with_examples(subsample(data.examples, questions, seed))
    except SquadDataError as e:
        if not role:
            raise
        raise SquadDataError(f"{role}_articles / {role}_questions: {e}") from e


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of (seed, epoch): shuffled, and when grouping by length,
    sorted within chunks of 50 batches so each batch needs little padding, then the batches shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        mega = batch_size * 50
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.array_split(order, max(1, math.ceil(len(order) / mega)))])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ---------------------------------------------------------------------------------------------- env
def resolve_precision(requested: str, device: torch.device, model_type: str) -> str:
    if requested not in PRECISIONS:
        raise ModelError(f"unknown precision {requested!r}; choose from {PRECISIONS}")
    if requested == "fp16":
        if model_type == "mobilebert":
            raise ModelError("MobileBERT gives NaN losses in fp16 (its activations overflow); "
                             "use --precision bf16 or fp32")
        if device.type != "cuda":
            raise ModelError("fp16 needs a CUDA GPU; on the CPU use --precision bf16 or fp32")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError("this GPU has no bf16; use --precision fp32 (or fp16 for non-MobileBERT models)")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    import qatune

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "qatune": qatune.__version__,
        "torch": torch.__version__,
        **{name: _version(name) for name in ("transformers", "peft", "accelerate", "tokenizers", "datasets")},
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-RSS window (Linux clear_refs), so each run of a multi-run process reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:  # VmHWM honours clear_refs; ru_maxrss is the whole process's lifetime peak
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    out = {"peak_rss_mb": rss}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------------------------------------- checkpoints
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, keep: int) -> Path:
    """Atomically write checkpoint-<step>: trainable weights (safetensors), optimizer/scheduler/RNG state."""
    from safetensors.torch import save_file

    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(list_checkpoints(ckpt_dir))[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.glob("checkpoint-*"):
        if (p / "state.pt").exists() and (p / "trainable.safetensors").exists():
            out.append((int(p.name.split("-")[1]), p))
    return sorted(out)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Both files of a checkpoint, read completely before anything is applied (raises if either is damaged)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "state.pt", weights_only=False)
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise ValueError("state.pt lacks step/optimizer/scheduler/rng")
    return weights, state


def latest_intact_checkpoint(ckpts: list[tuple[int, Path]]) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that reads back whole; a damaged newer one is reported and skipped (the
    previous one is kept while a new one is written, see ``keep_checkpoints``)."""
    damaged = []
    for _, path in reversed(ckpts):
        try:
            weights, state = read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - torch/safetensors/pickle raise many types for a damaged file
            damaged.append(f"{path.name} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            continue
        if damaged:
            print(f"{'; '.join(damaged)}: resuming from {path.name}", file=sys.stderr)
        return path, weights, state
    raise TrainingError(f"no intact checkpoint in {ckpts[0][1].parent}: {'; '.join(damaged)}. Delete that "
                        f"folder to train the run from the start")


def apply_checkpoint(path: Path, weights: dict, state: dict, model, optimizer, scheduler) -> int:
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise TrainingError(f"{path}: checkpoint does not fit this model (unknown weights {missing[:3]}); "
                            f"was output_dir used for another configuration?")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


# ---------------------------------------------------------------------------------------------- stopping
STOP = threading.Event()  # set by a signal handler: the run saves a checkpoint at the next step and stops


class Interrupted(TrainingError):
    """The run was asked to stop (Ctrl-C, SIGTERM) and saved a checkpoint first; ``--resume`` continues it."""


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a clean stop: the step in flight finishes, a checkpoint is saved, then
    :class:`Interrupted` is raised. A second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        STOP.clear()


# ---------------------------------------------------------------------------------------------- batches
class Prefetcher:
    """Collates the batches of micro-steps ``[start, stop)`` in a background thread, ``depth`` ahead, in pinned
    memory on a GPU, so the device never waits for the host to pad a batch. The order is the same pure
    function of (seed, step) as without it."""

    def __init__(self, make: Callable[[int], tuple[int, dict]], start: int, stop: int, depth: int = 4,
                 pin: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make, start, stop, pin), daemon=True)
        self._thread.start()

    def _fill(self, make, start, stop, pin):
        try:
            for m in range(start, stop):
                rows, batch = make(m)
                if pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                while not self._closed.is_set():
                    try:
                        self._queue.put((rows, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the training thread, which raises it
            self._queue.put(e)

    def next(self) -> tuple[int, dict]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------- the run
class Recipe:
    """One training run in three stages — :meth:`setup` (data, model, optimizer, resume), :meth:`train`
    (the optimizer loop) and :meth:`finish` (save, evaluate, write the :class:`RunRecord`).

    The loop never waits for the device inside a step: losses are summed on the device and read every
    ``logging_steps``; a non-finite loss sets a device-side flag that the fused AdamW kernel reads as
    ``found_inf`` (as AMP's GradScaler does), so that step and every later one leave the weights untouched,
    and the run stops with the step and the last good checkpoint at the next check (logging step or
    checkpoint, whichever comes first).
    """

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------ setup
    def setup(self) -> RunRecord | None:
        """Everything before the first step; returns the stored record when ``resume`` finds a finished run."""
        from accelerate import Accelerator, PartialState
        from accelerate.state import AcceleratorState
        from transformers import get_linear_schedule_with_warmup, set_seed

        cfg, out = self.cfg, self.out
        cpu = not torch.cuda.is_available()  # accelerate only starts gloo data parallelism on CPUs when told
        state = PartialState(cpu=cpu)  # knows the device and the data-parallel ranks (torchrun / accelerate)
        self.main = state.is_main_process
        if out.exists() and not out.is_dir():
            raise TrainingError(f"output_dir {out} is a file; give a directory (it is created if missing)")
        ckpts = list_checkpoints(out / "checkpoints")
        if ckpts and not cfg.resume:
            raise TrainingError(f"{out} already holds checkpoints of a run; pass --resume to continue it, "
                                f"or choose another --output-dir")
        if cfg.resume:  # continue only the same run: its configuration and the files it stands on are checked
            stored = stored_config(out)
            diffs = config_differences(stored, cfg) if stored is not None else []
            if diffs:
                raise TrainingError(f"{out} holds a run with other settings ({'; '.join(diffs[:4])}); --resume "
                                    f"continues only the same run: give its settings, or another --output-dir")
            if (out / "run.json").exists():
                done, why = finished_record(out, cfg)
                if done is not None:
                    return done
                print(f"{out}: finished run not usable ({why}); finishing it again from its last checkpoint",
                      file=sys.stderr)
        if self.main:
            try:
                out.mkdir(parents=True, exist_ok=True)
                write_json_atomic(out / "config.json", {"config": asdict(cfg), "hash": config_hash(cfg)})
            except OSError as e:
                raise FileError(f"cannot write to output_dir {out} ({e.strerror or e}); choose a directory you "
                                f"can write to") from e

        set_seed(cfg.seed)
        reset_peak_memory(state.device)
        t_setup = time.perf_counter()
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_data = load_split(cfg.train_data, cfg.train_split, cfg.train_articles, cfg.train_questions,
                                     cfg.seed, cfg.repair_answers, "train")
        self.eval_data = (load_split(cfg.eval_data, cfg.eval_split, cfg.eval_articles, cfg.eval_questions,
                                     cfg.seed, cfg.repair_answers, "eval") if cfg.eval_data else None)
        self.feats = cached_features(self.train_data.examples, self.tokenizer, cfg.max_seq_length, cfg.doc_stride,
                                     cfg.feature_cache_dir)
        if cfg.eval_steps:  # up to eval_subset questions (all when None), the same draw for every run
            n = min(cfg.eval_subset or len(self.eval_data), len(self.eval_data))
            self.curve_data = self.eval_data.with_examples(subsample(self.eval_data.examples, n, CURVE_SEED))

        model = load_qa_model(cfg.model)
        self.model_type = model.config.model_type
        self.attention = getattr(model.config, "_attn_implementation", None)
        self.precision = resolve_precision(cfg.precision, state.device, self.model_type)
        # Accelerate runs the forward pass under autocast for bf16/fp16 and scales fp16 losses. Its state is a
        # process-wide singleton: reset it so runs in one process may use different precisions.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = acc = Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(self.precision, self.precision))
        lora = LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.alpha_policy, cfg.lora_targets)
        model = apply_strategy(model, cfg.strategy, lora)
        check_segment_inputs(model, self.tokenizer)  # the model sees every input a window has, or no run
        self.counts = parameter_counts(model)
        self.window_flops = flops.for_config(cfg)  # counted on the architecture, on the meta device

        self.world, self.rank = acc.num_processes, acc.process_index
        self.n_batches = math.ceil(len(self.feats) / (cfg.batch_size * self.world))
        self.steps_per_epoch = max(1, self.n_batches // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n)]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n)]
        # The fused kernel updates every parameter in a few launches and honours ``found_inf``.
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.resolved_learning_rate(), fused=True)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(cfg.warmup_ratio * self.total_steps),
                                                         self.total_steps)
        model.to(acc.device)
        self.start_step = 0
        self.last_ckpt = None
        if ckpts:
            self.last_ckpt, weights, state = latest_intact_checkpoint(ckpts)
            self.start_step = apply_checkpoint(self.last_ckpt, weights, state, model, self.optimizer, self.scheduler)
        self.model, self.acc_optimizer = acc.prepare(model, self.optimizer)
        # A compiled view for the forward pass; saving and evaluation use the module itself.
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self._pad_multiple = COMPILE_PAD_MULTIPLE if cfg.compile else PAD_MULTIPLE
        self.setup_s = time.perf_counter() - t_setup
        return None

    def _rows(self, m: int, rank: int, cache: dict) -> np.ndarray:
        """Rank ``rank``'s windows of micro-batch ``m``: a pure function of (seed, m)."""
        cfg = self.cfg
        epoch, index = divmod(m, self.n_batches)
        if cache.get("epoch") != epoch:
            cache["epoch"] = epoch
            cache["batches"] = epoch_batches(self.feats.lengths, cfg.batch_size * self.world, cfg.seed, epoch,
                                             cfg.group_by_length)
        rows = cache["batches"][index][rank :: self.world]
        if len(rows) == 0:  # a short last global batch: reuse rows so every rank steps together
            rows = cache["batches"][index][:1]
        return rows

    def _batch(self, m: int) -> tuple[int, dict]:
        rows = self._rows(m, self.rank, self._batch_cache)
        return len(rows), collate(self.feats, rows, self.tokenizer.pad_token_id, self.cfg.pad_to_max_length,
                                  self._pad_multiple)

    def flops(self, first_step: int, last_step: int) -> int:
        """Training FLOPs of optimizer steps [first_step, last_step) over every rank: the batches are known in
        advance, so a resumed run counts the whole run exactly as an uninterrupted one."""
        cfg, cache, total = self.cfg, {}, 0
        for m in range(first_step * cfg.grad_accum, last_step * cfg.grad_accum):
            for rank in range(self.world):
                rows = self._rows(m, rank, cache)
                width = batch_width(self.feats.lengths[rows], cfg.max_seq_length, cfg.pad_to_max_length,
                                    self._pad_multiple)
                total += self.window_flops.train(len(rows), width)
        return total

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc, device = self.cfg, self.acc, self.acc.device
        self.bad = torch.zeros((), device=device)  # sticky: 1.0 once any loss was non-finite
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)
        if self.precision != "fp16":  # fp16: accelerate's GradScaler already skips non-finite steps
            self.optimizer.found_inf, self.optimizer.grad_scale = self.bad, None
        loss_sum, loss_n = torch.zeros((), device=device), 0
        self.curve: list[list[float]] = []
        self.eval_curve = self._stored_curve()
        self.curve_eval_s = 0.0
        self.windows_seen = self.tokens_seen = 0
        self._batch_cache: dict = {}
        graceful = self.world == 1  # with several ranks a stop would need agreeing on the step: they just end
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"train {cfg.strategy}", unit="step",
                   disable=not (self.progress and self.main), dynamic_ncols=True)
        prefetch = Prefetcher(self._batch, self.start_step * cfg.grad_accum, self.total_steps * cfg.grad_accum,
                              pin=device.type == "cuda")
        self.model.train()
        events = [] if device.type == "cuda" else None  # (start, end) per step: device time, read at the end
        load = flops.LoadMeter()
        t0 = last_progress = time.perf_counter()
        self._write_progress(self.start_step, t0)
        try:
            for step in range(self.start_step, self.total_steps):
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
                        self._flag_nonfinite(loss, m)
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
                    self._raise_if_nonfinite()
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
                stopping = graceful and STOP.is_set()
                if done % cfg.save_steps == 0 or done == self.total_steps or stopping:
                    self._raise_if_nonfinite()
                    self._save_checkpoint(done)
                if stopping:
                    raise Interrupted(f"stopped at step {done} of {self.total_steps}; checkpoint saved at "
                                      f"{self.last_ckpt}; run again with --resume to continue")
                if self.main and time.perf_counter() - last_progress > PROGRESS_EVERY_S:
                    last_progress = time.perf_counter()
                    self._write_progress(done, t0)
        finally:
            prefetch.close()
            bar.close()
        self._raise_if_nonfinite()
        self.train_s = time.perf_counter() - t0 - self.curve_eval_s
        self.load = load.read()
        if events is not None:
            torch.cuda.synchronize()
            self.load["device_s"] = sum(a.elapsed_time(b) for a, b in events) / 1000
        self._write_progress(self.total_steps, t0)

    def windows_through(self, step: int) -> int:
        """Training windows (all ranks) that went into optimizer steps [0, step): every epoch passes each once."""
        epochs, batches = divmod(step * self.cfg.grad_accum, self.n_batches)
        return epochs * len(self.feats) + min(batches * self.cfg.batch_size * self.world, len(self.feats))

    def _stored_curve(self) -> list[dict]:
        """Learning-curve points of an interrupted attempt, up to the checkpoint this one resumed from."""
        path = self.out / "curve.json"
        if not (self.cfg.eval_steps and self.start_step and path.exists()):
            return []
        try:
            return [p for p in json.loads(path.read_text(encoding="utf-8")) if p["step"] <= self.start_step]
        except (ValueError, TypeError, KeyError):
            return []

    def _curve_point(self, step: int) -> None:
        """F1/EM of the model as it is now on the learning-curve questions (its time is not training time)."""
        if self.main:
            from qatune.inference import evaluate

            t = time.perf_counter()
            cfg = self.cfg
            m, _ = evaluate(self.acc.unwrap_model(self.model), self.tokenizer, self.curve_data, cfg.max_seq_length,
                            cfg.doc_stride, cfg.eval_batch_size, self.precision, cfg.n_best, cfg.max_answer_length,
                            cfg.null_threshold, cache_dir=cfg.feature_cache_dir)
            point = {"step": step, "windows": self.windows_through(step),
                     "exact_match": m.get("exact_match", m.get("exact")), "f1": m["f1"]}
            self.eval_curve.append(point)
            write_json_atomic(self.out / "curve.json", self.eval_curve, durable=False)
            if self.writer:
                self.writer.add_scalar("curve/f1", point["f1"], step)
                self.writer.add_scalar("curve/exact_match", point["exact_match"], step)
            self.curve_eval_s += time.perf_counter() - t
        self.acc.wait_for_everyone()

    def _flag_nonfinite(self, loss: torch.Tensor, m: int) -> None:
        """Record a non-finite loss on the device (no host sync); every rank sees the same flag."""
        now = (~torch.isfinite(loss.detach())).float()
        if self.world > 1:
            now = self.acc.reduce(now.reshape(1), reduction="sum").reshape(())
        first = (now > 0) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, torch.full_like(self.first_bad, m), self.first_bad))
        self.bad_loss.copy_(torch.where(first, loss.detach().float(), self.bad_loss))
        self.bad.copy_(torch.maximum(self.bad, (now > 0).float()))

    def _raise_if_nonfinite(self) -> None:
        if not bool(self.bad.item()):
            return
        step, micro = divmod(int(self.first_bad.item()), self.cfg.grad_accum)
        raise TrainingError(
            f"non-finite loss ({self.bad_loss.item()}) at step {step + 1} (micro-batch {micro + 1}); the weights "
            f"were not updated from then on. Last good checkpoint: "
            f"{self.last_ckpt or 'none (the run had not saved yet)'}. "
            f"Lower --learning-rate, use --precision fp32, or check the data.")

    def _save_checkpoint(self, step: int) -> None:
        self.acc.wait_for_everyone()
        if self.main:
            self.last_ckpt = save_checkpoint(self.out / "checkpoints", step, self.acc.unwrap_model(self.model),
                                             self.optimizer, self.scheduler, self.cfg.keep_checkpoints)

    def _write_progress(self, step: int, t0: float) -> None:
        """`progress.json` for a study's --status: which step, how fast, where (not fsynced: advisory)."""
        if not self.main:
            return
        elapsed = time.perf_counter() - t0
        write_json_atomic(self.out / "progress.json", {
            "step": step, "total_steps": self.total_steps, "host": platform.node(), "pid": os.getpid(),
            "device": str(self.acc.device), "loss": self.curve[-1][1] if self.curve else None,
            "windows_per_s": self.windows_seen * self.world / elapsed if elapsed > 0 else None,
            "updated_at": time.time()}, durable=False)

    # ------------------------------------------------------------------ finish
    def finish(self) -> RunRecord | None:
        """Save the model, evaluate it, write metrics and run.json; returns the record (None on ranks > 0)."""
        cfg, out = self.cfg, self.out
        steps_run = self.total_steps - self.start_step
        record = None
        if self.main:
            # without accelerate's autocast wrapper: the evaluation runs at the inference precision, as a Reader would
            module = self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)
            infer = inference_config(cfg, self.train_data.version.startswith("2"))
            save_trained(module, self.tokenizer, out / "model", cfg, infer)
            eval_s, metrics, inference = 0.0, {}, {}
            if self.eval_data is not None:
                from qatune.inference import Reader, save_settings

                t1 = time.perf_counter()
                reader = Reader(module, self.tokenizer, infer, device=self.acc.device)
                v2 = self.eval_data.version.startswith("2")
                metrics, decoded = reader.evaluate(self.eval_data, self.progress, cfg.feature_cache_dir,
                                                   tune_null_threshold=v2)
                if v2:  # the model is saved with the threshold its predictions used
                    infer = replace(infer, null_threshold=metrics["null_threshold"])
                    save_settings(out / "model", infer, **model_about(cfg))
                eval_s = time.perf_counter() - t1
                write_json_atomic(out / "predictions.json", decoded.predictions)
                write_json_atomic(out / "nbest.json", dict(decoded.nbest))
                if v2:
                    write_json_atomic(out / "null_odds.json", decoded.null_odds)
                if cfg.inference_cost:
                    from qatune.cost import measure

                    inference = measure(out / "model", self.eval_data, progress=self.progress)
            train_s, world = self.train_s, self.world
            run_flops = self.flops(0, self.total_steps)
            attempt_flops = self.flops(self.start_step, self.total_steps) if self.start_step else run_flops
            record = RunRecord(
                config=asdict(cfg),
                resolved={"learning_rate": cfg.resolved_learning_rate(), "precision": self.precision,
                          "model_type": self.model_type, "attention": self.attention, "compile": cfg.compile,
                          "world_size": world, "total_steps": self.total_steps,
                          "steps_per_epoch": self.steps_per_epoch, "train_windows": len(self.feats),
                          "lora_alpha_effective": (2.0 * cfg.lora_rank if cfg.alpha_policy == "proportional"
                                                   else cfg.lora_alpha) if cfg.strategy == "lora" else None},
                seed=cfg.seed,
                data={"train_source": self.train_data.source, "train_questions": len(self.train_data),
                      "train_windows": len(self.feats),
                      "eval_source": self.eval_data.source if self.eval_data else None,
                      "eval_questions": len(self.eval_data) if self.eval_data else 0},
                params=self.counts,
                metrics=metrics,
                timing={"setup_s": self.setup_s, "train_s": train_s, "eval_s": eval_s, "steps_run": steps_run,
                        "resumed_from_step": self.start_step,
                        "train_windows_per_s": self.windows_seen * world / train_s if train_s else None,
                        "train_tokens_per_s": self.tokens_seen * world / train_s if train_s else None,
                        # counted FLOPs of the whole run (all ranks) and the rate of this attempt's steps
                        "train_flops": run_flops,
                        "train_flop_per_s": attempt_flops / train_s if train_s else None,
                        "process_cpu_s": self.load["process_cpu_s"], "device_s": self.load.get("device_s"),
                        "others_cores": self.load["others_cores"], "cores": self.load["cores"],
                        "curve_eval_s": self.curve_eval_s},
                memory=peak_memory(self.acc.device),
                environment=environment(self.acc.device),
                loss={"final": self.curve[-1][1] if self.curve else None, "curve": self.curve},
                curve=self.eval_curve,
                inference=inference,
            )
            write_json_atomic(out / "metrics.json", metrics)
            record.save(out / "run.json")
            if self.writer:
                for k, v in metrics.items():
                    if isinstance(v, float):
                        self.writer.add_scalar(f"eval/{k}", v, self.total_steps)
        self.acc.wait_for_everyone()
        return record


def train(cfg: TrainConfig, progress: bool = True) -> RunRecord | None:
    """Train, save and evaluate one run; returns its record (also written as run.json), None on ranks > 0."""
    recipe = Recipe(cfg, progress)
    done = recipe.setup()
    if done is not None:
        return done
    recipe.writer = tensorboard_writer(cfg.report_to, recipe.out) if recipe.main else None
    try:
        recipe.train()
        return recipe.finish()
    finally:
        if recipe.writer:
            recipe.writer.close()


def inference_config(cfg: TrainConfig, version_2: bool):
    """How the run's model answers (window and decode settings), saved with it and used by its evaluation."""
    from qatune.inference import InferenceConfig

    return InferenceConfig(max_seq_length=cfg.max_seq_length, doc_stride=cfg.doc_stride, n_best=cfg.n_best,
                           max_answer_length=cfg.max_answer_length, version_2=version_2,
                           null_threshold=cfg.null_threshold, batch_size=cfg.eval_batch_size,
                           max_batch_tokens=cfg.eval_batch_size * cfg.max_seq_length)


def model_about(cfg: TrainConfig) -> dict:
    """What a saved model is, beside its inference configuration in qatune.json."""
    return {"strategy": cfg.strategy, "base_model": cfg.model, "format": "torch"}


def save_trained(model, tokenizer, model_dir: Path, cfg: TrainConfig, infer=None) -> None:
    """Save a full model or a LoRA adapter (plus tokenizer and inference configuration), atomically."""
    from qatune.inference import save_settings

    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    adapter_cfg = tmp / "adapter_config.json"
    if adapter_cfg.exists():  # record the base by the name the user gave (an alias stays portable)
        c = json.loads(adapter_cfg.read_text())
        c["base_model_name_or_path"] = cfg.model
        adapter_cfg.write_text(json.dumps(c, indent=2))
    save_settings(tmp, infer or inference_config(cfg, False), **model_about(cfg))
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "layernorm" in name.lower()
