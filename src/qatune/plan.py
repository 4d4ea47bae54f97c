"""What a study will cost before it runs (``qatune study FILE --dry-run [--calibrate]``).

Parameter counts come from each model's configuration (no weights), windows from question counts, training
FLOPs from the counted FLOPs per window (`qatune.flops`); ``--calibrate`` times a few steps of every distinct
run shape on this machine (`qatune.calibrate`) and projects the study's wall time for the launcher's slots.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from qatune.config import TrainConfig
from qatune.studyfile import Run, Study
from qatune.tuning import planned_steps

# Question counts of hub data sets, for dry-run estimates when the data is not at hand (offline).
KNOWN_SIZES = {("rajpurkar/squad", "train"): 87599, ("rajpurkar/squad", "validation"): 10570,
               ("rajpurkar/squad_v2", "train"): 130319, ("rajpurkar/squad_v2", "validation"): 11873}
WINDOWS_PER_QUESTION = 1.02  # measured on SQuAD v1.1 dev at 384/128 (qatune data check)
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


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def dry_run(study: Study, calibrate_here: bool = False, slots: int = 1, threads: int | None = None,
            runs_per_gpu: int = 1, gpus: int = 0) -> dict:
    """Every run's parameters, windows, steps and training compute; with ``calibrate_here``, measured seconds
    per step and projected wall times for ``slots`` runs at once. Returns ``{summary, header, rows, notes}``."""
    rows, total, run_notes = [], 0.0, []
    for k, r in enumerate(study.runs, 1):
        est = estimate(r)
        total += est["train_pflop"]
        point = ", ".join(f"{key}={v}" for key, v in r.point.items())
        run_notes.append(rank_note(est, r.config.lora_rank) if r.config.strategy == "lora" else "")
        point += " ‡" if run_notes[-1] else ""
        rows.append([k, r.id, r.arm, r.config.model, r.config.strategy, point,
                     f"{est['trainable_params']:,}", f"{est['total_params']:,}", f"{est['trainable_percent']:.2f}",
                     f"{est['train_windows']:,.0f}", f"{est['steps']:,}", f"{est['train_pflop']:.2f}"])
    header = ["#", "run", "arm", "model", "strategy", "grid point", "trainable", "total", "%", "train windows",
              "steps", "train PFLOP"]
    summary = {"runs": len(study.runs), "total_pflop": total}
    notes = [*(f"‡ {n}" for n in sorted({n for n in run_notes if n})),
             f"total training compute: {total:.2f} PFLOP (FLOPs per window counted on each model shape at the "
             f"typical padded width, x windows trained; windows estimated from question counts)"]
    if calibrate_here:
        proj = project(study, slots, threads, runs_per_gpu if gpus else 1, "cuda" if gpus else "cpu")
        for row, p in zip(rows, proj["per_run"]):
            row += [f"{p['s_per_step']:.2f}", hours(p["projected_s"])]
        header += ["s/step", "projected"]
        where = f"{gpus} GPU(s) x {runs_per_gpu} runs per GPU" if gpus else f"{slots} worker(s) x {threads} CPU thread(s)"
        notes.append(f"projected on this machine ({where}): {proj['projected_hours']:.2f} h for the whole study "
                     f"({proj['serial_hours']:.2f} h of runs; each run = {RUN_OVERHEAD_S:.0f} s start-up + steps x "
                     f"measured s/step + evaluation at 1/3 of a step per window)")
        summary.update({k: proj[k] for k in ("projected_hours", "serial_hours", "slots", "threads",
                                             "runs_per_device", "device")})
        summary["per_run"] = [{"id": p["id"], "arm": p["arm"], "steps": p["steps"], "s_per_step": p["s_per_step"],
                               "projected_s": p["projected_s"]} for p in proj["per_run"]]
    if study.groups:
        notes += tuning_notes(study)
        summary["tuning"] = [{"configuration": g.id, "arm": g.arm, "candidates": len(g.candidates),
                              "rungs": g.schedule, "steps": planned_steps(len(g.candidates), g.schedule, study.eta),
                              "grid_steps": len(g.candidates) * g.schedule[-1], "final_seeds": len(g.seeds) - 1}
                             for g in study.groups]
    return {"summary": summary, "header": header, "rows": rows, "notes": notes}


def tuning_notes(study: Study) -> list[str]:
    """What tuning will train: candidates per configuration, the rungs, and the steps halving saves over a grid.
    The table above lists the candidates (first seed); each chosen value then trains with the other seeds."""
    out = []
    for g in study.groups:
        steps = planned_steps(len(g.candidates), g.schedule, study.eta)
        grid = len(g.candidates) * g.schedule[-1]
        where = ", ".join(f"{k}={v}" for k, v in g.point.items()) or "its one configuration"
        out.append(f"tuning {g.arm} at {where}: {len(g.candidates)} candidates ({study.method}, eta {study.eta}), "
                   f"rungs at steps {g.schedule}: {steps:,} candidate steps instead of {grid:,} for the grid "
                   f"({steps / grid:.0%}); then the chosen value with {len(g.seeds) - 1} more seed(s)")
    return out
