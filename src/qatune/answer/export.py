"""Export: a trained model as a directory to ship — merged PyTorch weights, or ONNX (optionally int8).

LoRA adapters are folded into their base weights first. ONNX goes through PyTorch's exporter (``torch.onnx.export``,
the torch.export-based one, dynamic batch and sequence axes) and int8 through ONNX Runtime's dynamic quantization
(``quantize_dynamic``: int8 weights, activations quantized per batch at run time), the routes their projects keep
working. Before anything is kept, a parity probe runs the exported model beside the torch model on probe windows
(several lengths, padding, a window cut from a long context) and fails loudly when their logits differ by more
than the stated tolerance. The directory also holds the tokenizer, the inference configuration (``qatune.json``)
and a Hugging Face model card (``README.md``) with the run's EM/F1, training data and configuration and parameter
counts, so ``qatune evaluate/predict/serve`` and other tools can use it as it is.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from qatune.answer.inference import (
    ONNX_FILE,
    SETTINGS_FILE,
    InferenceConfig,
    load_inference_config,
    model_files_size,
    read_settings,
    require,
    resolve_model_dir,
    save_settings,
)
from qatune.errors import QatuneError, check_writable
from qatune.record import exact_match

FORMATS = ("merged", "onnx")
QUANTIZATIONS = ("int8",)
MERGE_TOLERANCE = 1e-3  # max |logit difference|, merged vs adapter model (float rounding only)
ONNX_TOLERANCE = 1e-3  # max |logit difference|, fp32 ONNX Runtime vs torch (kernel rounding only)
# int8 changes every logit a little by design, so the structure of the graph (inputs, attention mask, token types) is
# checked on the fp32 model at ONNX_TOLERANCE first, and the int8 model made from it is checked for quantization error:
# the RMS logit difference relative to the logits' range (0.03-0.07 measured on MiniLM; shuffled logits give ~0.3).
INT8_RELATIVE_RMS_TOLERANCE = 0.15  # RMS |logit difference| / (max - min logit), start and end, over real tokens

PROBE = [  # question, context: short, medium, and one longer than a window (cut into overlapping windows)
    ("Who wrote the report?", "The report was written in 1998 by the planning committee of the city."),
    ("Where is the bridge?", "The old stone bridge crosses the river north of the market square, near the "
     "library. It was rebuilt twice after floods."),
    ("When did the library open?", " ".join(f"Sentence {i} tells that the library of the town opened in "
                                            f"{1800 + i} after a long debate." for i in range(60))),
]


class ExportError(QatuneError):
    """An export that cannot be made or that failed its parity probe; the message says what differed."""


def export(model: str | Path, output_dir: str | Path, format: str = "merged", quantize: str | None = None) -> dict:
    """Export ``model`` (a run, model or adapter directory) to ``output_dir``; returns what was written and the
    parity probe's result. The directory is written aside and moved into place only when the probe passed."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {FORMATS}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; choose from {QUANTIZATIONS}")
    if quantize and format != "onnx":
        raise ExportError("--quantize int8 goes with --format onnx (ONNX Runtime runs the int8 model)")
    from qatune.model.load import check_seq_length, is_adapter_dir, load_tokenizer, load_trained

    model_dir = resolve_model_dir(model)
    if (model_dir / ONNX_FILE).exists():
        raise ExportError(f"{model_dir} is an ONNX export already; export from the run or model directory it came from")
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, model_dir)
    config = load_inference_config(model_dir)
    about = read_settings(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    module = load_trained(model_dir).to("cpu").eval()
    check_seq_length(module.config, config.max_seq_length, str(model))
    probe = probe_batch(tokenizer, config)
    reference = _torch_logits(module, probe)
    result = {"output_dir": str(output_dir), "format": format, "quantize": quantize}
    if is_adapter_dir(model_dir):
        with _quiet_logging():
            module = module.merge_and_unload().eval()
        merge_diff = _max_diff(reference, _torch_logits(module, probe), probe["attention_mask"])
        if merge_diff > MERGE_TOLERANCE:
            raise ExportError(f"merging the LoRA adapter changed the logits by up to {merge_diff:.3g} on the probe "
                              f"(tolerance {MERGE_TOLERANCE:g}); the adapter does not fit its base model")
        result["merge_max_abs_logit_diff"] = merge_diff
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))  # beside it: rename is atomic
    try:
        if format == "merged":
            with _quiet_logging():
                module.save_pretrained(str(tmp))
            diff = result.get("merge_max_abs_logit_diff", 0.0)
            result.update(max_abs_logit_diff=diff, parity_measure="max |logit difference|", parity_value=diff,
                          tolerance=MERGE_TOLERANCE)
        else:
            result.update(_export_onnx(module, probe, reference, tmp, quantize))
            module.config.save_pretrained(str(tmp))  # architecture and labels, for the card and other tools
        tokenizer.save_pretrained(str(tmp))
        settings = {k: v for k, v in about.items() if k not in InferenceConfig.__dataclass_fields__}
        settings.update(format=format, quantize=quantize, exported_from=str(model_dir.resolve()),
                        parity={k: result[k] for k in ("parity_measure", "parity_value", "tolerance",
                                                       "max_abs_logit_diff")})
        save_settings(tmp, config, **settings)
        result["size_bytes"] = model_files_size(tmp)
        result["total_params"] = sum(p.numel() for p in module.parameters())
        write_model_card(tmp, output_dir.name, model_dir, config, result)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _check_output_dir(output_dir: Path, model_dir: Path) -> None:
    """Refuse to replace anything but an earlier export (a typo must not delete a run)."""
    check_writable(output_dir, "--output-dir", directory=True)
    if output_dir.resolve() in (model_dir.resolve(), model_dir.parent.resolve()):
        raise ExportError(f"--output-dir {output_dir} is the model's own directory; choose a new one")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        settings = output_dir / SETTINGS_FILE
        if not settings.exists() or "format" not in read_settings(output_dir) \
                or not (output_dir / "README.md").exists():
            raise ExportError(f"--output-dir {output_dir} exists and is not an earlier export; choose a new "
                              f"directory (an earlier export there would be replaced)")


