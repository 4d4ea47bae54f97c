"""A training run's configuration: the options, their checks, and the run's identity.

Free of torch, so the study driver, the report and the command line can read and compare configurations without
loading a model stack. ``TrainConfig`` is checked whenever it is built (command line, ``--config`` TOML, study
files, Python): a bad value is refused before any data or weights load, naming the option, the value and what is
allowed. ``config_hash`` is what a run *is* (a study's run id); ``config_differences`` is what ``--resume`` refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from qatune.data.squad import MIN_SEQ_LENGTH
from qatune.errors import ConfigError
from qatune.methods import ALPHA_POLICIES, METHODS, NAMES, method

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard", "mlflow")
ATTENTION_KERNELS = ("auto", "eager", "sdpa")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything that defines a training run (what `run.json` records and a study varies)."""

    model: str = _f("minilm-l6", "hub id, local directory or alias (minilm-l6)")
    strategy: str = _f("full", "fine-tuning method: " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()))
    num_layers: int | None = _f(None, "keep the first N transformer layers of the pretrained encoder (default: all), "
                                      "as DistilBERT's student was initialised from BERT's")
    lora_rank: int = _f(32, "LoRA rank r")
    lora_alpha: float = _f(32.0, "LoRA alpha (ignored by the proportional policy, which uses 2r)")
    alpha_policy: str = _f("fixed", "fixed (alpha/r) | proportional (alpha=2r) | rslora (alpha/sqrt(r))")
    lora_dropout: float = _f(0.1, "dropout on the LoRA input")
    attention_dropout: float | None = _f(None, "dropout on the attention probabilities (unset: the model's own, 0.1 "
                                               "in BERT, MobileBERT and DistilBERT); 0 skips a random mask the size "
                                               "of every attention map")
    lora_targets: list[str] | None = _f(None, "module-name suffixes to adapt (default: per architecture)")
    train_data: str = _f("", "SQuAD JSON file or datasets id[:split]")
    train_split: str = _f("train", "split when train_data is a datasets id")
    train_articles: str | None = _f(None, "1-based article ranges in file order, e.g. 1-36")
    train_questions: int | float | None = _f(None, "question count (int) or fraction (float) drawn with the seed")
    eval_data: str | None = _f(None, "SQuAD JSON file or datasets id[:split] (the test data); leave it out to train "
                                     "without evaluating")
    eval_split: str = _f("validation", "split when eval_data is a datasets id")
    eval_articles: str | None = _f(None, "1-based article ranges, e.g. 37-48")
    eval_questions: int | float | None = _f(None, "question count or fraction (one fixed draw, the same for every "
                                                  "seed and run)")
    validation_data: str | None = _f(None, "validation data, SQuAD JSON file or datasets id[:split]: the learning "
                                           "curve, the kept checkpoint and the v2 null threshold are chosen on it, "
                                           "never on eval_data")
    validation_split: str = _f("validation", "split when validation_data is a datasets id")
    validation_articles: str | None = _f(None, "1-based article ranges of validation_data, e.g. 31-36")
    validation_questions: int | float | None = _f(None, "validation question count or fraction (a fixed draw, the "
                                                        "same for every seed)")
    validation_share: float | None = _f(None, "hold out this share of the training articles (by title, the same for "
                                              "every seed and data volume) as validation data")
    keep: str | None = _f(None, "best | last: the model a run keeps (default: best when it has validation data and "
                                "eval_steps, else last)")
    early_stopping_patience: int = _f(0, "stop after this many validation evaluations without a gain in F1 (0: off); "
                                         "the learning-rate schedule stays that of the full run")
    repair_answers: bool = _f(False, "move answers not found at answer_start to the nearest occurrence")
    output_dir: str = _f("runs/qatune", "where checkpoints, the model and results go")
    max_seq_length: int = _f(384, "tokens per window")
    doc_stride: int = _f(128, "overlap between windows, in tokens")
    epochs: float = _f(2.0, "passes over the training windows (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps; 0 means use epochs")
    max_train_flops: float | None = _f(None, "a compute budget instead of steps or epochs: train up to the first "
                                             "step at which the run's counted training FLOPs (run.json's "
                                             "train_flops) reach this, e.g. 2e15; arms with one budget train at "
                                             "equal compute")
    learning_rate: float | None = _f(None, "peak learning rate (default per method: " + ", ".join(
        f"{m.name} {m.learning_rate:g}" for m in METHODS.values()) + ")")
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
    eval_steps: int = _f(0, "learning curve: F1 every N optimizer steps and at the end (0: off), on the validation "
                            "data (else on the evaluation data)")
    eval_subset: int | None = _f(500, "learning-curve questions: up to this many of the validation (else evaluation) "
                                      "data, a fixed draw")
    n_best: int = _f(20, "start/end candidates per window when decoding")
    max_answer_length: int = _f(30, "longest answer in tokens")
    null_threshold: float = _f(0.0, "SQuAD v2: answer '' when null score - best span > this (with v2 evaluation "
                                    "data the run tunes it for the best F1 and saves that with the model)")
    oracle_threshold: bool = _f(True, "SQuAD v2 test data and no validation data: tune the null threshold on the test "
                                      "questions (an oracle score: run.json has no validation); off refuses such a "
                                      "run when its data loads (a study always does)")
    resume: bool = _f(False, "continue from the last checkpoint in output_dir")
    pause_at: int | None = _f(None, "stop at this step with a checkpoint and a validation score, without the test "
                                    "evaluation (a study's tuning candidate; the schedule stays the full run's)")
    report_to: str = _f("none", "none | tensorboard | mlflow")
    feature_cache_dir: str | None = _f(None, "reuse tokenised windows across runs from this directory")
    compile: bool = _f(False, "torch.compile the model (batches padded to multiples of 64 to bound recompiles)")
    attention: str = _f("auto", "attention kernel: auto (on a CPU eager to train, where it is faster than SDPA, and "
                                "SDPA to evaluate; transformers' default elsewhere) | eager | sdpa. The same "
                                "arithmetic either way")
    inference_cost: bool = _f(False, "after evaluation, measure what the model costs to run: latency, size on disk, "
                                     "int8 ONNX accuracy (needs qatune[onnx]; the study presets turn it on)")

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_data or self.validation_share)

    def resolved_keep(self) -> str:
        """The model a run keeps: "best" (validation F1) or "last"."""
        if self.keep is not None:
            return self.keep
        return "best" if self.has_validation and self.eval_steps else "last"

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return method(self.strategy).learning_rate

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# Allowed values and ranges, checked whenever a TrainConfig is built (CLI, TOML, study files, Python):
# a bad value is refused before any data or weights load, with the option, the value and what is allowed.
KEEP = ("best", "last")
CHOICES = {"strategy": NAMES, "alpha_policy": ALPHA_POLICIES, "attention": ATTENTION_KERNELS,
           "precision": PRECISIONS, "report_to": REPORT_TO, "keep": (None, *KEEP)}
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

    from qatune.data.splits import parse_ranges
    from qatune.data.squad import SquadDataError

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
            raise bad(name, f"choose one of {', '.join(a for a in allowed if a)}")
    for name in AT_LEAST_1:
        if name == "max_steps_if_set":
            if cfg.max_steps < 0:
                raise bad("max_steps", "must be >= 0 (0 trains for --epochs)")
        elif getattr(cfg, name) < 1:
            raise bad(name, "must be a whole number >= 1")
    if cfg.num_layers is not None and cfg.num_layers < 1:
        raise bad("num_layers", "must be >= 1 (layers kept from the bottom of the encoder), or unset for all")
    if not cfg.model.strip():
        raise bad("model", "give a hub id, a local directory or the alias minilm-l6")
    if cfg.max_seq_length < MIN_SEQ_LENGTH:
        raise bad("max_seq_length", f"must be >= {MIN_SEQ_LENGTH} tokens")
    if not 0 <= cfg.doc_stride < cfg.max_seq_length:
        raise bad("doc_stride", f"must be >= 0 and smaller than max_seq_length ({cfg.max_seq_length})")
    if cfg.eval_steps < 0:
        raise bad("eval_steps", "must be >= 0 (0: no learning curve)")
    if cfg.eval_steps and not (cfg.eval_data or cfg.has_validation):
        raise bad("eval_steps", "needs validation data (validation_data or validation_share) or eval_data: the "
                                "learning curve is measured on their questions")
    _check_validation(cfg, bad)
    if cfg.eval_subset is not None and cfg.eval_subset < 1:
        raise bad("eval_subset", "must be >= 1 question (or unset for all evaluation questions)")
    if cfg.max_train_flops is not None and not cfg.max_train_flops > 0:
        raise bad("max_train_flops", "must be > 0 (counted FLOPs, e.g. 2e15), or unset")
    if cfg.max_train_flops is not None and cfg.max_steps:
        raise bad("max_train_flops", f"max_steps = {cfg.max_steps} is set too, and a run has one end: give one "
                                     f"of them (in a study, --set max_steps=0 with a budget)")
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        raise bad("epochs", "must be > 0 (or set max_steps)")
    if cfg.learning_rate is not None and not 0 < cfg.learning_rate < 1:
        raise bad("learning_rate", "must be in (0, 1), e.g. 1e-4")
    if not 0 <= cfg.warmup_ratio < 1:
        raise bad("warmup_ratio", "must be in [0, 1)")
    if cfg.weight_decay < 0:
        raise bad("weight_decay", "must be >= 0")
    for name in ("lora_dropout", "attention_dropout"):
        if getattr(cfg, name) is not None and not 0 <= getattr(cfg, name) < 1:
            raise bad(name, "must be in [0, 1)")
    if cfg.lora_alpha <= 0:
        raise bad("lora_alpha", "must be > 0")
    if cfg.lora_targets is not None and not all(t.strip() for t in cfg.lora_targets) or cfg.lora_targets == []:
        raise bad("lora_targets", "give module-name suffixes such as q_lin v_lin, or leave it unset")
    for name in ("train_questions", "eval_questions", "validation_questions"):
        q = getattr(cfg, name)
        if isinstance(q, float) and not 0 < q <= 1:
            raise bad(name, "a fraction must be in (0, 1]; a question count is a whole number >= 1")
        if isinstance(q, int) and q < 1:
            raise bad(name, "a question count must be >= 1 (or a fraction in (0, 1])")
    for name in ("train_articles", "eval_articles", "validation_articles"):
        spec = getattr(cfg, name)
        if spec is not None:
            try:
                parse_ranges(spec)
            except SquadDataError as e:
                raise bad(name, str(e)) from None
    _check_disjoint(cfg, bad)
    _check_output_dir(cfg, bad)


