"""What a study will cost before it runs (``qatune study FILE --dry-run [--calibrate]``).

Parameter counts come from each model's configuration (no weights), windows from the questions' lengths, training
FLOPs from the counted FLOPs per window (`qatune.model.flops`); ``--calibrate`` times a few steps of every distinct
run shape on this machine (`qatune.study.calibrate`) and projects the study's wall time for the launcher's slots.
"""

from __future__ import annotations

import math
from dataclasses import asdict

from qatune.config import TrainConfig, model_name
from qatune.study.sizes import estimate_windows, optimizer_steps, train_windows, windows_per_question
from qatune.study.studyfile import Run, Study
from qatune.study.tuning import planned_steps

RUN_OVERHEAD_S = 10.0  # worker process start, imports and model load per run (tokenisation is cached per study)


def estimate(run: Run) -> dict:
    """Parameter counts (from the model config, no weights), windows, optimizer steps and training FLOPs."""
    from qatune.model.flops import for_config
    from qatune.study.calibrate import StepKey

    cfg = run.config
    params = count_params(cfg)
    windows = train_windows(cfg)
    steps = optimizer_steps(cfg, windows)
    # Counted FLOPs per window (forward + backward, attention and LoRA's frozen weights included) at the padded
    # width a typical batch has: what the run will record, computed from the same count.
    width = StepKey.from_config(cfg).width
    per_window = for_config(cfg)
    eval_windows = (estimate_windows(cfg.eval_data, cfg.eval_split, cfg.eval_articles, cfg.eval_questions, cfg.seed,
                                     "eval", cfg.max_seq_length, cfg.doc_stride) if cfg.eval_data else 0.0)
    return {**params, "train_windows": windows, "steps": steps, "eval_windows": eval_windows,
            "train_pflop": steps * cfg.grad_accum * per_window.train(cfg.batch_size, width) / 1e15}


def project(study: Study, slots: int, threads: int | None, runs_per_device: int = 1, device: str = "cpu",
            progress: bool = True) -> dict:
    """Time every distinct run shape on this machine and project each run's wall time and the study's for
    ``slots`` runs at once (study order, as the driver claims them). ``runs_per_device`` runs sharing one
    GPU are assumed to share it without gain (each takes that many times longer): an upper bound, since small
    models usually gain from sharing (measure with benchmarks/bench_study.py).

    A tuned configuration's candidates are projected at their share of the halving's steps up to the deciding rung
    (which of them go on is not known before they run), without a test evaluation (no candidate has one), and its
    chosen values' runs at every seed follow as full runs (``per_run`` entries with ``"final": true``)."""
    from qatune.study.calibrate import StepKey, calibrate, calibrate_answers, makespan

    keys = {r.id: StepKey.from_config(r.config) for r in study.runs}
    seconds = calibrate(keys.values(), threads=threads, progress=progress, device=device)
    answers = calibrate_answers(keys.values(), threads=threads, progress=progress, device=device)
    group_of = {run.id: g for g in study.groups for _, run in g.candidates}
    per_run, finals = [], []
    for r in study.runs:
        est, s, g = estimate(r), seconds[keys[r.id]], group_of.get(r.id)
        steps = est["steps"] if g is None else planned_steps(len(g.candidates), g.schedule, study.eta) / len(g.candidates)
        tested = est["eval_windows"] if g is None else 0.0
        per_run.append({"id": r.id, "arm": r.arm, "point": r.point, "steps": steps, "s_per_step": s,
                        "train_pflop": est["train_pflop"] * steps / est["steps"],
                        "projected_s": _seconds(r.config, steps, s, answers[keys[r.id]], tested) * runs_per_device
                        if steps else 0.0})
        if g is not None and r.id == g.candidates[-1][1].id:
            finals += [{"id": f"{g.id}/seed={seed}", "arm": g.arm, "point": {**g.point, "seed": seed},
                        "steps": est["steps"], "s_per_step": s, "train_pflop": est["train_pflop"], "final": True,
                        "projected_s": _seconds(r.config, est["steps"], s, answers[keys[r.id]],
                                                est["eval_windows"]) * runs_per_device}
                       for seed in g.seeds]
    per_run += finals
    wall = makespan([p["projected_s"] for p in per_run], slots, longest_first=False)
    return {"runs": len(per_run), "total_pflop": sum(p["train_pflop"] for p in per_run),
            "projected_hours": wall / 3600, "serial_hours": sum(p["projected_s"] for p in per_run) / 3600,
            "slots": slots, "threads": threads, "runs_per_device": runs_per_device, "device": device,
            "per_run": per_run}


