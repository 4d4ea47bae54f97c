"""Inference: one configuration and one code path for every answer qatune gives.

A model directory carries its :class:`InferenceConfig` (``qatune.json``: window and decode settings, the SQuAD v2
null threshold the run tuned on its evaluation data, precision, batch bounds). :class:`Reader` reads it and is the
only way questions are answered: a training run's evaluation, ``qatune evaluate``, ``qatune predict``, ``qatune
serve`` and a study's inference-cost measurement all go through ``Reader.logits`` and ``decode`` with that
configuration, so a saved model gives the answers its run reported. transformers 5 removed its question-answering
pipeline; ``Reader`` replaces it for qatune models, in PyTorch or (for an ONNX export) ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from qatune.answer.decode import Decoded, decode
from qatune.config import PRECISIONS
from qatune.data.features import Features, build_features, cached_features, collate
from qatune.data.squad import QAExample, SquadData
from qatune.errors import ConfigError, FileError, QatuneError, unreadable
from qatune.model.load import SETTINGS_FILE
from qatune.model.machine import best_device, check_device, resolve_precision
from qatune.rundir import MODEL, STATE

ONNX_FILE = "model.onnx"
QUESTIONS_PER_CHUNK = 1024  # answer_many tokenises and decodes this many questions at a time (bounded memory)


class MissingExtra(QatuneError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str):
    """Import an optional dependency or say which ``qatune[extra]`` installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"this needs {module!r}, which is not installed: pip install 'qatune[{extra}]'") from e


