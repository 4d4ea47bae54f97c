"""`qatune data check`: validate a SQuAD file and measure what tokenisation and windowing allow.

The span-recovery ceiling decodes logits that peak exactly at every window's labelled tokens and scores
the result with the official metric: the EM/F1 a perfect model could reach with these window settings.
Anything below 100 comes from answers that do not start/end on token boundaries or never fit a window.
"""

from __future__ import annotations

import numpy as np

from qatune.answer.decode import decode
from qatune.answer.metrics import squad_v1, squad_v2
from qatune.data.features import Features, build_features
from qatune.data.squad import SquadData


def ceiling_logits(features: Features, peak: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits that are ``peak`` at each window's start/end label (CLS when the answer is elsewhere), 0 elsewhere."""
    width = int(features.lengths.max())
    start = np.zeros((len(features), width), dtype=np.float32)
    end = np.zeros_like(start)
    rows = np.arange(len(features))
    start[rows, features.start_positions] = peak
    end[rows, features.end_positions] = peak
    return start, end


def check_data(data: SquadData, tokenizer, max_seq_length: int = 384, doc_stride: int = 128) -> dict:
    """Counts, window statistics and the span-recovery ceiling of one data set."""
    feats = build_features(data.examples, tokenizer, max_seq_length, doc_stride)
    start, end = ceiling_logits(feats)
    v2 = data.version.startswith("2")
    decoded = decode(data.examples, feats.example_index, feats.padded_offsets(), start, end, version_2=v2)
    refs = data.references()
    if v2:
        scores = squad_v2(refs, decoded.predictions)
        ceiling = {"ceiling_exact_match": scores["exact"], "ceiling_f1": scores["f1"]}
    else:
        scores = squad_v1(refs, decoded.predictions)
        ceiling = {"ceiling_exact_match": scores["exact_match"], "ceiling_f1": scores["f1"]}
    lengths = feats.lengths
    per_q = np.bincount(feats.example_index, minlength=len(data.examples))
    answerable = [ex for ex in data.examples if not ex.is_impossible]
    labelled = int((feats.start_positions > 0).sum())
    return {
        "source": data.source,
        "version": data.version,
        "articles": len({ex.article for ex in data.examples}),
        "paragraphs": len({(ex.article, ex.context) for ex in data.examples}),
        "questions": len(data.examples),
        "answers": sum(len(ex.answers) for ex in data.examples),
        "unanswerable": len(data.examples) - len(answerable),
        "repaired_answers": data.repaired,
        "max_seq_length": max_seq_length,
        "doc_stride": doc_stride,
        "windows": len(feats),
        "windows_with_answer": labelled,
        "windows_per_question_mean": float(per_q.mean()),
        "windows_per_question_max": int(per_q.max()),
        "tokens_per_window_mean": float(lengths.mean()),
        "tokens_per_window_p50": float(np.percentile(lengths, 50)),
        "tokens_per_window_p95": float(np.percentile(lengths, 95)),
        "tokens_per_window_max": int(lengths.max()),
        **ceiling,
    }
