"""Studies: a declarative TOML file -> a grid of training runs, executed resumably with results in SQLite.

A study file has shared ``[defaults]`` (any training option), a list of ``[[arms]]`` (a model x strategy
pair with its own options) and a ``[grid]`` whose lists multiply the runs: ``lora_rank``, ``alpha_policy``
(LoRA arms only), ``train_questions`` (data volumes) and ``seed`` (all arms), or any other option.
Each run is named by a hash of its resolved configuration, so re-running the study skips finished runs,
resumes an interrupted one from its checkpoint, and a changed setting is a new run rather than a stale one.

The *driver* (:func:`run_study`) expands the grid, claims runs in the results store (`qatune.store`) and
hands them to a *launcher* (`qatune.launch`: worker processes here, or Ray tasks); each run trains in a
process of its own and its outcome comes back to the driver, the only writer of the store.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from qatune import store
from qatune.config import TrainConfig
from qatune.config import config_hash as run_id
from qatune.errors import QatuneError, unreadable
from qatune.rundir import RunDir
from qatune.tracking import StudyTracker

LORA_ONLY = ("lora_rank", "alpha_policy", "lora_alpha", "lora_dropout", "lora_targets")

# Question counts of hub data sets, for dry-run estimates when the data is not at hand (offline).
KNOWN_SIZES = {("rajpurkar/squad", "train"): 87599, ("rajpurkar/squad", "validation"): 10570,
               ("rajpurkar/squad_v2", "train"): 130319, ("rajpurkar/squad_v2", "validation"): 11873}
WINDOWS_PER_QUESTION = 1.02  # measured on SQuAD v1.1 dev at 384/128 (qatune data check)


class StudyError(QatuneError, ValueError):
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


def config_id(config: dict) -> str:
    """A run's identity without its seed: the runs of one configuration differ only in their seeds."""
    return run_id(config, leave_out=("seed",))


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
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError(str(unreadable(path, "study file", e, "give a UTF-8 TOML file"))) from e
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path}: not valid TOML: {e}") from e
    for table in ("study", "defaults", "grid"):
        if not isinstance(spec.get(table, {}), dict):
            raise StudyError(f"{path}: {table} must be a [{table}] table, got {spec[table]!r}")
    meta = spec.get("study", {})
    name = meta.get("name", path.stem)
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise StudyError(f"{path}: [study] name = {name!r} must be a non-empty string without '/'")
    defaults = dict(spec.get("defaults", {}))
    arms = spec.get("arms")
    if not arms:
        raise StudyError(f"{path}: needs at least one [[arms]] table (name, model, strategy)")
    if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
        raise StudyError(f"{path}: arms must be [[arms]] tables (name, model, strategy)")
    grid = dict(spec.get("grid", {}))
    known = {f.name for f in fields(TrainConfig)}
    arm_names = [a.get("name") for a in arms]
    twice = sorted({n for n in arm_names if arm_names.count(n) > 1})
    if twice:
        raise StudyError(f"{path}: arm name(s) {twice} used more than once; give every [[arms]] its own name")
    headline = meta.get("headline")
    if headline is not None:
        if (not isinstance(headline, list) or len(headline) != 2
                or any(h not in arm_names for h in headline) or headline[0] == headline[1]):
            raise StudyError(f"{path}: [study] headline = {headline!r} must name two different arms "
                             f"(arms: {arm_names})")
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
    headline = tuple(headline) if headline else ((arm_names[0], arm_names[1]) if len(arm_names) >= 2 else None)
    return Study(name, path, base_dir, runs, headline)


# ---------------------------------------------------------------------------------------------- the driver
LEASE_S = 120.0  # a run whose driver stopped renewing its lease this long ago is claimed again
STATUS_EVERY_S = 30.0


class StudyInterrupted(RuntimeError):
    """The driver was stopped (Ctrl-C); its runs were handed back with their checkpoints."""


