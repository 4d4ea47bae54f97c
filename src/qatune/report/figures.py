"""The report's figures (PNG, written beside report.md): rank sweep, data volume, learning curves, Pareto fronts,
the factorial, the expected maximum over tuning trials, and what each model costs to run."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from qatune.methods import REFERENCE, method
from qatune.report.analysis import Analysis
from qatune.report.convergence import IMPROVING
from qatune.report.stats import pareto_front


# ---------------------------------------------------------------------------------------------- figures
def _save(fig, study_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(study_dir / name, dpi=110)
    plt.close(fig)
    return name


def figures(study_dir: Path, a: Analysis) -> list[str]:
    """The study's figures (PNG files in ``study_dir``), each drawn when the study has what it shows."""
    import matplotlib

    matplotlib.use("Agg")
    top = max(c.volume for c in a.configs)
    drawn = [_rank_sweep(study_dir, a, top), _data_volume(study_dir, a), _learning_curves(study_dir, a, top),
             _pareto(study_dir, a, top), _factorial(study_dir, a), _expected_max(study_dir, a)]
    for stale in set(FIGURES) - set(drawn):  # an earlier report's, of what the study no longer shows
        (study_dir / stale).unlink(missing_ok=True)
    return [name for name in drawn if name]


FIGURES = ("rank_sweep.png", "data_volume.png", "learning_curves.png", "pareto.png", "factorial.png",
           "expected_max.png")


def _factorial(study_dir: Path, a: Analysis) -> str | None:
    """F1 of each model with each fine-tuning method, the reference first, one line per model (lines that are not
    parallel: interaction)."""
    if not a.factorial:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(a.factorial), figsize=(max(5, 1.6 * len(a.factorial[0]["methods"]))
                                                           * len(a.factorial), 4), squeeze=False)
    for ax, f in zip(axes[0], a.factorial):
        xs = range(len(f["methods"]))
        for m in f["models"]:
            ax.plot(xs, [f["f1"][(m, s)] for s in f["methods"]], marker="o", label=m)
        ax.set_xticks(xs, [method(s).label for s in f["methods"]])
        _axes(ax, None, "F1 (test questions)", f"{int(f['volume'])} training questions", legend=8)
    return _save(fig, study_dir, "factorial.png")


def _expected_max(study_dir: Path, a: Analysis) -> str | None:
    """Expected best validation F1 per arm against the configurations tried, at one budget, with its SD band
    (Dodge et al. 2019)."""
    from qatune.report.tuningsummary import expected_max_curves

    curves = expected_max_curves(a.tuning)
    if not curves:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in sorted(curves, key=lambda c: c["arm"]):
        n = [p["trials"] for p in c["curve"]]
        mean, sd = np.array([p["expected_f1"] for p in c["curve"]]), np.array([p["sd"] for p in c["curve"]])
        line, = ax.plot(n, mean, marker="o", label=f"{c['arm']} (at step {c['budget_steps']})")
        ax.fill_between(n, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    _axes(ax, "configurations tried", "expected best validation F1 (± SD)",
          "Expected maximum validation F1 at the first rung's budget", legend=8)
    return _save(fig, study_dir, "expected_max.png")


def _axes(ax, xlabel: str | None, ylabel: str | None, title: str | None, legend: int | None = None) -> None:
    """Labels, a light grid and (with a font size) the legend: the same finish for every figure."""
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)


def _err(iv) -> list[list[float]]:
    return [[iv.estimate - iv.ci_low], [iv.ci_high - iv.estimate]]


