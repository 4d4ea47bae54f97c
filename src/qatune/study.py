"""Studies: a declarative TOML file -> a grid of training runs, executed resumably with results in SQLite.

A study file has shared ``[defaults]`` (any training option), a list of ``[[arms]]`` (a model x strategy
pair with its own options) and a ``[grid]`` whose lists multiply the runs: ``lora_rank``, ``alpha_policy``
(LoRA arms only), ``train_questions`` (data volumes) and ``seed`` (all arms), or any other option.
Each run is named by a hash of its resolved configuration, so re-running the study skips finished runs,
resumes an interrupted one from its checkpoint, and a changed setting is a new run rather than a stale one.
The database is only written in short transactions (WAL), so a kill at any moment leaves it consistent.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import sqlite3
import time
import tomllib
import traceback
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qatune.train import TrainConfig

LORA_ONLY = ("lora_rank", "alpha_policy", "lora_alpha", "lora_dropout", "lora_targets")
NOT_IN_ID = ("output_dir", "resume", "report_to", "feature_cache_dir")  # where/how a run goes, not what it is

# Question counts of hub data sets, for dry-run estimates when the data is not at hand (offline).
KNOWN_SIZES = {("rajpurkar/squad", "train"): 87599, ("rajpurkar/squad", "validation"): 10570,
               ("rajpurkar/squad_v2", "train"): 130319, ("rajpurkar/squad_v2", "validation"): 11873}
WINDOWS_PER_QUESTION = 1.02  # measured on SQuAD v1.1 dev at 384/128 (qatune data check)


class StudyError(ValueError):
    """A study file or option that cannot be used; the message says where and what to do."""


@dataclass
class Run:
    id: str
    arm: str
    config: TrainConfig
    point: dict  # the grid values that made this run (for tables and figures)


@dataclass
class Study:
    name: str
    path: Path
    directory: Path
    runs: list[Run]
    headline: tuple[str, str] | None  # the two arms compared by the paired bootstrap


def run_id(cfg: TrainConfig) -> str:
    d = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_ID}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _parse_override(text: str) -> tuple[str | None, str, object]:
    """``key=value`` (all arms; a grid key replaces that axis) or ``arm.key=value``; the value is read as TOML,
    else kept as a string."""
    if "=" not in text:
        raise StudyError(f"--set {text!r}: expected key=value or arm.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    arm, _, key = key.strip().rpartition(".")
    return arm or None, key, value


def load_study(path: str | Path, overrides: list[str] = (), directory: str | Path | None = None) -> Study:
    """Read a study file, apply command-line overrides and expand its grid into runs."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise StudyError(f"{path}: study file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: not valid TOML: {e}") from e
    meta = spec.get("study", {})
    name = meta.get("name", path.stem)
    defaults = dict(spec.get("defaults", {}))
    arms = spec.get("arms")
    if not arms:
        raise StudyError(f"{path}: needs at least one [[arms]] table (name, model, strategy)")
    grid = dict(spec.get("grid", {}))
    known = {f.name for f in fields(TrainConfig)}
    arm_names = [a.get("name") for a in arms]
    for arm_name, key, value in map(_parse_override, overrides):
        if arm_name is None and key in grid:  # narrows or replaces a grid axis
            grid[key] = value if isinstance(value, list) else [value]
        elif arm_name is None:
            defaults[key] = value
            for arm in arms:  # a plain override wins over the arms' own settings too
                if key in arm:
                    arm[key] = value
        elif arm_name in arm_names:
            arms[arm_names.index(arm_name)][key] = value
        else:
            raise StudyError(f"--set {arm_name}.{key}: no arm named {arm_name!r} (arms: {arm_names})")
    for where, table in [("defaults", defaults), ("grid", grid), *((f"arm {a.get('name')!r}", a) for a in arms)]:
        bad = sorted(set(table) - known - {"name"})
        if bad:
            raise StudyError(f"{path}: [{where}] has unknown option(s) {bad}; options are the `qatune train` flags "
                             f"with underscores, e.g. {sorted(known)[:6]}...")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"{path}: [grid] {key} must be a non-empty list")
    base_dir = Path(directory) if directory else Path(meta.get("directory", f"studies-out/{name}"))
    if not base_dir.is_absolute() and directory is None:
        base_dir = Path.cwd() / base_dir
    runs = []
    seen = set()
    for arm in arms:
        if "name" not in arm or "model" not in arm or "strategy" not in arm:
            raise StudyError(f"{path}: every [[arms]] needs name, model and strategy (got {sorted(arm)})")
        keys = [k for k in grid if arm["strategy"] == "lora" or k not in LORA_ONLY]
        for values in itertools.product(*(grid[k] for k in keys)):
            point = dict(zip(keys, values))
            settings = {**defaults, **{k: v for k, v in arm.items() if k != "name"}, **point}
            if arm["strategy"] != "lora":
                settings = {k: v for k, v in settings.items() if k not in LORA_ONLY}
            try:
                cfg = TrainConfig.from_dict(settings)
            except (TypeError, ValueError) as e:
                raise StudyError(f"{path}: arm {arm['name']!r} at {point}: {e}") from e
            rid = run_id(cfg)
            if rid in seen:
                continue
            seen.add(rid)
            cfg.output_dir = str(base_dir / "runs" / rid)
            cfg.feature_cache_dir = str(base_dir / "cache")
            cfg.resume = True
            runs.append(Run(rid, arm["name"], cfg, point))
    headline = tuple(meta["headline"]) if "headline" in meta else (
        (arm_names[0], arm_names[1]) if len(arm_names) >= 2 else None)
    return Study(name, path, base_dir, runs, headline)