def _check_output_dir(cfg: TrainConfig, bad) -> None:
    """A run must not write into the model it starts from (its config.json would replace the model's)."""
    import os

    model, out = os.path.abspath(cfg.model), os.path.abspath(cfg.output_dir)
    if os.path.isdir(cfg.model) and (model == out or model.startswith(out + os.sep)):
        raise bad("output_dir", f"is the model's own directory ({cfg.model}): the run would write over the model it "
                                f"starts from; choose another --output-dir")


def _check_validation(cfg: TrainConfig, bad) -> None:
    """Validation options that go together: one source of validation data, and what needs it."""
    if cfg.validation_data and cfg.validation_share:
        raise bad("validation_share", "give validation_data or validation_share, not both")
    if cfg.validation_share is not None and not 0 < cfg.validation_share < 1:
        raise bad("validation_share", "must be in (0, 1), e.g. 0.1 (a tenth of the training articles)")
    for name in ("validation_articles", "validation_questions"):
        if getattr(cfg, name) is not None and not cfg.validation_data:
            raise bad(name, "goes with validation_data (validation_share holds out whole training articles)")
    if cfg.pause_at is not None and (cfg.pause_at < 1 or not cfg.has_validation):
        raise bad("pause_at", "must be >= 1 and needs validation data (a paused run is scored there)")
    if cfg.early_stopping_patience < 0:
        raise bad("early_stopping_patience", "must be >= 0 (0: off)")
    for name, value in (("keep", cfg.keep == "best"), ("early_stopping_patience", cfg.early_stopping_patience > 0)):
        if value and not (cfg.has_validation and cfg.eval_steps):
            raise bad(name, "needs validation data (validation_data or validation_share) and eval_steps: the model "
                            "is chosen among validation evaluations")