def probe_batch(tokenizer, config: InferenceConfig) -> dict[str, torch.Tensor]:
    """The probe windows, tokenised and padded as inference pads them."""
    from qatune.data.features import build_features, collate
    from qatune.data.squad import QAExample

    examples = [QAExample(str(i), "", c, q, ()) for i, (q, c) in enumerate(PROBE)]
    feats = build_features(examples, tokenizer, config.max_seq_length, config.doc_stride)
    rows = list(range(len(feats)))[:8]
    return collate(feats, rows, tokenizer.pad_token_id, with_labels=False)


@torch.no_grad()
def _torch_logits(module, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    out = module(**batch)
    return out.start_logits.float().numpy(), out.end_logits.float().numpy()


def _max_diff(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], mask: torch.Tensor) -> float:
    """Largest |difference| of start and end logits over real (not padding) tokens."""
    real = mask.numpy().astype(bool)
    return float(max(np.abs(x - y)[real].max() for x, y in zip(a, b)))


def _relative_rms(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], mask: torch.Tensor) -> float:
    """RMS difference of start (and of end) logits over real tokens, relative to the reference's range; the larger."""
    real = mask.numpy().astype(bool)
    return float(max(np.sqrt(np.mean((x - y)[real] ** 2)) / max(np.ptp(x[real]), 1e-6) for x, y in zip(a, b)))


@contextlib.contextmanager
def _quiet_logging():
    """No warnings, log lines or progress bars from the libraries doing the work (the export reports its result)."""
    from qatune.model.load import quiet_transformers

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