def run_study(study: Study, launcher=None, max_attempts: int = 3, retry_failed: bool = False,
              lease_s: float = LEASE_S, poll_s: float = 1.0, progress: bool = True) -> dict[str, int]:
    """Drive the study to its end: claim runs, start them on the launcher's slots, record every outcome.

    This process is the only writer of ``study.sqlite`` for its claims; several drivers (on one machine or
    many) may work on one study at once. A failed or lost attempt is retried up to ``max_attempts`` (the
    run resumes from its checkpoint); a failure is recorded with its error. Returns run counts by status.
    """
    from qatune.launch import LocalLauncher

    launcher = launcher or LocalLauncher(workers=1)
    say = (lambda text: print(text, flush=True)) if progress else (lambda text: None)
    db = store.connect(study.directory)
    store.register(db, study.runs)
    ids = [r.id for r in study.runs]
    store.register_grid(db, study.name, str(study.path), study.headline, ids)
    by_id = {r.id: r for r in study.runs}
    for rid, why in untrusted_finished(db, study).items():
        store.reopen(db, rid, why)
        say(f"run {rid} was finished but {why}: training it again")
    if retry_failed:
        n = store.retry_failed(db, ids)
        if n:
            say(f"retrying {n} failed run(s)")
    owner = store.Owner.new()
    tracker = StudyTracker(study)
    free = list(launcher.slots)
    active: dict[str, object] = {}
    waiting = False
    last_status = time.time()
    shared: dict[str, int] = {}  # most runs of this driver that shared a run's device (GPU, or this CPU) with it

    def record(o) -> None:
        slot = active.pop(o.run_id)
        free.append(slot)
        free.sort(key=lambda s: s.index)
        neighbours = shared.pop(o.run_id, 0)
        if o.status == "finished":
            store.finish(db, o.run_id, owner, o.record.metrics, {**o.record.costs(), "shared_runs": neighbours},
                         o.record.curve)
            if by_id[o.run_id].config.report_to == "mlflow":
                tracker.log(o.run_id, by_id[o.run_id].arm, by_id[o.run_id].point, o.record)
            m = o.record.metrics
            score = f"EM {m.get('exact_match', m.get('exact', float('nan'))):.2f}, F1 {m['f1']:.2f}, " if m else ""
            say(f"  finished {o.run_id} ({by_id[o.run_id].arm}): {score}train {o.record.timing['train_s']:.0f}s")
            if (o.record.inference or {}).get("error"):
                say(f"  inference cost of {o.run_id} not measured: {o.record.inference['error']} (kept in its "
                    f"run.json and listed in the report)")
        elif o.status == "interrupted":
            store.release(db, o.run_id, owner)
        else:
            final = store.fail(db, o.run_id, owner, o.error or o.status, max_attempts)
            first = (o.error or o.status).strip().splitlines()[0]
            say(f"  {'failed' if final else 'attempt failed (will retry)'}: {o.run_id}: {first}")

    try:
        while True:
            for o in launcher.poll():
                record(o)
            while free:
                slot = free[0]
                rid = store.claim(db, ids, owner, lease_s, max_attempts, slot.describe())
                if rid is None:
                    break
                free.pop(0)
                run = by_id[rid]
                launcher.submit(run, slot)
                active[rid] = slot
                waiting = False
                done = sum(s == "finished" for s in store.statuses(db, ids).values())
                label = ", ".join(f"{k}={v}" for k, v in run.point.items()) or "no grid"
                say(f"[{done}/{len(ids)} done] start {rid}: {run.arm} ({label}) on {slot.describe()}")
            for rid, slot in active.items():
                others = sum(launcher.shares_device(slot, s) for r, s in active.items() if r != rid)
                shared[rid] = max(shared.get(rid, 0), others)
            reports = {rid: RunDir(by_id[rid].config.output_dir).read_progress() for rid in active}
            store.renew(db, owner, lease_s, {rid: {"step": p.get("step"), "total_steps": p.get("total_steps"),
                                                   "worker": _where(active[rid], p)}
                                             for rid, p in reports.items()})
            if not active:
                states = store.statuses(db, ids).values()
                if not any(s in ("pending", "running") for s in states):
                    break
                if not waiting:
                    say("waiting: the remaining runs are held by another driver (they are claimed here if it stops)")
                    waiting = True
            elif time.time() - last_status > STATUS_EVERY_S:
                last_status = time.time()
                say("  running: " + "; ".join(f"{rid} step {p.get('step', 0)}/{p.get('total_steps', '?')}"
                                              for rid, p in reports.items()))
            time.sleep(poll_s)
    except KeyboardInterrupt:
        stopped = len(active)
        say(f"stopping {stopped} run(s): each saves a checkpoint first ...")
        for o in launcher.stop():
            record(o)
        for rid in list(active):
            store.release(db, rid, owner)
        raise StudyInterrupted(f"stopped; {stopped or 'no'} run(s) were running and keep their checkpoints. "
                               f"Run the same command again to continue.") from None
    finally:
        launcher.close()
        tracker.close()
    counts: dict[str, int] = {}
    for status in store.statuses(db, ids).values():
        counts[status] = counts.get(status, 0) + 1
    db.close()
    return counts


