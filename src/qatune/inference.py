"""Inference: window logits from a model, evaluation on SQuAD data, and the `Reader` question-answering API.

transformers 5 removed its question-answering pipeline; :class:`Reader` replaces it for qatune models,
using the same windowing and decoding as training and evaluation, so answers match the reported scores.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qatune.data import QAExample, SquadData
from qatune.decode import Decoded, decode
from qatune.features import Features, build_features, collate
from qatune.metrics import squad_v1, squad_v2


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16 on the model's device, or nothing for fp32."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def window_logits(model: torch.nn.Module, features: Features, pad_token_id: int, batch_size: int = 64,
                  precision: str = "fp32", progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Start/end logits of every window, (windows, longest window) float32, padded with -inf.

    Windows run longest-first in dynamically padded batches, so little compute goes to padding.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = features.lengths
    width = int(lengths.max())
    start = np.full((len(features), width), -np.inf, dtype=np.float32)
    end = np.full_like(start, -np.inf)
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)

    def store(rows, s, e, n):  # copy one batch's logits to the host (the only device sync per batch)
        s, e = s.cpu().numpy(), e.cpu().numpy()
        for j, r in enumerate(rows):
            k = min(int(lengths[r]), n)
            start[r, :k] = s[j, :k]
            end[r, :k] = e[j, :k]

    pending = None
    for rows in batches:
        batch = collate(features, rows, pad_token_id, with_labels=False)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast_context(device, precision):
            out = model(**batch)
        # Read the previous batch back while the device computes this one.
        if pending is not None:
            store(*pending)
        pending = (rows, out.start_logits.float(), out.end_logits.float(), batch["input_ids"].shape[1])
    if pending is not None:
        store(*pending)
    model.train(was_training)
    return start, end


def evaluate(model: torch.nn.Module, tokenizer, data: SquadData, max_seq_length: int = 384, doc_stride: int = 128,
             batch_size: int = 64, precision: str = "fp32", n_best: int = 20, max_answer_length: int = 30,
             null_threshold: float = 0.0, nbest_size: int = 20, progress: bool = False,
             cache_dir: str | None = None) -> tuple[dict, Decoded]:
    """Predict every question of ``data`` and score it with the official metric of its SQuAD version."""
    if cache_dir:
        from qatune.features import cached_features

        feats = cached_features(data.examples, tokenizer, max_seq_length, doc_stride, cache_dir)
    else:
        feats = build_features(data.examples, tokenizer, max_seq_length, doc_stride)
    start, end = window_logits(model, feats, tokenizer.pad_token_id, batch_size, precision, progress)
    v2 = data.version.startswith("2")
    decoded = decode(data.examples, feats.example_index, feats.padded_offsets(), start, end, n_best=n_best,
                     max_answer_length=max_answer_length, version_2=v2, null_threshold=null_threshold,
                     nbest_size=nbest_size)
    refs = data.references()
    metrics = squad_v2(refs, decoded.predictions, na_probs=decoded.null_odds) if v2 else \
        squad_v1(refs, decoded.predictions)
    metrics = {**metrics, "questions": len(data.examples), "windows": len(feats)}
    return metrics, decoded


class Reader:
    """Answer questions about a text with a trained qatune model (a full model or a LoRA adapter).

    >>> reader = Reader.load("runs/full/model")            # doctest: +SKIP
    >>> reader.answer("Who wrote it?", "It was written by Ada.", top_k=3)   # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                 max_answer_length: int = 30, precision: str = "fp32"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_seq_length, self.doc_stride = max_seq_length, doc_stride
        self.max_answer_length, self.precision = max_answer_length, precision

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> Reader:
        """Load a saved model directory; window settings default to those it was trained with."""
        from qatune.models import load_tokenizer, load_trained

        path = Path(path)
        settings_file = path / "qatune.json"
        settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
        for key in ("max_seq_length", "doc_stride", "max_answer_length"):
            if key in settings:
                kwargs.setdefault(key, settings[key])
        return cls(load_trained(path), load_tokenizer(str(path)), **kwargs)

    def answer_many(self, items: Sequence[tuple[str, str]], top_k: int = 1) -> list[list[dict]]:
        """Answers for (question, context) pairs: for each, up to ``top_k`` dicts with text, start, end, score,
        probability, best first."""
        examples = [QAExample(str(i), "", ctx, q, ()) for i, (q, ctx) in enumerate(items)]
        feats = build_features(examples, self.tokenizer, self.max_seq_length, self.doc_stride)
        start, end = window_logits(self.model, feats, self.tokenizer.pad_token_id, precision=self.precision)
        d = decode(examples, feats.example_index, feats.padded_offsets(), start, end,
                   max_answer_length=self.max_answer_length, nbest_size=max(top_k, 20))
        return [d.nbest.get(ex.id, [])[:top_k] for ex in examples]

    def answer(self, question: str, context: str, top_k: int = 1) -> list[dict]:
        return self.answer_many([(question, context)], top_k)[0]