class _Logits(torch.nn.Module):
    """The model as a function of its input tensors to (start_logits, end_logits), the graph ONNX gets."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **types)
        return out.start_logits, out.end_logits


def _export_onnx(module, probe: dict[str, torch.Tensor], reference, out: Path, quantize: str | None) -> dict:
    """Write ``out/model.onnx`` (fp32, or int8 from an fp32 graph) and check it against the torch logits."""
    require("onnx", "onnx")
    require("onnxscript", "onnx")
    from torch.export import Dim

    from qatune.answer.inference import OnnxModel

    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in probe]
    batch, seq = Dim("batch"), Dim("sequence")
    with tempfile.TemporaryDirectory() as work:
        fp32 = Path(work) / "model.fp32.onnx"
        log = io.StringIO()
        try:  # quiet: the exporter reports its steps and optional ops it skips on stdout and in its log
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _quiet_logging():
                torch.onnx.export(_Logits(module).eval(), tuple(probe[n] for n in names), str(fp32),
                                  input_names=names, output_names=["start_logits", "end_logits"],
                                  dynamic_shapes={n: {0: batch, 1: seq} for n in names}, dynamo=True,
                                  external_data=False, verbose=False)
        except Exception as e:  # noqa: BLE001 - the exporter's errors are many types; say which, keep the cause
            summary = str(e).split("## Exception summary")[-1].strip().splitlines()[0][:400]
            raise ExportError(f"torch.onnx.export failed for this {module.config.model_type} model: {summary} "
                              f"(qatune --debug export ... shows the exporter's traceback)") from e
        target = out / ONNX_FILE
        result = _parity(reference, OnnxModel(fp32).run(probe), probe["attention_mask"], None)
        if quantize == "int8":
            quantization = require("onnxruntime.quantization", "onnx")
            # uint8 weights (U8U8 kernels): on x86 CPUs without VNNI, ONNX Runtime's U8S8 kernels (VPMADDUBSW) can
            # saturate; measured on MiniLM fine-tuned on SQuAD (200 dev questions): F1 -2.0 with uint8 weights
            # against -5.3 with int8 weights. Both are 8-bit, a quarter of the fp32 bytes.
            with _quiet_logging():  # "consider pre-processing": advice for static quantization
                quantization.quantize_dynamic(str(fp32), str(target), weight_type=quantization.QuantType.QUInt8)
        else:
            shutil.copy(fp32, target)
    if quantize == "int8":
        result = _parity(reference, OnnxModel(target).run(probe), probe["attention_mask"], quantize)
    return result


def _parity(reference, exported, mask: torch.Tensor, quantize: str | None) -> dict:
    """Compare the exported model's probe logits with the torch model's; ExportError beyond the tolerance."""
    diff = _max_diff(reference, exported, mask)
    if quantize == "int8":
        measure, value = "RMS logit difference / logit range", _relative_rms(reference, exported, mask)
        tolerance = INT8_RELATIVE_RMS_TOLERANCE
    else:
        measure, value, tolerance = "max |logit difference|", diff, ONNX_TOLERANCE
    if not value <= tolerance:
        raise ExportError(f"parity probe failed: the {quantize or 'fp32'} ONNX model's logits differ from the torch "
                          f"model's on the probe windows: {measure} {value:.3g}, beyond the tolerance {tolerance:g} "
                          f"(largest single difference {diff:.3g}); nothing was written")
    return {"max_abs_logit_diff": diff, "parity_measure": measure, "parity_value": value, "tolerance": tolerance}


# ---------------------------------------------------------------------------------------------- model card
def write_model_card(out: Path, name: str, model_dir: Path, config: InferenceConfig, result: dict) -> None:
    """``README.md`` in the Hugging Face model-card format: metadata (model-index with EM/F1) and a text body."""
    hub = require("huggingface_hub", "onnx")
    run = _run_record(model_dir)
    cfg, metrics, data = run.get("config", {}), run.get("metrics", {}), run.get("data", {})
    results = []
    source = data.get("eval_source")
    if metrics and source:
        em = exact_match(metrics)
        dataset = "squad_v2" if "HasAns_total" in metrics or "NoAns_total" in metrics else "squad"
        for metric_type, value, label in (("exact_match", em, "Exact Match"), ("f1", metrics.get("f1"), "F1")):
            if value is not None:
                results.append(hub.EvalResult(task_type="question-answering", task_name="Extractive question answering",
                                              dataset_type=dataset, dataset_name=Path(str(source)).name,
                                              dataset_split=cfg.get("eval_articles") or cfg.get("eval_split"),
                                              metric_type=metric_type, metric_name=label,
                                              metric_value=round(float(value), 2)))
    tags = ["qatune", "question-answering", "extractive-qa"]
    if result["format"] == "onnx":
        tags += ["onnx"] + (["int8"] if result.get("quantize") else [])
    card_data = hub.ModelCardData(model_name=name, eval_results=results or None, pipeline_tag="question-answering",
                                  library_name="onnx" if result["format"] == "onnx" else "transformers", tags=tags,
                                  metrics=["exact_match", "f1"])
    params = run.get("params", {})
    lines = [f"# {name}", "",
             f"An extractive question-answering model ({result['format']}"
             + (f", {result['quantize']} weights" if result.get("quantize") else "")
             + ") exported by qatune from `" + str(model_dir) + "`.", "",
             "## Evaluation", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in metrics.items() if k in ("exact_match", "exact", "f1", "best_f1")]
        lines += ["", f"Measured by the training run on `{source}` ({data.get('eval_questions')} questions) with the "
                  f"PyTorch model; on the parity probe this export's {result['parity_measure']} is "
                  f"{result['parity_value']:.3g} (tolerance {result['tolerance']:g})."]
        if result.get("quantize") and (run.get("inference") or {}).get("int8"):
            i8 = run["inference"]["int8"]
            lines += ["", f"The run also measured an int8 ONNX export on the same questions: EM {i8['exact_match']:.2f}, "
                      f"F1 {i8['f1']:.2f}."]
    else:
        lines += ["No training run record (run.json) next to the model: no evaluation to report."]
    lines += ["", "## Training", ""]
    if cfg:
        lines += [f"- data: `{data.get('train_source')}` ({data.get('train_questions')} questions"
                  + (f", articles {cfg['train_articles']}" if cfg.get("train_articles") else "") + ")",
                  f"- base model: `{cfg.get('model')}`"
                  + (f" cut to its first {cfg['num_layers']} transformer layers" if cfg.get("num_layers") else "")
                  + f", fine-tuning method {_method_text(cfg)}",
                  "", "Configuration:", "", "```json", json.dumps(cfg, indent=1, sort_keys=True), "```"]
    else:
        lines += ["Unknown (no run.json next to the model)."]
    lines += ["", "## Parameters", "",
              f"- total: {result['total_params']:,}"
              + (f"; trained: {params['trainable_params']:,} ({params['trainable_percent']:.2f}%)" if params else ""),
              f"- size on disk: {result['size_bytes'] / 2**20:.1f} MiB", "",
              "## Inference configuration", "", "```json", json.dumps(config.to_dict(), indent=1), "```", "",
              "## Use", "", "```bash", f"qatune predict --model {name} --question \"...\" --context \"...\"",
              f"qatune serve {name} --port 8000", "```"]
    hub.ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(out / "README.md")


def _run_record(model_dir: Path) -> dict:
    """The run.json of the run a model directory belongs to (its parent), or {}."""
    from qatune.rundir import RunDir

    return RunDir(model_dir.parent).read_record_dict()


def _method_text(cfg: dict) -> str:
    from qatune.methods import METHODS

    m = METHODS.get(cfg.get("strategy"))
    return f"{m.describe(cfg)} ({m.help})" if m else str(cfg.get("strategy"))
