"""Reports: a study's SQLite results -> report.md with tables, PNG figures, statistics and findings.

Every number in the text comes from the results: means over seeds with t-based 95% intervals, a paired
bootstrap over questions between the headline arms, and a within-question permutation test of "rank makes
no difference" per alpha policy. Findings are sentences generated from those numbers, each carrying its
uncertainty; a claim is only made when its interval or p-value supports it. Safe to re-run at any time.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from qatune.metrics import squad_v1_scores
from qatune.store import connect, rows

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (nan when there is a single value)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    df = len(x) - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 10000, seed: int = 0) -> dict:
    """Difference of means a - b over paired questions: 95% percentile interval and a two-sided p-value."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a, float) - np.asarray(b, float)
    idx = rng.integers(0, len(d), size=(n, len(d)))
    boots = d[idx].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    p = min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean()) + 1 / n)
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "p": float(p), "questions": len(d)}


def rank_permutation_test(scores: np.ndarray, n: int = 2000, seed: int = 0) -> float:
    """p-value of "no column differs": permute the columns (ranks) within each row (question); statistic is
    the range of the column means."""
    rng = np.random.default_rng(seed)
    observed = np.ptp(scores.mean(axis=0))
    count = 0
    for _ in range(n):
        perm = np.argsort(rng.random(scores.shape), axis=1)
        shuffled = np.take_along_axis(scores, perm, axis=1)
        count += np.ptp(shuffled.mean(axis=0)) >= observed - 1e-12
    return (count + 1) / (n + 1)


def _config_label(row: dict) -> str:
    c = row["config"]
    if c["strategy"] == "lora":
        return f"{row['arm']} r={c['lora_rank']} {c['alpha_policy']}"
    return row["arm"]


SLOW_FRACTION = 0.8  # a run below this share of its configuration's isolated FLOP/s is marked
LOADED_CORES = 0.25  # other processes using this many cores on average while a run trained: "machine loaded"


def _shape(row: dict) -> tuple:
    """What sets a run's speed (not its data volume or seed): runs of one shape should train at one FLOP/s."""
    c = row["config"]
    return (c["model"], c["strategy"], c.get("lora_rank") if c["strategy"] == "lora" else None, c["max_seq_length"],
            c["batch_size"], row["costs"].get("precision"), c.get("pad_to_max_length"), c.get("compile"))


def cost_marks(runs: list[dict]) -> dict[str, str]:
    """Runs that trained markedly slower (counted FLOP/s) than their shape's runs that had the machine to
    themselves, with the evidence recorded: other runs on the same device, or other load on the machine."""
    by_shape: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if r["costs"].get("train_flop_per_s"):
            by_shape[_shape(r)].append(r)
    marks = {}
    for rs in by_shape.values():
        alone = [r for r in rs if not r["costs"].get("shared_runs") and
                 (r["costs"].get("others_cores") or 0) < LOADED_CORES]
        reference = max(r["costs"]["train_flop_per_s"] for r in (alone or rs))
        for r in rs:
            c = r["costs"]
            if c["train_flop_per_s"] >= SLOW_FRACTION * reference:
                continue
            why = []
            if c.get("shared_runs"):
                why.append(f"shared device with {c['shared_runs']} run(s)")
            if (c.get("others_cores") or 0) >= LOADED_CORES:
                why.append(f"machine loaded ({c['others_cores']:.1f} cores busy elsewhere)")
            marks[r["id"]] = (", ".join(why) or "slower than its configuration alone") + \
                f": {c['train_flop_per_s'] / reference:.0%} of the isolated rate"
    return marks


def _pflop(rs: list[dict]) -> str:
    values = [r["costs"].get("train_flops") for r in rs]
    return f"{np.mean(values) / 1e15:.3f}" if all(values) else "n/a"


def _marked(rs: list[dict], marks: dict[str, str]) -> str:
    n = sum(r["id"] in marks for r in rs)
    return f" (†{n} slowed)" if n else ""


