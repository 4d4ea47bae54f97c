"""Study throughput: the same study run serially and with N worker processes (and K runs per GPU on GPUs).

Writes a study of short real runs (MiniLM-L6 full fine-tuning + LoRA at three ranks, two data volumes:
8 runs by default) on the article split of SQuAD v1.1 dev, runs it with `qatune study` once per launcher
setting in a fresh study directory, and prints wall time, combined training windows/s (windows trained by
all runs / study wall time) and the ratio against the serial run, measured in this one invocation. Each
setting's per-run metrics are compared with the serial run's.

    python benchmarks/bench_study.py [--workers 2] [--runs-per-gpu 1 2 4 8] [--steps 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

STUDY = """
[study]
name = "bench"

[defaults]
train_data = "{data}"
train_articles = "1-36"
eval_data = "{data}"
eval_articles = "37-48"
eval_questions = {eval_questions}
max_seq_length = {seq}
doc_stride = {stride}
max_steps = {steps}
batch_size = {batch}
save_steps = 1000
precision = "{precision}"

[[arms]]
name = "full"
model = "{model}"
strategy = "full"
learning_rate = 1.5e-4

[[arms]]
name = "lora"
model = "{lora_model}"
strategy = "lora"
learning_rate = 5e-4
lora_alpha = 32

[grid]
lora_rank = [8, 32, 128]
alpha_policy = ["rslora"]
train_questions = [400, 800]
seed = [1]
"""


def run_setting(study: Path, directory: Path, args: list[str]) -> dict:
    """One `qatune study` invocation; returns its wall time and every run's record."""
    cmd = [sys.executable, "-m", "qatune.cli", "study", str(study), "--dir", str(directory), "--json", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"study failed ({' '.join(args)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    db = sqlite3.connect(directory / "study.sqlite")
    ids = [r[0] for r in db.execute("SELECT id FROM runs WHERE status='finished' ORDER BY ord")]
    db.close()
    records = {rid: json.loads((directory / "runs" / rid / "run.json").read_text()) for rid in ids}
    windows = sum(r["timing"]["steps_run"] * r["config"]["batch_size"] for r in records.values())
    return {"args": args, "wall_s": wall, "runs": len(records), "windows": windows,
            "windows_per_s": windows / wall, "records": records}


def metric_diff(a: dict, b: dict) -> float:
    """Largest |difference| of EM or F1 between the same runs of two settings."""
    return max(abs(a[rid]["metrics"][k] - b[rid]["metrics"][k]) for rid in a for k in ("exact_match", "f1"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/squad/dev-v1.1.json")
    ap.add_argument("--model", default="minilm-l6", help="the model of both arms (full FT and LoRA)")
    ap.add_argument("--seed-mix", action="store_true",
                    help="the seed study's mix instead: MobileBERT-size full FT + DistilBERT-size LoRA (random weights)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to compare with serial")
    ap.add_argument("--runs-per-gpu", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU only")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--eval-questions", type=int, default=200)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json")
    args = ap.parse_args()
    data = Path(args.data).resolve()
    if not data.exists():
        print(f"error: {data} not found (real SQuAD data; see ../shared/data/squad/README.md)", file=sys.stderr)
        return 2
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = tmp / "bench.toml"
        full_model = lora_model = args.model
        if args.seed_mix:
            from bench_run import random_model

            full_model, lora_model = random_model("mobilebert", tmp), random_model("distilbert", tmp)
        study.write_text(STUDY.format(data=data, model=full_model, lora_model=lora_model, seq=args.max_seq_length,
                                      stride=args.max_seq_length // 3, steps=args.steps, batch=args.batch_size,
                                      eval_questions=args.eval_questions, precision=args.precision))
        # Every setting starts from an empty study directory (tokenisation included, as in a real study).
        settings = [("serial: 1 worker", ["--workers", "1"])]
        if gpus:
            settings += [(f"{gpus} GPU(s) x {k} runs per GPU", ["--runs-per-gpu", str(k)])
                         for k in args.runs_per_gpu if k > 1 or gpus > 1]
        else:
            settings += [(f"{n} workers x {max(1, cores // n)} threads", ["--workers", str(n)])
                         for n in args.workers if n > 1]
        results = []
        for name, extra in settings:
            directory = tmp / name.split(":")[0].replace(" ", "_")
            r = run_setting(study, directory, extra)
            r["name"] = name
            results.append(r)
            print(f"  {name}: {r['wall_s']:.1f} s", flush=True)
    base = results[0]
    device = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"{cores}-core CPU"
    models = "MobileBERT-size full + DistilBERT-size LoRA" if args.seed_mix else args.model
    print(f"\nStudy throughput, {base['runs']} runs of {models} ({args.steps} steps x batch {args.batch_size}, "
          f"seq {args.max_seq_length}, eval {args.eval_questions} questions each), {device}\n")
    lines = []
    for r in results:
        diff = metric_diff(base["records"], r["records"])
        lines.append([r["name"], f"{r['wall_s']:.1f}", f"{r['windows_per_s']:.1f}",
                      f"{base['wall_s'] / r['wall_s']:.2f}x", "identical" if diff == 0 else f"max |d| {diff:.2f}"])
    markdown_table(["launcher setting", "study wall s", "combined train windows/s", "speed-up", "EM/F1 vs serial"],
                   lines)
    print("\nCombined windows/s = windows trained by all runs / study wall time (process start, setup and "
          "evaluation included). Metrics differ only where the threads per run differ (float reduction order).")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "records"} |
                                               {"metrics": {i: x["metrics"] for i, x in r["records"].items()}}
                                               for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