# The roles of a run's data; no article may be in two of them.
DATA_ROLES = (("train", "validation"), ("train", "eval"), ("validation", "eval"))


def _check_disjoint(cfg: TrainConfig, bad) -> None:
    """No article is in two roles: where two of train_data, validation_data and eval_data are one source (one file,
    or one datasets id and split), their article ranges must not overlap; an unset range is every article.
    validation_share holds its articles out of train_articles, so training against test covers it. The data loader
    checks titles again, across sources."""
    from qatune.data.splits import parse_ranges
    from qatune.data.squad import source_identity

    for first, second in DATA_ROLES:
        a, b = getattr(cfg, f"{first}_data"), getattr(cfg, f"{second}_data")
        if not (a and b):
            continue
        key = source_identity(a, getattr(cfg, f"{first}_split"))
        if key != source_identity(b, getattr(cfg, f"{second}_split")):
            continue
        ra, rb = getattr(cfg, f"{first}_articles"), getattr(cfg, f"{second}_articles")
        if ra is None and rb is None:
            where = "every article"
        else:
            shared = sorted(set(parse_ranges(ra)) & set(parse_ranges(rb)) if ra and rb
                            else set(parse_ranges(ra or rb)))
            if not shared:
                continue
            where = f"article{'s' if len(shared) > 1 else ''} {_spans(shared)}"
        source = a if key[1] is None or os.path.isdir(a) else f"{key[0]}:{key[1]}"  # a path, or a datasets id:split
        held = (" (validation_share holds its validation articles out of train_articles)"
                if first == "train" and cfg.validation_share else "")
        raise bad(f"{second}_articles", f"{second}_articles {_range(rb)} overlaps {first}_articles {_range(ra)} of "
                                        f"{source} in {where}{held}: give {first}_articles and {second}_articles "
                                        f"that do not overlap")