def _cost_section(runs: list[dict], marks: dict[str, str]) -> list[str]:
    """Every run's costs: counted FLOPs (load-independent), CPU and device time, and wall time with its marks."""
    lines = ["", "## Costs per run", "",
             "Training compute is counted (FlopCounterMode on the run's model shape, times the batches it trained), "
             "so it does not depend on the machine's load; wall time does. A run whose FLOP/s fell below "
             f"{SLOW_FRACTION:.0%} of its configuration's rate when running alone is marked †, with the evidence.",
             "", "| run | configuration | data | seed | train PFLOP | train s | GFLOP/s | CPU s | device s | "
             "other load (cores) | runs sharing its device | mark |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        c = r["costs"]
        num = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| `{r['id']}` | {_config_label(r)} | {int(_volume(r))} | {r['config']['seed']} | "
                     f"{num(c.get('train_flops') and c['train_flops'] / 1e15, '.3f')} | {c['train_s']:.0f} | "
                     f"{num(c.get('train_flop_per_s') and c['train_flop_per_s'] / 1e9, '.1f')} | "
                     f"{num(c.get('process_cpu_s'), '.0f')} | {num(c.get('device_s'), '.1f')} | "
                     f"{num(c.get('others_cores'), '.2f')} | {c.get('shared_runs', 'n/a')} | "
                     f"{'† ' + marks[r['id']] if r['id'] in marks else ''} |")
    return lines


def _volume(row: dict) -> float:
    return float(row["costs"]["train_questions"])


