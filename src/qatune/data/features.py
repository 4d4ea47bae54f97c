"""Features: SQuAD examples -> overlapping token windows with span labels and context offsets.

A question and its context are tokenised as one pair (question first, only the context truncated);
a long context becomes several windows that overlap by ``doc_stride`` tokens (``stride`` as the fast
tokenizers define it). Every window keeps its example index and the character offsets of its context
tokens (``-1`` elsewhere), so decoding can map token spans back to exact context substrings, and
carries start/end token labels (the CLS index, 0, when the first answer is not wholly inside it).
Windows are stored unpadded; :func:`collate` pads a batch to its own longest window.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from qatune.data.squad import MIN_SEQ_LENGTH, QAExample
from qatune.errors import QatuneError

PAD_MULTIPLE = 8


class FeatureError(QatuneError, ValueError):
    """A window setting that cannot work with the data; the message says which record and what to change."""


@dataclass
class Features:
    """Unpadded windows of a list of examples (one row per window)."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    offsets: list[np.ndarray]  # (len, 2) char offsets into the context, -1 for question/special tokens
    example_index: np.ndarray  # window -> position of its example in the input list
    start_positions: np.ndarray  # label token indices; 0 (CLS) when the answer is not inside the window
    end_positions: np.ndarray
    max_seq_length: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def padded_offsets(self) -> np.ndarray:
        """Offsets as one (windows, max_len, 2) array, padded with -1 (what vectorised decoding wants)."""
        out = np.full((len(self), int(self.lengths.max()), 2), -1, dtype=np.int32)
        for i, off in enumerate(self.offsets):
            out[i, : len(off)] = off
        return out




def check_window_settings(max_seq_length: int, doc_stride: int) -> None:
    if max_seq_length < MIN_SEQ_LENGTH:
        raise FeatureError(f"max_seq_length={max_seq_length} is too small for question + context windows "
                           f"(use >= {MIN_SEQ_LENGTH}; 384 is usual)")
    if not 0 <= doc_stride < max_seq_length:
        raise FeatureError(f"doc_stride={doc_stride} must be >= 0 and smaller than max_seq_length={max_seq_length}")


def build_features(
    examples: Sequence[QAExample],
    tokenizer,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    batch_size: int = 1000,
) -> Features:
    """Tokenise examples into windows with labels and context-only offsets.

    Labels use the first answer, as SQuAD training does; unanswerable questions get CLS in every window.
    """
    check_window_settings(max_seq_length, doc_stride)
    if not getattr(tokenizer, "is_fast", False):
        raise FeatureError(f"{type(tokenizer).__name__} is not a fast tokenizer; offsets need a tokenizers-backed one")
    if tokenizer.padding_side != "right":
        raise FeatureError("only right-padding tokenizers are supported (the question must come first)")
    use_types = "token_type_ids" in tokenizer.model_input_names
    ids, types, offs, ex_idx, starts, ends = [], [], [], [], [], []
    covered = np.zeros(len(examples), dtype=np.int64)  # end of the last window's context, per example
    backend = _window_backend(tokenizer, max_seq_length, doc_stride)
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        for e, encoding in _encode(backend, tokenizer, chunk, lo, max_seq_length, doc_stride):
            ex = examples[e]
            off = np.fromiter(chain.from_iterable(encoding.offsets), np.int32, 2 * len(encoding)).reshape(-1, 2)
            cs, ce = _context_range(encoding.sequence_ids)
            off[:cs] = -1
            off[ce + 1 :] = -1
            s, t = (label_span(off, cs, ce, ex.answers[0].start, ex.answers[0].end) if ex.answers and not
                    ex.is_impossible else (0, 0))
            ids.append(np.array(encoding.ids, dtype=np.int32))
            if use_types:
                types.append(np.array(encoding.type_ids, dtype=np.int8))
            offs.append(off)
            ex_idx.append(e)
            starts.append(s)
            ends.append(t)
            covered[e] = off[ce, 1]
    _check_coverage(examples, covered, backend)
    return Features(
        input_ids=ids,
        token_type_ids=types if use_types else None,
        offsets=offs,
        example_index=np.asarray(ex_idx, dtype=np.int64),
        start_positions=np.asarray(starts, dtype=np.int64),
        end_positions=np.asarray(ends, dtype=np.int64),
        max_seq_length=max_seq_length,
    )