def _rank_sweep(study_dir: Path, a: Analysis, top: float) -> str | None:
    """F1/EM vs rank at the largest volume, one line per arm (of a method with a rank) and setting; the reference
    method (full fine-tuning) as a band."""
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for c in a.configs:
        if c.volume == top and c.rank is not None:
            rest = " ".join(str(v) for k, v in c.point.items() if k not in (c.method.rank, "train_questions"))
            lines[f"{c.arm} {rest}".strip()].append(c)
    if not lines:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in [(axes[0], "f1", "F1"), (axes[1], "em", "Exact match")]:
        for c in a.configs:
            if c.volume == top and c.strategy == REFERENCE:
                iv = a.intervals[c.id][metric]
                ax.axhspan(iv.ci_low, iv.ci_high, alpha=0.15, color="grey")
                ax.axhline(iv.estimate, color="grey", linestyle="--", label=f"{c.label} ({c.method.label})")
        for name, cs in sorted(lines.items()):
            cs.sort(key=lambda c: c.rank)
            ivs = [a.intervals[c.id][metric] for c in cs]
            ax.errorbar([c.rank for c in cs], [iv.estimate for iv in ivs],
                        yerr=np.hstack([_err(iv) for iv in ivs]), marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ranks = sorted({c.rank for cs in lines.values() for c in cs})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        _axes(ax, "rank", title, f"{title} vs rank ({int(top)} questions, 95% intervals)")
    axes[0].legend(fontsize=8)
    return _save(fig, study_dir, "rank_sweep.png")


def _data_volume(study_dir: Path, a: Analysis) -> str | None:
    """F1 vs training-data volume per configuration (label without the volume)."""
    import matplotlib.pyplot as plt

    by_label = defaultdict(list)
    for c in a.configs:
        by_label[c.label].append(c)
    if not any(len(cs) > 1 for cs in by_label.values()):
        return None
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for label, cs in sorted(by_label.items()):
        cs.sort(key=lambda c: c.volume)
        ivs = [a.intervals[c.id]["f1"] for c in cs]
        ax.errorbar([c.volume for c in cs], [iv.estimate for iv in ivs], yerr=np.hstack([_err(iv) for iv in ivs]),
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    volumes = sorted({c.volume for c in a.configs})
    ax.set_xticks(volumes, [f"{int(v):,}" for v in volumes])
    ax.minorticks_off()
    _axes(ax, "training questions", "F1", "F1 vs training-data volume (95% intervals)", legend=7)
    return _save(fig, study_dir, "data_volume.png")


def _learning_curves(study_dir: Path, a: Analysis, top: float) -> str | None:
    """F1 vs optimizer steps and vs counted training FLOPs (runs that record them) for the headline
    configurations, each seed a line: arms of unequal cost per step compare at equal compute on the right."""
    import matplotlib.pyplot as plt

    shown = {id(c): c for comp in a.comparisons for c in (comp["a"], comp["b"])} or \
        {id(c): c for c in a.configs if c.volume == top}
    curved = [c for c in shown.values() if any(r.get("curve") for r in c.runs)]
    if not curved:
        return None
    counted = any(r.get("curve") and all("flops" in p for p in r["curve"]) for c in curved for r in c.runs)
    fig, axes = plt.subplots(1, 2 if counted else 1, figsize=(12 if counted else 8, 4.4), sharey=True, squeeze=False)
    by_step, by_flops = axes[0][0], axes[0][-1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, c in enumerate(sorted(curved, key=lambda c: (c.volume, c.label))):
        for j, r in enumerate(c.runs):
            pts = r.get("curve") or []
            if pts:
                e = a.endings.get(r["id"])
                flag = " (improving)" if e and e.state == IMPROVING else ""
                style = {"marker": ".", "color": colors[k % len(colors)], "alpha": 0.9 if j == 0 else 0.5}
                by_step.plot([p["step"] for p in pts], [p["f1"] for p in pts],
                             label=f"{c.label}, {int(c.volume)} q{flag}" if j == 0 else None, **style)
                if counted and all("flops" in p for p in pts):
                    by_flops.plot([p["flops"] / 1e15 for p in pts], [p["f1"] for p in pts], **style)
    _axes(by_step, "optimizer steps", "F1 (learning-curve questions)", "Learning curves of the headline configurations",
          legend=7)
    if counted:
        _axes(by_flops, "counted training PFLOP", None, "The same against compute")
    return _save(fig, study_dir, "learning_curves.png")


def _pareto(study_dir: Path, a: Analysis, top: float) -> str:
    """F1 vs trainable parameters and vs training compute (counted FLOPs; wall time for older runs)."""
    import matplotlib.pyplot as plt

    at_top = [c for c in a.configs if c.volume == top]
    counted = all(r["costs"].get("train_flops") for c in at_top for r in c.runs)
    cost_key, cost_label = (("train_flops", "training compute (counted PFLOP)") if counted
                            else ("train_s", "training wall time (s)"))
    scale = 1e15 if counted else 1.0
    pts = [(c.label, a.intervals[c.id]["f1"].estimate, np.mean([r["costs"]["trainable_params"] for r in c.runs]),
            np.mean([r["costs"][cost_key] for r in c.runs]) / scale) for c in at_top]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k, xlabel in [(axes[0], 2, "trainable parameters"), (axes[1], 3, cost_label)]:
        scatter_with_front(ax, [p[k] for p in pts], [p[1] for p in pts], [p[0] for p in pts], xlabel, log=True)
    axes[0].set_title(f"F1 vs trainable parameters ({int(top)} questions)")
    axes[1].set_title(f"F1 vs {cost_label.split(' (')[0]}")
    return _save(fig, study_dir, "pareto.png")


def scatter_with_front(ax, xs: list[float], ys: list[float], labels: list[str], xlabel: str, colors=None,
                       log: bool = False) -> None:
    """Points labelled on ``ax`` (F1 against a cost) with their Pareto front: the cheapest point at each F1."""
    xs_, ys_ = np.array(xs, dtype=float), np.array(ys, dtype=float)
    ax.scatter(xs_, ys_, c=colors)
    for x, y, text in zip(xs_, ys_, labels):
        ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(list(xs_), list(ys_))
    ax.plot(xs_[front], ys_[front], "r--", label="Pareto front")
    if log:
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.1)  # room for the labels of the outermost points
    _axes(ax, xlabel, "F1", None, legend=8)


def cost_figure(runs: list[dict], study_dir: Path, label) -> str:
    """``inference_cost.png``: F1 against latency and against size, fp32 and int8 points, Pareto fronts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qatune.report.costtable import measured

    points = []  # (name, F1, p50 ms at 1 thread, MiB)
    for r in measured(runs):
        c = r["costs"]["inference"]
        points.append((f"{label(r)} fp32", r["metrics"]["f1"], c["torch"]["p50_ms_1_thread"],
                       c["merged_size_bytes"] / 2**20))
        points.append((f"{label(r)} int8", c["int8"]["f1"], c["int8"]["p50_ms_1_thread"], c["int8_size_bytes"] / 2**20))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ["tab:blue" if p[0].endswith("fp32") else "tab:orange" for p in points]
    for ax, k, xlabel in [(axes[0], 2, "latency per question, p50 ms (batch 1, 1 thread)"),
                          (axes[1], 3, "model size on disk (MiB)")]:
        scatter_with_front(ax, [p[k] for p in points], [p[1] for p in points], [p[0] for p in points], xlabel, colors)
    axes[0].set_title("F1 vs latency (blue fp32 PyTorch, orange int8 ONNX)")
    axes[1].set_title("F1 vs size")
    return _save(fig, study_dir, "inference_cost.png")
