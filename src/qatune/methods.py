"""Fine-tuning methods, one registry: what each trains, its options, its learning rates, how it is applied to a
model, how its trained model is saved and merged for export, and how reports name it.

Torch-free to import (the study driver, the dry run and the report read it); the functions that touch a model
import torch and PEFT when called. Every other module asks here: none compares a method's name to a string
(``tests/test_house.py`` checks). Adding a method is one entry in :data:`METHODS` plus its tests.

Adapter methods use PEFT's generic ``PeftModel`` (``task_type=None``), not the question-answering task type:
``PeftModelForQuestionAnswering.forward`` (peft 0.21.2) takes ``token_type_ids`` by name and does not pass it on, so
a BERT-family model would see every token as segment 0; the generic forward hands every input to the base model
unchanged (``qatune.model.load.check_segment_inputs`` proves it before a model trains or answers). The span head
``qa_outputs`` trains in full beside every method (PEFT's ``modules_to_save``). LoRA's alpha policy sets its scaling
for rank sweeps: ``fixed`` (alpha as given, scale alpha/r), ``proportional`` (alpha = 2r, scale 2) and ``rslora``
(scale alpha/sqrt(r), PEFT's ``use_rslora``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qatune.errors import ModelError

HEAD = "qa_outputs"
ALPHA_POLICIES = ("fixed", "proportional", "rslora")
LORA_OPTIONS = ("lora_rank", "lora_alpha", "alpha_policy", "lora_dropout", "lora_targets")
LORA_COST_OPTIONS = ("lora_rank", "lora_dropout", "lora_targets")  # alpha and its policy only scale the output

# Attention and feed-forward linears per architecture (module-name suffixes, as PEFT matches them).
DEFAULT_LORA_TARGETS = {
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "bert": ["query", "key", "value", "dense"],
    "mobilebert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
}
# IA3 (Liu et al. 2022) rescales keys, values and the feed-forward output layer's input: PEFT's BERT targets, and
# DistilBERT's modules of the same roles.
_BERT_IA3 = (["key", "value", "output.dense"], ["output.dense"])
IA3_TARGETS = {"bert": _BERT_IA3, "mobilebert": _BERT_IA3, "roberta": _BERT_IA3, "electra": _BERT_IA3,
               "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"])}


@dataclass(frozen=True)
class Method:
    """One fine-tuning method. ``peft`` builds its PEFT config from ``(model, settings)``; a method without one
    trains the model's own parameters that ``trains(name)`` accepts."""

    name: str
    label: str  # in reports and model cards
    help: str
    learning_rate: float  # the default peak learning rate
    learning_rates: tuple[float, ...]  # a default range to tune over, a factor of ~3 apart
    options: tuple[str, ...] = ()  # training options only this method reads (a study refuses them elsewhere)
    cost_options: tuple[str, ...] = ()  # of those, the ones that change what a step costs
    rank: str | None = None  # the option that is its rank, for rank sweeps and rank notes
    peft: Callable[[Any, dict], Any] | None = None
    trains: Callable[[str], bool] = field(default=lambda name: True)
    saves_merged: bool = False  # the run saves merged weights: its adapter only fits the base weights it changed
    id_marks: dict = field(default_factory=dict)  # added to the run id (runs before a fix are other runs)

    def settings(self, cfg) -> dict:
        """The options of a configuration (a TrainConfig or anything with those attributes) this method reads."""
        return {k: getattr(cfg, k) for k in self.options}

    def key(self, cfg) -> tuple:
        """:meth:`settings` hashable, as (name, value) pairs (a cache key of a model's shape)."""
        return tuple((k, _frozen(getattr(cfg, k))) for k in self.options)

    def cost_key(self, cfg) -> tuple:
        """What of a configuration changes this method's step cost, hashable (a calibration key)."""
        return tuple((k, _frozen(getattr(cfg, k))) for k in self.cost_options)

    def describe(self, config: dict) -> str:
        """The method as a reader names one run of it: "LoRA r=8 (rslora)"."""
        if self.rank is None:
            return self.label
        policy = f" ({config['alpha_policy']})" if config.get("alpha_policy") else ""
        return f"{self.label} r={config[self.rank]}{policy}"


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------- PEFT configs
def effective_alpha(settings: dict) -> float:
    """LoRA's alpha under the policy: ``proportional`` fixes alpha = 2r (scale 2); the others use alpha."""
    return 2.0 * settings["lora_rank"] if settings["alpha_policy"] == "proportional" else settings["lora_alpha"]


def linear_module_names(model) -> list[str]:
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def lora_targets(model, targets: list[str] | None) -> list[str]:
    """The target list for ``model``: the given one (checked) or the architecture's default."""
    import torch

    model_type = getattr(model.config, "model_type", "")
    if not targets:
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ModelError(f"no default LoRA targets for model type {model_type!r}; pass --lora-targets "
                             f"from its linear modules: {', '.join(linear_module_names(model))}")
        return list(DEFAULT_LORA_TARGETS[model_type])
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelError(f"LoRA target module(s) {missing} match no linear layer of this {model_type} model; "
                         f"its linear modules are: {', '.join(linear_module_names(model))}")
    return list(targets)