def _seconds(cfg: TrainConfig, steps: float, s_per_step: float, s_per_window: tuple[float, float],
             test_windows: float) -> float:
    """One run alone: start-up, its steps, the learning-curve evaluations (every eval_steps and at its end, on
    eval_subset questions) and the test evaluation (``test_windows``: 0 for a tuning candidate)."""
    from qatune.study.calibrate import project_run_seconds

    points = math.ceil(steps / cfg.eval_steps) if cfg.eval_steps else 0
    return project_run_seconds(steps, s_per_step, points * curve_windows(cfg) if points else 0.0, test_windows,
                               s_per_window, RUN_OVERHEAD_S, cfg.grad_accum)


def curve_windows(cfg: TrainConfig) -> float:
    """Windows of one learning-curve evaluation: up to eval_subset questions of the validation data (a
    validation_share of the training articles' questions), else of the evaluation data."""
    window = (cfg.max_seq_length, cfg.doc_stride)
    if cfg.validation_data:
        pool = estimate_windows(cfg.validation_data, cfg.validation_split, cfg.validation_articles,
                                cfg.validation_questions, cfg.seed, "validation", *window)
    elif cfg.validation_share:
        pool = cfg.validation_share * estimate_windows(cfg.train_data, cfg.train_split, cfg.train_articles, None,
                                                       cfg.seed, "train", *window)
    elif cfg.eval_data:
        pool = estimate_windows(cfg.eval_data, cfg.eval_split, cfg.eval_articles, cfg.eval_questions, cfg.seed,
                                "eval", *window)
    else:
        pool = 0.0
    return min(pool, cfg.eval_subset * windows_per_question(*window)) if cfg.eval_subset else pool


def count_params(cfg: TrainConfig) -> dict:
    """Parameter counts of a run's model (from its config, no weights) and how far its LoRA rank reaches."""
    from qatune.methods import adapter_widths
    from qatune.model.load import meta_model_of, parameter_counts

    model = meta_model_of(cfg)
    counts = parameter_counts(model)
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return {**counts, "dense_params": counts["total_params"] - emb, **adapter_widths(model, _rank(cfg))}


def _rank(cfg) -> int | None:
    from qatune.methods import method

    m = method(cfg.strategy)
    return getattr(cfg, m.rank) if m.rank else None