def untrusted_finished(db, study: Study) -> dict[str, str]:
    """Finished runs of this study whose run directory no longer holds what the report needs (deleted,
    damaged, or another configuration's files), with the reason."""
    out = {}
    by_id = {r.id: r for r in study.runs}
    for row in store.rows(db, by_id):
        if row["status"] == "finished":
            record, why = RunDir(row["output_dir"]).finished_record(by_id[row["id"]].config)
            if record is None:
                out[row["id"]] = why if Path(row["output_dir"]).is_dir() else "its run directory is gone"
    return out


def rebuild_store(study: Study) -> dict[str, int]:
    """A new study.sqlite from the run directories (the damaged one is moved aside): each run whose directory
    holds its finished record is finished, every other run is pending (it resumes from its checkpoints)."""
    aside = store.set_aside(study.directory)
    db = store.connect(study.directory)
    store.register(db, study.runs)
    store.register_grid(db, study.name, str(study.path), study.headline, [r.id for r in study.runs])
    counts = {"finished": 0, "pending": 0}
    for run in study.runs:
        run_dir = RunDir(run.config.output_dir)
        record, _ = run_dir.finished_record(run.config)
        if record is None:
            counts["pending"] += 1
            continue
        store.restore(db, run.id, record.metrics, record.costs(), record.curve, run_dir.record.stat().st_mtime)
        counts["finished"] += 1
    db.close()
    return {**counts, "set_aside": str(aside) if aside else None}


def _where(slot, progress: dict) -> str:
    host = progress.get("host")
    return f"{host}: {slot.describe()}" if host else slot.describe()


# ---------------------------------------------------------------------------------------------- dry run
RUN_OVERHEAD_S = 10.0  # worker process start, imports and model load per run (tokenisation is cached per study)