def _fmt(mean: float, ci: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" if math.isnan(ci) else f"{mean:.{digits}f} ± {ci:.{digits}f}"


class _Refs:
    """Reference answers per evaluation set, loaded once."""

    def __init__(self):
        self.cache: dict[tuple, dict] = {}

    def __call__(self, cfg: dict) -> dict[str, list[str]]:
        from qatune.train import load_split

        key = (cfg["eval_data"], cfg["eval_split"], cfg["eval_articles"], json.dumps(cfg["eval_questions"]),
               cfg["seed"] if cfg["eval_questions"] is not None else None)
        if key not in self.cache:
            data = load_split(cfg["eval_data"], cfg["eval_split"], cfg["eval_articles"], cfg["eval_questions"],
                              cfg["seed"], cfg["repair_answers"])
            self.cache[key] = data.references()
        return self.cache[key]


def per_question(runs: list[dict], refs: _Refs) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Question ids and per-question EM/F1 (x100), averaged over the given runs (seeds of one config)."""
    ems, f1s, ids = [], [], None
    for r in runs:
        preds = json.loads((Path(r["output_dir"]) / "predictions.json").read_text())
        scores = squad_v1_scores(refs(r["config"]), preds)
        if ids is None:
            ids = sorted(scores)
        ems.append([scores[q][0] for q in ids])
        f1s.append([scores[q][1] for q in ids])
    return ids, 100 * np.mean(ems, axis=0), 100 * np.mean(f1s, axis=0)


def write_report(study_dir: str | Path, expected: int | None = None) -> Path:
    """Write report.md and figures into ``study_dir``; works on a partly finished study."""
    study_dir = Path(study_dir)
    if not (study_dir / "study.sqlite").exists():
        raise FileNotFoundError(f"{study_dir}: no study.sqlite here (run `qatune study FILE` first, or pass the "
                                f"study's directory)")
    db = connect(study_dir)
    all_rows = rows(db)
    db.close()
    done = [r for r in all_rows if r["status"] == "finished" and r["metrics"]]
    lines = [f"# Study report: {study_dir.name}", ""]
    status = defaultdict(int)
    for r in all_rows:
        status[r["status"]] += 1
    lines.append(f"Runs: {len(all_rows)} registered — " + ", ".join(f"{v} {k}" for k, v in sorted(status.items())))
    missing = [r for r in all_rows if r["status"] != "finished"]
    if missing:
        lines += ["", "**Incomplete study** — these runs have no results yet, so every figure and statistic below "
                  "covers only the finished ones:", ""]
        lines += [f"- `{r['id']}` {_config_label(r)}, data {r['point'].get('train_questions', 'all')}, seed "
                  f"{r['config']['seed']}: {r['status']}" + (f" ({r['error'].splitlines()[0]})" if r["error"] else "")
                  for r in missing]
    if not done:
        lines += ["", "No finished runs yet."]
        out = study_dir / "report.md"
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return out

    metric_key = "exact_match" if "exact_match" in done[0]["metrics"] else "exact"
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in done:
        groups[(_config_label(r), _volume(r))].append(r)
    top_volume = max(v for _, v in groups)
    headline_rows = {label: rs for (label, v), rs in groups.items() if v == top_volume}

    lines += ["", f"## Headline table ({int(top_volume)} training questions)", "",
              "EM and F1 on the evaluation set: mean ± 95% CI over seeds (t interval; no interval with one seed).", "",
              "| configuration | seeds | EM | F1 | trainable params | total params | trainable % | train PFLOP "
              "| train time (s) | windows/s | peak RSS (MB) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    marks = cost_marks(done)
    summary = {}
    for label, rs in sorted(headline_rows.items(), key=lambda kv: -np.mean([r["metrics"]["f1"] for r in kv[1]])):
        em = mean_ci([r["metrics"][metric_key] for r in rs])
        f1 = mean_ci([r["metrics"]["f1"] for r in rs])
        c = rs[0]["costs"]
        summary[label] = {"em": em, "f1": f1, "runs": rs}
        lines.append(f"| {label} | {len(rs)} | {_fmt(*em)} | {_fmt(*f1)} | {c['trainable_params']:,} | "
                     f"{c['total_params']:,} | {c['trainable_percent']:.2f} | {_pflop(rs)} | "
                     f"{np.mean([r['costs']['train_s'] for r in rs]):.0f}{_marked(rs, marks)} | "
                     f"{np.mean([r['costs']['train_windows_per_s'] for r in rs]):.1f} | "
                     f"{max(r['costs']['peak_rss_mb'] for r in rs):.0f} |")

    lines += _cost_section(done, marks)
    from qatune.cost import report_section

    inference_lines, inference_figures = report_section(done, study_dir, _config_label)
    lines += inference_lines
    figures = _figures(study_dir, groups, top_volume) + inference_figures
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]

    refs = _Refs()
    findings, stats_lines = [], []
    full_labels = [lab for lab, s in summary.items() if s["runs"][0]["config"]["strategy"] == "full"]
    lora_labels = [lab for lab, s in summary.items() if s["runs"][0]["config"]["strategy"] == "lora"]
    if full_labels and lora_labels:
        a, b = full_labels[0], max(lora_labels, key=lambda lab: summary[lab]["f1"][0])
        ids_a, em_a, f1_a = per_question(summary[a]["runs"], refs)
        ids_b, em_b, f1_b = per_question(summary[b]["runs"], refs)
        if ids_a == ids_b:
            bf, be = paired_bootstrap(f1_a, f1_b), paired_bootstrap(em_a, em_b)
            stats_lines += [f"Paired bootstrap over {bf['questions']} questions (10,000 resamples), **{a}** minus "
                            f"**{b}** (the best LoRA configuration):", "",
                            f"- F1: {bf['diff']:+.2f} (95% CI {bf['lo']:+.2f} to {bf['hi']:+.2f}), p = {bf['p']:.4f}",
                            f"- EM: {be['diff']:+.2f} (95% CI {be['lo']:+.2f} to {be['hi']:+.2f}), p = {be['p']:.4f}"]
            winner, loser = (a, b) if bf["diff"] > 0 else (b, a)
            if bf["lo"] > 0 or bf["hi"] < 0:
                findings.append(f"{winner} beats {loser} by {abs(bf['diff']):.2f} F1 points (95% CI "
                                f"{min(abs(bf['lo']), abs(bf['hi'])):.2f} to {max(abs(bf['lo']), abs(bf['hi'])):.2f}, "
                                f"paired bootstrap p = {bf['p']:.4f}) at {int(top_volume)} training questions, with "
                                f"{summary[winner]['runs'][0]['costs']['trainable_percent']:.2f}% vs "
                                f"{summary[loser]['runs'][0]['costs']['trainable_percent']:.2f}% of weights trained.")
            else:
                findings.append(f"{a} and {b} are not distinguishable at {int(top_volume)} training questions: F1 "
                                f"difference {bf['diff']:+.2f} (95% CI {bf['lo']:+.2f} to {bf['hi']:+.2f}, p = "
                                f"{bf['p']:.3f}).")
    by_policy: dict[tuple[str, str], dict[int, list[dict]]] = defaultdict(dict)
    for s in summary.values():
        c = s["runs"][0]["config"]
        if c["strategy"] == "lora":
            by_policy[(s["runs"][0]["arm"], c["alpha_policy"])][c["lora_rank"]] = s["runs"]
    for (arm, policy), by_rank in sorted(by_policy.items()):
        if len(by_rank) < 2:
            continue
        ranks = sorted(by_rank)
        cols = [per_question(by_rank[r], refs) for r in ranks]
        if any(c[0] != cols[0][0] for c in cols):
            continue
        f1 = np.stack([c[2] for c in cols], axis=1)
        p = rank_permutation_test(f1)
        means = f1.mean(axis=0)
        lo_r, hi_r = ranks[int(np.argmin(means))], ranks[int(np.argmax(means))]
        stats_lines.append(f"- {arm}, alpha policy {policy}: F1 by rank "
                           + ", ".join(f"r={r}: {m:.2f}" for r, m in zip(ranks, means))
                           + f"; permutation test of 'rank makes no difference' p = {p:.4f}")
        verdict = ("rank matters" if p < 0.05 else "no detectable effect of rank")
        findings.append(f"Under the {policy} alpha policy ({arm}), F1 goes from {means.min():.2f} (r={lo_r}) to "
                        f"{means.max():.2f} (r={hi_r}) across ranks {ranks[0]}–{ranks[-1]}; permutation test p = "
                        f"{p:.4f}: {verdict} at the 5% level.")
    volumes = sorted({v for _, v in groups})
    if full_labels and lora_labels and len(volumes) >= 2:
        gaps = []
        for v in volumes:
            fa = [r["metrics"]["f1"] for r in groups.get((full_labels[0], v), [])]
            lora_here = [(lab, rs) for (lab, vv), rs in groups.items() if vv == v and lab in lora_labels]
            if fa and lora_here:
                best_lab, best_rs = max(lora_here, key=lambda x: np.mean([r["metrics"]["f1"] for r in x[1]]))
                gaps.append((v, np.mean(fa) - np.mean([r["metrics"]["f1"] for r in best_rs]), best_lab))
        if len(gaps) >= 2:
            findings.append("The F1 gap between " + full_labels[0] + " and the best LoRA configuration moves "
                            + " → ".join(f"{g:+.2f} at {int(v)} questions ({lab})" for v, g, lab in gaps)
                            + " (differences of seed means; see the data-volume figure for intervals).")
    if stats_lines:
        lines += ["", "## Statistics", ""] + stats_lines
    lines += ["", "## Findings", ""]
    lines += [f"- {f}" for f in findings] or ["- Not enough finished runs for a comparison yet."]
    if max(len(s["runs"]) for s in summary.values()) < 2:
        lines += ["- One training seed per configuration: the bootstrap and permutation tests cover the sampling of "
                  "evaluation questions only, not run-to-run variation; add seeds to the grid for that."]
    if missing:
        lines += [f"- Based on {len(done)} of {len(all_rows)} runs; the missing ones may change these numbers."]
    out = study_dir / "report.md"
    tmp = out.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def _figures(study_dir: Path, groups: dict, top_volume: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    stats = {key: (mean_ci([r["metrics"]["f1"] for r in rs]),
                   mean_ci([r["metrics"].get("exact_match", r["metrics"].get("exact")) for r in rs]), rs)
             for key, rs in groups.items()}

    # F1/EM vs LoRA rank, one line per alpha policy, full fine-tuning as a band
    lora = defaultdict(list)
    for (_label, v), (f1, em, rs) in stats.items():
        c = rs[0]["config"]
        if v == top_volume and c["strategy"] == "lora":
            lora[(rs[0]["arm"], c["alpha_policy"])].append((c["lora_rank"], f1, em))
    if lora:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, which, title in [(axes[0], 1, "F1"), (axes[1], 2, "Exact match")]:
            for (label, v), (f1, em, rs) in stats.items():
                if v == top_volume and rs[0]["config"]["strategy"] == "full":
                    m, ci = (f1, em)[which - 1]
                    ax.axhspan(m - (0 if math.isnan(ci) else ci), m + (0 if math.isnan(ci) else ci), alpha=0.2,
                               color="grey")
                    ax.axhline(m, color="grey", linestyle="--", label=f"{label} (full FT)")
            for (arm, policy), pts in sorted(lora.items()):
                pts.sort()
                xs = [p[0] for p in pts]
                ms = [p[which][0] for p in pts]
                cis = [0 if math.isnan(p[which][1]) else p[which][1] for p in pts]
                ax.errorbar(xs, ms, yerr=cis, marker="o", capsize=3, label=f"{arm}: {policy}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("LoRA rank")
            ax.set_ylabel(title)
            ax.set_title(f"{title} vs LoRA rank ({int(top_volume)} questions)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(study_dir / "rank_sweep.png", dpi=120)
        plt.close(fig)
        names.append("rank_sweep.png")

    # F1 vs training-data volume per configuration
    by_label = defaultdict(list)
    for (label, v), (f1, _em, _rs) in stats.items():
        by_label[label].append((v, f1))
    if any(len(p) > 1 for p in by_label.values()):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, pts in sorted(by_label.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                        yerr=[0 if math.isnan(p[1][1]) else p[1][1] for p in pts], marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("training questions")
        ax.set_ylabel("F1")
        ax.set_title("F1 vs training-data volume")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(study_dir / "data_volume.png", dpi=120)
        plt.close(fig)
        names.append("data_volume.png")

    # Pareto: F1 vs trainable parameters and vs training time
    # The cost axis is the counted training FLOPs: independent of what else the machine was doing. Studies
    # recorded before FLOPs were counted fall back to wall time, and say so.
    counted = all(r["costs"].get("train_flops") for (_l, v), (_f, _e, rs) in stats.items() if v == top_volume
                  for r in rs)
    cost_key, cost_label, cost_title = (("train_flops", "training compute (counted PFLOP)", "training compute")
                                        if counted else ("train_s", "training wall time (s)", "training time"))
    scale = 1e15 if counted else 1.0
    pts = [(label, f1[0], np.mean([r["costs"]["trainable_params"] for r in rs]),
            np.mean([r["costs"][cost_key] for r in rs]) / scale) for (label, v), (f1, em, rs) in stats.items()
           if v == top_volume]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k, xlabel in [(axes[0], 2, "trainable parameters"), (axes[1], 3, cost_label)]:
        xs = np.array([p[k] for p in pts])
        ys = np.array([p[1] for p in pts])
        ax.scatter(xs, ys)
        for p in pts:
            ax.annotate(p[0], (p[k], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        order = np.argsort(xs)
        front, best = [], -np.inf
        for i in order:
            if ys[i] > best:
                front.append(i)
                best = ys[i]
        ax.plot(xs[front], ys[front], "r--", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("F1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("F1 vs trainable parameters")
    axes[1].set_title(f"F1 vs {cost_title}")
    fig.tight_layout()
    fig.savefig(study_dir / "pareto.png", dpi=120)
    plt.close(fig)
    names.append("pareto.png")
    return names