def rank_note(widths: dict, rank: int) -> str:
    """A short note when ``rank`` reaches min(d_in, d_out) of adapted layers, else ''."""
    full = widths.get("lora_layers_at_full_rank") or 0
    if not full:
        return ""
    which = "all" if full == widths["lora_layers"] else f"{full} of {widths['lora_layers']}"
    return (f"r={rank} >= min(d_in, d_out) of {which} adapted layers (narrowest {widths['lora_min_width']}): "
            f"the update's rank cannot grow there")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def dry_run(study: Study, calibrate_here: bool = False, slots: int = 1, threads: int | None = None,
            runs_per_gpu: int = 1, gpus: int = 0) -> dict:
    """Every run's parameters, windows, steps and training compute; with ``calibrate_here``, measured seconds
    per step and projected wall times for ``slots`` runs at once. Returns ``{summary, header, rows, notes}``."""
    rows, total, run_notes, estimates = [], 0.0, [], []
    group_of = {run.id: g for g in study.groups for _, run in g.candidates}
    for k, r in enumerate(study.runs, 1):
        est = estimate(r)
        g = group_of.get(r.id)
        if g is None:
            total += est["train_pflop"]
        else:  # its share of the halving's steps; the last candidate brings the chosen values' runs at every seed
            share = planned_steps(len(g.candidates), g.schedule, study.eta) / len(g.candidates) / est["steps"]
            total += est["train_pflop"] * (share + (len(g.seeds) if r.id == g.candidates[-1][1].id else 0))
        estimates.append({"id": r.id, "arm": r.arm, "strategy": r.config.strategy, "point": r.point,
                          **{k: est[k] for k in ("trainable_params", "total_params", "steps", "train_pflop")}})
        point = ", ".join(f"{key}={v}" for key, v in r.point.items())
        run_notes.append(rank_note(est, _rank(r.config)) if _rank(r.config) is not None else "")
        point += " ‡" if run_notes[-1] else ""
        rows.append([k, r.id, r.arm, model_name(asdict(r.config)), r.config.strategy, point,
                     f"{est['trainable_params']:,}", f"{est['total_params']:,}", f"{est['trainable_percent']:.2f}",
                     f"{est['train_windows']:,.0f}", f"{est['steps']:,}", f"{est['train_pflop']:.2f}"])
    header = ["#", "run", "arm", "model", "strategy", "grid point", "trainable", "total", "%", "train windows",
              "steps", "train PFLOP"]
    summary = {"runs": len(study.runs), "total_pflop": total, "estimates": estimates}
    notes = [*(f"‡ {n}" for n in sorted({n for n in run_notes if n})),
             f"total training compute: {total:.2f} PFLOP (FLOPs per window counted on each model shape at the "
             f"typical padded width, x windows trained; windows estimated from the questions' lengths"
             + ("; tuning candidates at the halving's steps, and the chosen values' runs at every seed)"
                if study.groups else ")")]
    if calibrate_here:
        proj = project(study, slots, threads, runs_per_gpu if gpus else 1, "cuda" if gpus else "cpu")
        for row, p in zip(rows, proj["per_run"]):
            row += [f"{p['s_per_step']:.2f}", hours(p["projected_s"])]
        header += ["s/step", "projected"]
        where = f"{gpus} GPU(s) x {runs_per_gpu} runs per GPU" if gpus else f"{slots} worker(s) x {threads} CPU thread(s)"
        notes.append(f"projected on this machine ({where}): {proj['projected_hours']:.2f} h for the whole study "
                     f"({proj['serial_hours']:.2f} h of runs; each run = {RUN_OVERHEAD_S:.0f} s start-up + steps x "
                     f"measured s/step + learning-curve and test windows x measured s/window)")
        summary.update({k: proj[k] for k in ("projected_hours", "serial_hours", "slots", "threads",
                                             "runs_per_device", "device")})
        summary["per_run"] = [{"id": p["id"], "arm": p["arm"], "steps": p["steps"], "s_per_step": p["s_per_step"],
                               "projected_s": p["projected_s"], "final": p.get("final", False)}
                              for p in proj["per_run"]]
    if study.groups:
        notes += tuning_notes(study)
        summary["tuning"] = [{"configuration": g.id, "arm": g.arm, "candidates": len(g.candidates),
                              "rungs": g.schedule, "steps": planned_steps(len(g.candidates), g.schedule, study.eta),
                              "grid_steps": len(g.candidates) * g.schedule[-1], "final_seeds": len(g.seeds),
                              "tuning_seed": g.tuning_seed}
                             for g in study.groups]
    return {"summary": summary, "header": header, "rows": rows, "notes": notes}


def tuning_notes(study: Study) -> list[str]:
    """What tuning will train: candidates per configuration, the rungs, and the steps halving saves over a grid
    (configurations of one arm with the same rungs share a line). The table above lists the candidates (at the
    tuning seed); each chosen value then trains afresh with every seed."""
    alike: dict[tuple, list] = {}
    for g in study.groups:
        alike.setdefault((g.arm, len(g.candidates), tuple(g.schedule), len(g.seeds), g.tuning_seed), []).append(g)
    out = []
    for (arm, candidates, schedule, seeds, seed), groups in alike.items():
        steps = planned_steps(candidates, list(schedule), study.eta) * len(groups)
        grid = candidates * schedule[-1] * len(groups)
        where = (", ".join(f"{k}={v}" for k, v in groups[0].point.items()) or "its one configuration"
                 if len(groups) == 1 else f"{len(groups)} configurations")
        each = " each" if len(groups) > 1 else ""
        out.append(f"tuning {arm} at {where}: {candidates} candidates{each} at seed {seed} ({study.method}, eta "
                   f"{study.eta}), rungs at steps {list(schedule)}, chosen at the first rung that leaves one: "
                   f"{steps:,} candidate steps instead of {grid:,} for the grid ({steps / grid:.0%}); then the "
                   f"chosen value with {seeds} seed(s), each a fresh final run")
    return out