def estimate(run: Run) -> dict:
    """Parameter counts (from the model config, no weights), windows, optimizer steps and training FLOPs."""
    from qatune.calibrate import StepKey
    from qatune.flops import for_config

    cfg = run.config
    params = count_params(cfg)
    windows = estimate_windows(cfg.train_data, cfg.train_split, cfg.train_articles, cfg.train_questions, cfg.seed)
    batches = math.ceil(windows / cfg.batch_size)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * max(1, batches // cfg.grad_accum)))
    trained = steps * cfg.grad_accum * cfg.batch_size  # windows that pass through the model
    # Counted FLOPs per window (forward + backward, attention and LoRA's frozen weights included) at the padded
    # width a typical batch has: what the run will record, computed from the same count.
    width = StepKey.from_config(cfg).width
    per_window = for_config(cfg)
    eval_windows = (estimate_windows(cfg.eval_data, cfg.eval_split, cfg.eval_articles, cfg.eval_questions, cfg.seed)
                    if cfg.eval_data else 0.0)
    return {**params, "train_windows": windows, "steps": steps, "eval_windows": eval_windows,
            "train_pflop": trained * (per_window.forward(width) + per_window.backward(width)) / 1e15}


def project(study: Study, slots: int, threads: int | None, runs_per_device: int = 1, device: str = "cpu",
            progress: bool = True) -> dict:
    """Time every distinct run shape on this machine and project each run's wall time and the study's for
    ``slots`` runs at once (study order, as the driver claims them). ``runs_per_device`` runs sharing one
    GPU are assumed to share it without gain (each takes that many times longer): an upper bound, since small
    models usually gain from sharing (measure with benchmarks/bench_study.py)."""
    from qatune.calibrate import StepKey, calibrate, makespan, project_run_seconds

    keys = {r.id: StepKey.from_config(r.config) for r in study.runs}
    seconds = calibrate(keys.values(), threads=threads, progress=progress, device=device)
    per_run = []
    for r in study.runs:
        est = estimate(r)
        s = seconds[keys[r.id]]
        alone = project_run_seconds(est["steps"], s, est["eval_windows"], r.config.batch_size, RUN_OVERHEAD_S,
                                    r.config.grad_accum)
        per_run.append({"id": r.id, "arm": r.arm, "point": r.point, "steps": est["steps"], "s_per_step": s,
                        "train_pflop": est["train_pflop"], "projected_s": alone * runs_per_device})
    wall = makespan([p["projected_s"] for p in per_run], slots, longest_first=False)
    return {"runs": len(per_run), "total_pflop": sum(p["train_pflop"] for p in per_run),
            "projected_hours": wall / 3600, "serial_hours": sum(p["projected_s"] for p in per_run) / 3600,
            "slots": slots, "threads": threads, "runs_per_device": runs_per_device, "device": device,
            "per_run": per_run}


def count_params(cfg: TrainConfig) -> dict:
    """Parameter counts of a run's model (from its config, no weights) and how far its LoRA rank reaches."""
    from qatune.models import lora_widths, meta_model_of, parameter_counts

    model = meta_model_of(cfg)
    counts = parameter_counts(model)
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return {**counts, "dense_params": counts["total_params"] - emb, **lora_widths(model, cfg.lora_rank)}


def rank_note(widths: dict, rank: int) -> str:
    """A short note when ``rank`` reaches min(d_in, d_out) of adapted layers, else ''."""
    full = widths.get("lora_layers_at_full_rank") or 0
    if not full:
        return ""
    which = "all" if full == widths["lora_layers"] else f"{full} of {widths['lora_layers']}"
    return (f"r={rank} >= min(d_in, d_out) of {which} adapted layers (narrowest {widths['lora_min_width']}): "
            f"the update's rank cannot grow there")


def estimate_windows(source: str, split: str, articles: str | None, questions, seed: int) -> float:
    """Windows of a data selection: question count x windows per question. Hub data sets of known size are
    not downloaded for this (a dry run works offline); other sources are loaded once."""
    name, _, named_split = source.partition(":") if not Path(source).exists() else (source, "", "")
    total = KNOWN_SIZES.get((name, named_split or split))
    if total is not None and not articles:
        n = total if questions is None else (round(questions * total) if isinstance(questions, float) else questions)
        return n * WINDOWS_PER_QUESTION
    return _question_count(source, split, articles, json.dumps(questions), seed) * WINDOWS_PER_QUESTION


@functools.lru_cache(maxsize=64)
def _question_count(source: str, split: str, articles: str | None, questions: str, seed: int) -> int:
    from qatune.data import load_squad, select_articles, subsample

    data = select_articles(load_squad(source, split=split), articles)
    return len(subsample(data.examples, json.loads(questions), seed))