@dataclass(frozen=True)
class InferenceConfig:
    """How a model answers: saved with it, read by every path that answers questions."""

    max_seq_length: int = 384
    doc_stride: int = 128
    n_best: int = 20  # start/end candidates per window
    max_answer_length: int = 30  # tokens
    version_2: bool = False  # the model may answer "" (trained for SQuAD v2)
    null_threshold: float = 0.0  # v2: answer "" when null score - best span score > this
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp32 elsewhere
    batch_size: int = 64  # windows per forward pass, at most ...
    max_batch_tokens: int = 64 * 384  # ... and at most this many padded tokens (the memory bound)

    def __post_init__(self):
        for name in ("max_seq_length", "n_best", "max_answer_length", "batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"inference setting {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.doc_stride, int) or not 0 <= self.doc_stride < self.max_seq_length:
            raise ConfigError(f"inference setting doc_stride must be an integer in [0, max_seq_length="
                              f"{self.max_seq_length}), got {self.doc_stride!r}")
        if not isinstance(self.null_threshold, int | float) or isinstance(self.null_threshold, bool) \
                or not np.isfinite(self.null_threshold):
            raise ConfigError(f"inference setting null_threshold must be a finite number, got {self.null_threshold!r}")
        if not isinstance(self.version_2, bool):
            raise ConfigError(f"inference setting version_2 must be true or false, got {self.version_2!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"inference setting precision must be one of {PRECISIONS}, "
                              f"got {self.precision!r}")

    @classmethod
    def for_run(cls, cfg, version_2: bool) -> InferenceConfig:
        """How a training run's model answers (its window and decode settings; ``cfg`` a TrainConfig): saved with
        the model and used by the run's own evaluation and learning curve."""
        return cls(max_seq_length=cfg.max_seq_length, doc_stride=cfg.doc_stride, n_best=cfg.n_best,
                   max_answer_length=cfg.max_answer_length, version_2=version_2, null_threshold=cfg.null_threshold,
                   batch_size=cfg.eval_batch_size, max_batch_tokens=cfg.eval_batch_size * cfg.max_seq_length)

    @classmethod
    def from_dict(cls, d: dict) -> InferenceConfig:
        """The inference settings of a ``qatune.json`` mapping (other keys describe the model and are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        return asdict(self)


def read_settings(model_dir: str | Path) -> dict:
    """The ``qatune.json`` mapping of a model directory ({} for a plain Hugging Face model directory)."""
    path = Path(model_dir) / SETTINGS_FILE
    if not path.exists():
        return {}
    fix = "re-save the model (train again, or qatune export), or restore the file"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FileError(f"{path}: inference configuration is not valid JSON (line {e.lineno}, column {e.colno}: "
                        f"{e.msg}); {fix}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(path, "inference configuration", e, fix) from e
    if not isinstance(settings, dict):
        raise FileError(f"{path}: inference configuration must be a JSON object, got {type(settings).__name__}; {fix}")
    return settings


def load_inference_config(model_dir: str | Path) -> InferenceConfig:
    settings = read_settings(model_dir)
    try:
        return InferenceConfig.from_dict(settings)
    except ConfigError as e:
        raise FileError(f"{Path(model_dir) / SETTINGS_FILE}: {e}; fix the value or re-save the model") from e


def save_settings(model_dir: str | Path, config: InferenceConfig, **about) -> None:
    """Write ``qatune.json``: the inference configuration plus what the model is (strategy, base, format...)."""
    from qatune.record import write_json_atomic

    write_json_atomic(Path(model_dir) / SETTINGS_FILE, {**about, **config.to_dict()})


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory behind what a user passes as ``--model``: a run directory (train's ``--output-dir``,
    whose model is in ``model/``), a model or LoRA adapter directory, or an export directory."""
    from qatune.model.load import ModelError

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such directory; give a run directory (train's --output-dir), its model/ "
                         f"folder or an export directory")
    if (path / STATE).exists():  # checkpoints/checkpoint-<step>/: trainable weights and optimizer state
        raise ModelError(f"{path}: a training checkpoint (for --resume), not a model; give the run directory "
                         f"{path.parent.parent} or its model/ folder")
    for candidate in (path / MODEL, path):  # a run directory first: it holds a config.json of its own
        if any((candidate / name).exists() for name in (ONNX_FILE, "config.json", "adapter_config.json")):
            return candidate
    raise ModelError(f"{path}: not a model: expected a run directory (with model/), a model directory (config.json "
                     f"or adapter_config.json) or an export directory ({ONNX_FILE})")


# ---------------------------------------------------------------------------------------------- devices
def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16 on the model's device, or nothing for fp32."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- models
class OnnxModel:
    """An exported model run by ONNX Runtime (no torch on its forward path); ``run`` is safe from several threads,
    as ONNX Runtime's ``InferenceSession.run`` is."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = require("onnxruntime", "onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for damaged files
            raise FileError(f"{path}: cannot load the ONNX model ({type(e).__name__}: {str(e)[:200]}); export it "
                            f"again with qatune export --format onnx") from e
        self.path = Path(path)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        feed = {k: batch[k].numpy() for k in self.input_names}
        start, end = self.session.run(["start_logits", "end_logits"], feed)
        return start, end


def plan_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int) -> list[np.ndarray]:
    """Window indices in batches, longest first: at most ``batch_size`` windows and (padded to the batch's longest)
    at most ``max_batch_tokens`` tokens each, so little compute goes to padding and memory stays bounded."""
    order = np.argsort(-lengths, kind="stable")
    batches, lo = [], 0
    while lo < len(order):
        rows = max(1, min(batch_size, max_batch_tokens // max(1, int(lengths[order[lo]]))))
        batches.append(order[lo : lo + rows])
        lo += rows
    return batches


@torch.no_grad()
def window_logits(model, features: Features, pad_token_id: int, batch_size: int = 64, precision: str = "fp32",
                  progress: bool = False, max_batch_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of every window, (windows, longest window) float32, padded with -inf.

    ``model`` is a torch module (on its device, under autocast for bf16/fp16) or an :class:`OnnxModel`.
    """
    onnx = isinstance(model, OnnxModel)
    was_training = not onnx and model.training
    if was_training:  # a training run's evaluation; a Reader's model is in eval mode already
        model.eval()
    device = torch.device("cpu") if onnx else next(model.parameters()).device
    lengths = features.lengths
    width = int(lengths.max())
    start = np.full((len(features), width), -np.inf, dtype=np.float32)
    end = np.full_like(start, -np.inf)
    batches = plan_batches(lengths, batch_size, max_batch_tokens or batch_size * features.max_seq_length)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)

    def store(rows, s, e, n):  # copy one batch's logits to the host (the only device sync per batch)
        if isinstance(s, torch.Tensor):
            s, e = s.cpu().numpy(), e.cpu().numpy()
        for j, r in enumerate(rows):
            k = min(int(lengths[r]), n)
            start[r, :k] = s[j, :k]
            end[r, :k] = e[j, :k]

    pending = None
    for rows in batches:
        batch = collate(features, rows, pad_token_id, with_labels=False)
        n = batch["input_ids"].shape[1]
        if onnx:
            store(rows, *model.run(batch), n)
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast_context(device, precision):
            out = model(**batch)
        # Read the previous batch back while the device computes this one.
        if pending is not None:
            store(*pending)
        pending = (rows, out.start_logits.float(), out.end_logits.float(), n)
    if pending is not None:
        store(*pending)
    if was_training:
        model.train()
    return start, end


# ---------------------------------------------------------------------------------------------- the reader
class Reader:
    """Answer questions with a trained qatune model: a full model, a LoRA adapter, a merged or an ONNX export.

    >>> reader = Reader.load("runs/full")                    # doctest: +SKIP
    >>> reader.answer("Who wrote it?", "It was written by Ada.", top_k=3)   # doctest: +SKIP

    Safe to call from several threads at once: nothing it holds changes after construction.
    """

    def __init__(self, model, tokenizer, config: InferenceConfig | None = None, device: str | torch.device | None = None,
                 precision: str | None = None):
        self.config = config or InferenceConfig()
        self.tokenizer = tokenizer
        if isinstance(model, OnnxModel):
            self.device, self.precision = torch.device("cpu"), "fp32"
        else:
            self.device = check_device(device) if device is not None else best_device()
            model = model.to(self.device).eval()
            self.precision = resolve_precision(precision or self.config.precision, self.device, training=False)
        self.model = model

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, precision: str | None = None,
             threads: int | None = None, **settings) -> Reader:
        """Load a run directory, a model directory or an export with its saved inference configuration;
        ``settings`` override single fields of it (e.g. ``max_seq_length=256``)."""
        model_dir = resolve_model_dir(path)
        config = load_inference_config(model_dir)
        if "batch_size" in settings and "max_batch_tokens" not in settings:  # a new batch size, the same bound
            settings["max_batch_tokens"] = settings["batch_size"] * settings.get("max_seq_length",
                                                                                 config.max_seq_length)
        if settings:
            config = replace(config, **settings)
        from qatune.model.load import check_seq_length, load_tokenizer

        tokenizer = load_tokenizer(str(model_dir))
        if (model_dir / ONNX_FILE).exists():
            from transformers import AutoConfig

            check_seq_length(AutoConfig.from_pretrained(model_dir), config.max_seq_length, str(path))
            return cls(OnnxModel(model_dir / ONNX_FILE, threads), tokenizer, config)
        from qatune.model.load import load_trained

        model = load_trained(model_dir)
        check_seq_length(model.config, config.max_seq_length, str(path))
        return cls(model, tokenizer, config, device, precision)

    @classmethod
    def live(cls, model, tokenizer, config: InferenceConfig, precision: str) -> Reader:
        """A reader of a model while it trains (a learning-curve point): the model stays on its device and in its
        mode (the forward passes switch to eval mode and back), at the training precision."""
        reader = cls.__new__(cls)
        reader.model, reader.tokenizer, reader.config = model, tokenizer, config
        reader.device, reader.precision = next(model.parameters()).device, precision
        return reader

    @property
    def is_onnx(self) -> bool:
        return isinstance(self.model, OnnxModel)

    def features(self, examples: Sequence[QAExample], cache_dir: str | None = None) -> Features:
        c = self.config
        return cached_features(examples, self.tokenizer, c.max_seq_length, c.doc_stride, cache_dir)

    def logits(self, features: Features, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return window_logits(self.model, features, self.tokenizer.pad_token_id, c.batch_size, self.precision,
                             progress, c.max_batch_tokens)

    def decode(self, examples: Sequence[QAExample], features: Features, start: np.ndarray, end: np.ndarray,
               version_2: bool, nbest_size: int = 20, null_threshold: float | None = None) -> Decoded:
        c = self.config
        return decode(examples, features.example_index, features.padded_offsets(), start, end, n_best=c.n_best,
                      max_answer_length=c.max_answer_length, version_2=version_2,
                      null_threshold=c.null_threshold if null_threshold is None else null_threshold,
                      nbest_size=nbest_size)

    def evaluate(self, data: SquadData, progress: bool = False, cache_dir: str | None = None,
                 tune_null_threshold: bool = False) -> tuple[dict, Decoded]:
        """Predict every question of ``data`` and score it with the official metric of its SQuAD version.

        SQuAD v2: ``tune_null_threshold`` picks the threshold with the best F1 on this data (what a run saves
        with its model); the metrics then include ``null_threshold``, the one the predictions used.
        """
        from qatune.answer.metrics import squad_v1, squad_v2

        feats = self.features(data.examples, cache_dir)
        start, end = self.logits(feats, progress)
        refs = data.references()
        if not data.version.startswith("2"):
            decoded = self.decode(data.examples, feats, start, end, False)
            metrics = squad_v1(refs, decoded.predictions)
        else:
            threshold = self.config.null_threshold
            if tune_null_threshold:  # spans everywhere, then the abstention threshold with the best F1
                spans = self.decode(data.examples, feats, start, end, True, 0, null_threshold=np.inf)
                threshold = squad_v2(refs, spans.predictions, na_probs=spans.null_odds)["best_f1_thresh"]
            decoded = self.decode(data.examples, feats, start, end, True, null_threshold=threshold)
            metrics = squad_v2(refs, decoded.predictions, na_probs=decoded.null_odds)
            # one key for exact match whatever the version (the official v2 script calls it "exact")
            metrics = {"exact_match": metrics.pop("exact"), **metrics, "null_threshold": threshold}
        return {**metrics, "questions": len(data.examples), "windows": len(feats)}, decoded

    def answer_many(self, items: Sequence[tuple[str, str]], top_k: int = 1) -> list[list[dict]]:
        """Answers for (question, context) pairs: for each, up to ``top_k`` dicts with text, start, end (character
        offsets into the context), score and probability, best first. A SQuAD v2 model's "no answer" has text ""
        and start = end = -1, and comes first when the saved null threshold says so."""
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        out: list[list[dict]] = []
        for lo in range(0, len(items), QUESTIONS_PER_CHUNK):
            chunk = items[lo : lo + QUESTIONS_PER_CHUNK]
            examples = [QAExample(str(i), "", ctx, q, ()) for i, (q, ctx) in enumerate(chunk)]
            feats = build_features(examples, self.tokenizer, self.config.max_seq_length, self.config.doc_stride)
            start, end = self.logits(feats)
            v2 = self.config.version_2
            d = self.decode(examples, feats, start, end, v2, nbest_size=max(top_k, self.config.n_best))
            out += [_null_first_if_predicted(d.nbest.get(ex.id, []), d.predictions[ex.id] == "" and v2)[:top_k]
                    for ex in examples]
        return out

    def answer(self, question: str, context: str, top_k: int = 1) -> list[dict]:
        return self.answer_many([(question, context)], top_k)[0]


def _null_first_if_predicted(candidates: list[dict], abstain: bool) -> list[dict]:
    """Order a v2 n-best list so its head is what the threshold decided: "no answer" first when the question
    was abstained on, the best span first otherwise."""
    nulls = [c for c in candidates if c["start"] < 0]
    spans = [c for c in candidates if c["start"] >= 0]
    if not nulls:
        return candidates
    return nulls + spans if abstain else spans[:1] + nulls + spans[1:]


def model_files_size(model_dir: str | Path) -> int:
    """Bytes of a model's weights on disk (safetensors/bin/onnx files), the size a deployment ships."""
    total = 0
    for name in os.listdir(model_dir):
        if name.endswith((".safetensors", ".bin", ".onnx", ".onnx.data")):
            total += (Path(model_dir) / name).stat().st_size
    return total