def cached_features(examples: Sequence[QAExample], tokenizer, max_seq_length: int, doc_stride: int,
                    cache_dir: str | Path | None) -> Features:
    """``build_features`` through an on-disk cache keyed by tokenizer, window settings and the examples' content,
    so the runs of a study that share them tokenise once."""
    if not cache_dir:
        return build_features(examples, tokenizer, max_seq_length, doc_stride)
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"{max_seq_length}/{doc_stride}".encode())
    for ex in examples:
        h.update("\x1f".join([ex.id, ex.question, ex.context, *(f"{a.start}:{a.text}" for a in ex.answers),
                              str(ex.is_impossible)]).encode())
    path = Path(cache_dir) / f"features-{h.hexdigest()[:20]}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    feats = build_features(examples, tokenizer, max_seq_length, doc_stride)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # unique across hosts of a cluster
    with open(tmp, "wb") as f:
        pickle.dump(feats, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return feats


_WINDOW_TOKENIZERS: dict[tuple, object] = {}  # (tokenizer, settings) -> a configured copy of its backend
_WINDOW_LOCK = threading.Lock()


def _window_backend(tokenizer, max_seq_length: int, doc_stride: int):
    """A copy of the tokenizer's Rust backend set to question/context windows (truncate only the context, keep
    ``doc_stride`` tokens of overlap, no padding). Calling the backend directly gives the same windows as
    ``tokenizer(..., truncation="only_second", stride=..., return_overflowing_tokens=True)`` without
    transformers converting every window into Python lists first.

    A configured copy per (tokenizer, settings), made once and never changed afterwards, rather than the shared
    backend switched and restored: several threads (a server's requests) can tokenise at once, and calls of
    the tokenizer elsewhere (which set its truncation and padding) do not disturb them."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    key = (id(backend), max_seq_length, doc_stride, tokenizer.truncation_side, split)
    with _WINDOW_LOCK:
        entry = _WINDOW_TOKENIZERS.get(key)
        if entry is None or entry[0] is not backend:
            copy = Tokenizer.from_str(backend.to_str())
            copy.enable_truncation(max_seq_length, stride=doc_stride, strategy="only_second",
                                   direction=tokenizer.truncation_side)
            copy.no_padding()
            copy.encode_special_tokens = split
            if len(_WINDOW_TOKENIZERS) >= 16:  # a few tokenizers x settings in practice; bound it anyway
                _WINDOW_TOKENIZERS.pop(next(iter(_WINDOW_TOKENIZERS)))
            entry = _WINDOW_TOKENIZERS[key] = (backend, copy)  # holding ``backend`` keeps its id unique
        return entry[1]


def _encode(backend, tokenizer, chunk: Sequence[QAExample], lo: int, max_seq_length: int, doc_stride: int):
    """(example index, window encoding) for every window of the chunk, in order."""
    try:
        encodings = backend.encode_batch([(ex.question.lstrip(), ex.context) for ex in chunk], add_special_tokens=True)
    except BaseException as err:  # the Rust side panics (PanicException is a BaseException) on bad strides
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        _explain_window_failure(tokenizer, chunk, max_seq_length, doc_stride, err)
        raise
    for e, encoding in enumerate(encodings, start=lo):
        yield e, encoding
        for window in encoding.overflowing:
            yield e, window


def _explain_window_failure(tokenizer, chunk, max_seq_length: int, doc_stride: int, err: BaseException) -> None:
    """Turn the tokenizer's failure into a message naming the question that does not fit."""
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    q_lens = [len(x) for x in tokenizer([ex.question.lstrip() for ex in chunk], add_special_tokens=False)["input_ids"]]
    worst = int(np.argmax(q_lens))
    room = max_seq_length - q_lens[worst] - n_special
    ex = chunk[worst]
    if room <= doc_stride:
        raise FeatureError(
            f"question {ex.id!r} has {q_lens[worst]} tokens, leaving {max(room, 0)} context tokens per window "
            f"(max_seq_length={max_seq_length} minus question and {n_special} special tokens), which must be more "
            f"than doc_stride={doc_stride}. Raise --max-seq-length, lower --doc-stride, or drop/shorten that question."
        ) from err
    raise FeatureError(f"tokenising windows failed (max_seq_length={max_seq_length}, doc_stride={doc_stride}): {err}") from err


def _check_coverage(examples: Sequence[QAExample], covered: np.ndarray, backend) -> None:
    """Refuse windows that stop before the end of a context: tokenizers 0.23.1 and 0.23.2 cut tokenisation
    short when truncating and lose the tail of long contexts (huggingface/tokenizers#2091)."""
    for e in np.flatnonzero(covered < np.array([len(ex.context.rstrip()) for ex in examples])).tolist():
        tail = examples[e].context[covered[e]:]
        if backend.encode(tail, add_special_tokens=False).ids:  # not just characters the normaliser drops
            import tokenizers

            raise FeatureError(
                f"the windows of question {examples[e].id!r} stop at character {covered[e]} of its "
                f"{len(examples[e].context)}-character context: the tokenizer lost the rest. This is a known bug of "
                f"tokenizers {tokenizers.__version__} (0.23.1 and 0.23.2 drop overflowing tokens, "
                f"huggingface/tokenizers#2091); install another version, e.g. pip install 'tokenizers>=0.23.3'."
            )


def _context_range(sequence_ids: list[int | None]) -> tuple[int, int]:
    """First and last token index of the context (sequence 1) in a window."""
    try:
        return sequence_ids.index(1), len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    except ValueError:
        raise FeatureError("a window has no context tokens: is the context empty or the question too long?") from None


def label_span(offsets: np.ndarray, cs: int, ce: int, start_char: int, end_char: int) -> tuple[int, int]:
    """Token indices of the answer ``[start_char, end_char)`` in one window, or (0, 0) if not wholly inside.

    ``offsets`` holds context-token character offsets for tokens ``cs..ce``; they are non-decreasing,
    so the start token is the last one beginning at or before ``start_char`` and the end token the first
    one ending at or after ``end_char``.
    """
    ctx = offsets[cs : ce + 1]
    if ctx[0, 0] > start_char or ctx[-1, 1] < end_char:
        return 0, 0
    s = cs + int(np.searchsorted(ctx[:, 0], start_char, side="right")) - 1
    t = cs + int(np.searchsorted(ctx[:, 1], end_char, side="left"))
    return s, t


def batch_width(lengths: Sequence[int], max_seq_length: int, pad_to_max_length: bool = False,
                pad_multiple: int = PAD_MULTIPLE) -> int:
    """The padded width of a batch of windows of these lengths (what `collate` pads to)."""
    if pad_to_max_length:
        return max_seq_length
    longest = int(max(lengths))
    return min(-(-longest // pad_multiple) * pad_multiple, max(max_seq_length, longest))


def collate(features: Features, rows: Sequence[int], pad_token_id: int, pad_to_max_length: bool = False,
            pad_multiple: int = PAD_MULTIPLE, with_labels: bool = True) -> dict[str, torch.Tensor]:
    """Pad the given windows to the batch's longest (rounded up to ``pad_multiple``) or to max_seq_length."""
    lengths = [len(features.input_ids[r]) for r in rows]
    width = batch_width(lengths, features.max_seq_length, pad_to_max_length, pad_multiple)
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64) if features.token_type_ids is not None else None
    for i, (r, n) in enumerate(zip(rows, lengths)):
        input_ids[i, :n] = features.input_ids[r]
        mask[i, :n] = 1
        if types is not None:
            types[i, :n] = features.token_type_ids[r]
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types)
    if with_labels:
        idx = np.asarray(rows)
        batch["start_positions"] = torch.from_numpy(features.start_positions[idx])
        batch["end_positions"] = torch.from_numpy(features.end_positions[idx])
    return batch