# ---------------------------------------------------------------------------------------------- results store
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    arm TEXT NOT NULL,
    point TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'finished', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    metrics TEXT,
    costs TEXT,
    output_dir TEXT NOT NULL
);
"""


def connect(directory: Path) -> sqlite3.Connection:
    directory.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(directory / "study.sqlite", timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    db.row_factory = sqlite3.Row
    return db


def register(db: sqlite3.Connection, study: Study) -> None:
    with db:
        for r in study.runs:
            db.execute("INSERT OR IGNORE INTO runs (id, arm, point, config, status, created_at, output_dir) "
                       "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                       (r.id, r.arm, json.dumps(r.point), json.dumps(asdict(r.config)), time.time(),
                        r.config.output_dir))


def rows(db: sqlite3.Connection, ids: list[str] | None = None) -> list[dict]:
    out = []
    for row in db.execute("SELECT * FROM runs ORDER BY created_at, id"):
        d = dict(row)
        if ids is not None and d["id"] not in ids:
            continue
        for k in ("point", "config", "metrics", "costs"):
            d[k] = json.loads(d[k]) if d[k] else None
        out.append(d)
    return out


def costs_of(record: dict) -> dict:
    t, m = record["timing"], record["memory"]
    return {**record["params"], "train_s": t["train_s"], "eval_s": t["eval_s"],
            "train_windows_per_s": t["train_windows_per_s"], "train_tokens_per_s": t["train_tokens_per_s"],
            "peak_rss_mb": m["peak_rss_mb"], "cuda_peak_mb": m.get("cuda_peak_mb"),
            "resumed_from_step": t["resumed_from_step"], "train_questions": record["data"]["train_questions"],
            "train_windows": record["data"]["train_windows"], "precision": record["resolved"]["precision"]}


def run_study(study: Study, progress: bool = True) -> dict[str, int]:
    """Run every unfinished run of the study in order; failures are recorded and the study goes on."""
    from qatune.train import train

    db = connect(study.directory)
    register(db, study)
    todo = [r for r in study.runs if _status(db, r.id) != "finished"]
    n_total = len(study.runs)
    done_before = n_total - len(todo)
    for k, r in enumerate(todo, 1):
        label = ", ".join(f"{key}={v}" for key, v in r.point.items())
        if progress:
            print(f"[{done_before + k}/{n_total}] run {r.id}: {r.arm} ({label or 'no grid'})", flush=True)
        with db:
            db.execute("UPDATE runs SET status='running', attempts=attempts+1, started_at=?, error=NULL WHERE id=?",
                       (time.time(), r.id))
        try:
            record = train(r.config, progress=progress)
        except Exception as e:  # noqa: BLE001 - a failed run is data; the study goes on
            with db:
                db.execute("UPDATE runs SET status='failed', finished_at=?, error=? WHERE id=?",
                           (time.time(), f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}", r.id))
            if progress:
                print(f"  failed: {type(e).__name__}: {e}", flush=True)
            continue
        with db:
            db.execute("UPDATE runs SET status='finished', finished_at=?, metrics=?, costs=? WHERE id=?",
                       (time.time(), json.dumps(record["metrics"]), json.dumps(costs_of(record)), r.id))
    counts: dict[str, int] = {}
    for row in rows(db, [r.id for r in study.runs]):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    db.close()
    return counts


def _status(db: sqlite3.Connection, rid: str) -> str | None:
    row = db.execute("SELECT status FROM runs WHERE id=?", (rid,)).fetchone()
    return row["status"] if row else None


# ---------------------------------------------------------------------------------------------- dry run
def estimate(run: Run) -> dict:
    """Parameter counts (from the model config, no weights) and training FLOPs from window counts."""
    params = count_params(run.config)
    windows = estimate_windows(run.config)
    epochs = run.config.epochs if not run.config.max_steps else run.config.max_steps * run.config.batch_size / windows
    tokens = windows * epochs * 180  # mean tokens per window at 384/128 on SQuAD v1.1 (qatune data check)
    per_token = 6 * params["dense_params"] if run.config.strategy == "full" else 4 * params["dense_params"]
    return {**params, "train_windows": windows, "train_pflop": per_token * tokens / 1e15}


def count_params(cfg: TrainConfig) -> dict:
    return dict(_count_params(cfg.model, cfg.strategy, cfg.lora_rank, cfg.lora_alpha, cfg.alpha_policy,
                              tuple(cfg.lora_targets or ())))


@functools.lru_cache(maxsize=256)
def _count_params(model_name: str, strategy: str, rank: int, alpha: float, policy: str, targets: tuple) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    from qatune.models import LoraSettings, _known_configs, apply_strategy, parameter_counts, resolve_model

    try:
        known = _known_configs()
        if model_name in known and not Path(model_name).exists():
            mcfg = known[model_name]()  # no network needed for the seed study's models
        else:
            mcfg = AutoConfig.from_pretrained(resolve_model(model_name))
    except (OSError, ValueError):
        raise StudyError(f"cannot read the config of {model_name!r} offline; use a local directory") from None
    with torch.device("meta"):
        model = AutoModelForQuestionAnswering.from_config(mcfg)
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    model = apply_strategy(model, strategy, LoraSettings(rank, alpha, 0.0, policy, list(targets) or None))
    counts = parameter_counts(model)
    return {**counts, "dense_params": counts["total_params"] - emb}


def estimate_windows(cfg: TrainConfig) -> float:
    """Training windows: question count x windows per question. Hub data sets of known size are not
    downloaded for this (a dry run works offline); other sources are loaded once."""
    name, _, split = cfg.train_data.partition(":") if not Path(cfg.train_data).exists() else (cfg.train_data, "", "")
    total = KNOWN_SIZES.get((name, split or cfg.train_split))
    q = cfg.train_questions
    if total is not None and not cfg.train_articles:
        n = total if q is None else (round(q * total) if isinstance(q, float) else q)
        return n * WINDOWS_PER_QUESTION
    return _question_count(cfg.train_data, cfg.train_split, cfg.train_articles, json.dumps(q), cfg.seed) * \
        WINDOWS_PER_QUESTION


@functools.lru_cache(maxsize=64)
def _question_count(source: str, split: str, articles: str | None, questions: str, seed: int) -> int:
    from qatune.data import load_squad, select_articles, subsample

    data = select_articles(load_squad(source, split=split), articles)
    return len(subsample(data.examples, json.loads(questions), seed))