def _lora(**variant) -> Callable[[Any, dict], Any]:
    def build(model, s: dict):
        from peft import LoraConfig

        if s["alpha_policy"] not in ALPHA_POLICIES:
            raise ModelError(f"unknown alpha policy {s['alpha_policy']!r}; choose from {ALPHA_POLICIES}")
        if s["lora_rank"] < 1:
            raise ModelError(f"LoRA rank must be >= 1, got {s['lora_rank']}")
        meta = next(model.parameters()).is_meta  # shapes only: an initialisation from the weights has none to read
        return LoraConfig(task_type=None, modules_to_save=[HEAD], r=s["lora_rank"], lora_alpha=effective_alpha(s),
                          lora_dropout=s["lora_dropout"], target_modules=lora_targets(model, s["lora_targets"]),
                          use_rslora=s["alpha_policy"] == "rslora",
                          **{k: v for k, v in variant.items() if not (meta and k == "init_lora_weights")})
    return build


def _loha(model, s: dict):
    from peft import LoHaConfig

    return LoHaConfig(task_type=None, modules_to_save=[HEAD], r=s["lora_rank"], alpha=s["lora_alpha"],
                      target_modules=lora_targets(model, s["lora_targets"]))


def _ia3(model, s: dict):
    from peft import IA3Config

    model_type = getattr(model.config, "model_type", "")
    if model_type not in IA3_TARGETS:
        raise ModelError(f"no IA3 targets for model type {model_type!r}; IA3 knows {sorted(IA3_TARGETS)}")
    targets, feedforward = IA3_TARGETS[model_type]
    return IA3Config(task_type=None, modules_to_save=[HEAD], target_modules=targets, feedforward_modules=feedforward)


# ---------------------------------------------------------------------------------------------- the registry
_LORA_LIKE = {"options": LORA_OPTIONS, "cost_options": LORA_COST_OPTIONS, "rank": "lora_rank"}
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", "full FT", "full fine-tuning: every weight trains", 1e-4, (3e-5, 1e-4, 3e-4)),
    Method("lora", "LoRA", "low-rank adapters on the linear layers (PEFT LoRA)", 5e-4, (1.5e-4, 5e-4, 1.5e-3, 4.5e-3),
           **_LORA_LIKE, peft=_lora(), id_marks={"lora_forward": "all inputs"}),
    Method("dora", "DoRA", "weight-decomposed LoRA: a trained magnitude per output beside the low-rank direction "
           "(PEFT use_dora)", 5e-4, (1.5e-4, 5e-4, 1.5e-3, 4.5e-3), **_LORA_LIKE, peft=_lora(use_dora=True)),
    Method("pissa", "PiSSA", "LoRA initialised on the weights' principal singular vectors, the rest left in the "
           "base (PEFT init_lora_weights='pissa'); saved merged", 2e-4, (5e-5, 1.5e-4, 5e-4, 1.5e-3),
           **_LORA_LIKE, peft=_lora(init_lora_weights="pissa"), saves_merged=True),
    Method("loha", "LoHa", "the Hadamard product of two low-rank pairs as the update (PEFT LoHa, from LyCORIS): rank "
           "up to r^2 from 2x LoRA's parameters", 5e-4, (1.5e-4, 5e-4, 1.5e-3, 4.5e-3),
           options=("lora_rank", "lora_alpha", "lora_targets"), cost_options=("lora_rank", "lora_targets"),
           rank="lora_rank", peft=_loha),
    Method("ia3", "IA3", "learned rescaling of keys, values and the feed-forward input (PEFT IA3)", 3e-3,
           (1e-3, 3e-3, 1e-2, 3e-2), peft=_ia3),
    Method("bitfit", "BitFit", "only the bias terms (and the span head) train; no PEFT", 1e-3, (3e-4, 1e-3, 3e-3, 1e-2),
           trains=lambda name: name.endswith(".bias") or name.startswith(HEAD + ".") or f".{HEAD}." in name),
)}
NAMES = tuple(METHODS)
OPTIONS = tuple(dict.fromkeys(o for m in METHODS.values() for o in m.options))  # every method-only option
REFERENCE = "full"  # the method every other is compared against in a report


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ModelError(f"unknown fine-tuning method (strategy) {name!r}; choose from {', '.join(NAMES)}") from None


def apply_method(model, name: str, settings: dict | None = None):
    """The model to train with method ``name``: a PEFT model for an adapter method, else the model itself with
    only the method's parameters trainable. ``settings``: the method's options (:meth:`Method.settings`)."""
    m = method(name)
    if m.peft is None:
        for n, p in model.named_parameters():
            p.requires_grad_(m.trains(n))
        return model
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():  # PEFT asks transformers' deprecated is_gradient_checkpointing: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, m.peft(model, settings or {}))


def to_save(model, name: str):
    """What a run saves as its model: itself, or for a method whose adapter only fits the base it changed, a
    merged copy (the run's own model is left as it is)."""
    if not method(name).saves_merged:
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()


def adapter_widths(model, rank: int | None) -> dict:
    """For a method with a rank: the narrowest adapted layer, min(d_in, d_out), and how many adapted layers the
    rank reaches (there a larger rank cannot raise the rank of the weight update any further); {} without."""
    if rank is None:
        return {}
    from peft.tuners.lora import LoraLayer

    widths = [min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, LoraLayer)]
    return {"lora_min_width": min(widths) if widths else None, "lora_layers": len(widths),
            "lora_layers_at_full_rank": sum(rank >= w for w in widths)}