def _range(spec: str | None) -> str:
    return repr(spec) if spec is not None else "(unset: every article)"


def _spans(indices: list[int]) -> str:
    """0-based article indices as 1-based ranges: [36, 37, 38, 39, 41] -> "37-40, 42"."""
    out: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start + 1}-{prev + 1}" if prev > start else f"{start + 1}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


NOT_IN_HASH = ("output_dir", "resume", "report_to", "feature_cache_dir", "compile", "attention", "inference_cost",
               "pause_at", "oracle_threshold")  # where/how, and a guard that refuses a run rather than changing it
# Options added later, with the value runs had before them: part of a run's identity only when set otherwise, so the
# runs of existing studies keep their ids whatever the option's default becomes.
IN_HASH_WHEN_SET = {"num_layers": None, "eval_steps": 0, "eval_subset": 500, "validation_data": None,
                    "validation_split": "validation", "validation_articles": None, "validation_questions": None,
                    "validation_share": None, "keep": None, "early_stopping_patience": 0,
                    "attention_dropout": None, "max_train_flops": None}


def model_name(config: dict) -> str:
    """A run's model as a reader names it (and the factorial's model factor): its name, and how many layers were
    kept when it was cut."""
    return config["model"] + (f" ({config['num_layers']} layers)" if config.get("num_layers") else "")


def config_hash(cfg: TrainConfig | dict, leave_out: tuple[str, ...] = ()) -> str:
    """What one run *is*: a hash of its configuration without where or how it runs (a study's run id)."""
    d = asdict(cfg) if isinstance(cfg, TrainConfig) else cfg
    d = {k: v for k, v in d.items() if k not in NOT_IN_HASH and k not in leave_out
         and not (k in IN_HASH_WHEN_SET and v == IN_HASH_WHEN_SET[k])}
    if d.get("strategy") in METHODS:  # e.g. LoRA runs before the segment-ids fix are other runs
        d.update(METHODS[d["strategy"]].id_marks)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def config_id(config: TrainConfig | dict) -> str:
    """A run's identity without its seed: the runs of one configuration differ only in their seeds."""
    return config_hash(config, leave_out=("seed",))


def config_differences(stored: dict, cfg: TrainConfig) -> list[str]:
    """The settings in which a stored run differs from ``cfg`` ("name: stored -> given")."""
    given = asdict(cfg)
    try:  # fill options an older version did not record with their defaults
        stored = asdict(TrainConfig.from_dict({k: v for k, v in stored.items() if k in given}))
    except ValueError:
        pass
    return [f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in given.items()
            if k not in NOT_IN_HASH and stored.get(k) != v]
