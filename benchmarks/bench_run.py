"""Single-run training throughput of the seed study's shapes, through `qatune train` itself.

Trains MiniLM-L6 (real weights), a MobileBERT-sized model with full fine-tuning and a DistilBERT-sized model
with LoRA r=32 and r=1024 (random weights from `MobileBertConfig()` / `DistilBertConfig()`, the real uncased
vocab) on real SQuAD v1.1 windows, each in a fresh process, and prints training windows/s from each run's
run.json. `--src OLD_TREE/src` runs the same commands with another qatune source tree first (e.g. a git
worktree of an earlier commit), so before/after ratios come from one invocation.

    python benchmarks/bench_run.py [--steps 30] [--batch-size 32] [--precision bf16] [--src ../old/src] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import markdown_table  # noqa: E402

SHAPES = [  # (label, model, strategy, extra train flags)
    ("MiniLM-L6 full (real weights)", "minilm-l6", "full", []),
    ("MobileBERT-size full", "mobilebert", "full", []),
    ("DistilBERT-size LoRA r=32", "distilbert", "lora", ["--lora-rank", "32", "--alpha-policy", "rslora"]),
    ("DistilBERT-size LoRA r=1024", "distilbert", "lora", ["--lora-rank", "1024", "--alpha-policy", "rslora"]),
]


def random_model(kind: str, directory: Path) -> str:
    """A full-size MobileBERT or DistilBERT QA model with random weights and the real uncased vocab."""
    import torch
    from transformers import (
        BertTokenizerFast,
        DistilBertConfig,
        DistilBertForQuestionAnswering,
        MobileBertConfig,
        MobileBertForQuestionAnswering,
    )

    from qatune.model.load import resolve_model

    torch.manual_seed(0)
    model = (MobileBertForQuestionAnswering(MobileBertConfig()) if kind == "mobilebert"
             else DistilBertForQuestionAnswering(DistilBertConfig()))
    path = directory / kind
    model.save_pretrained(path)
    BertTokenizerFast(vocab_file=str(Path(resolve_model("minilm-l6")) / "vocab.txt"),
                      do_lower_case=True).save_pretrained(path)
    return str(path)


def train_once(src: str | None, model: str, strategy: str, extra: list[str], args, out: Path) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve())
    cmd = [sys.executable, "-m", "qatune.cli", "train", "--model", model, "--strategy", strategy, *extra,
           "--train-data", args.data, "--train-articles", "1-36", "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_length),
           "--doc-stride", str(args.max_seq_length // 3), "--precision", args.precision, "--save-steps", "100000",
           "--output-dir", str(out), *(["--compile"] if args.compile and not src else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    return {"windows_per_s": run["timing"]["train_windows_per_s"], "train_s": run["timing"]["train_s"],
            "cuda_peak_mb": run["memory"].get("cuda_peak_mb"), "attention": run["resolved"].get("attention"),
            "final_loss": (run.get("loss") or {}).get("final")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/squad/dev-v1.1.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--compile", action="store_true", help="also pass --compile (current tree only)")
    ap.add_argument("--src", help="another qatune source tree to measure first (the 'before' column)")
    ap.add_argument("--only", nargs="+", help="labels (substrings) of the shapes to run")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.data = str(Path(args.data).resolve())
    if not Path(args.data).exists():
        print(f"error: {args.data} not found (real SQuAD data)", file=sys.stderr)
        return 2
    shapes = [s for s in SHAPES if not args.only or any(o.lower() in s[0].lower() for o in args.only)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        for label, model, strategy, extra in shapes:
            if model not in models:
                models[model] = model if model == "minilm-l6" else random_model(model, tmp)
            row = {"shape": label}
            for side, src in (("before", args.src), ("after", None)):
                if side == "before" and not src:
                    continue
                row[side] = train_once(src, models[model], strategy, extra, args, tmp / f"{label}-{side}")
                print(f"  {label} [{side}]: {row[side]['windows_per_s']:.1f} windows/s", flush=True)
            results.append(row)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    print(f"\nSingle-run training throughput, {device}, {args.precision}, {args.max_seq_length} tokens, batch "
          f"{args.batch_size}, {args.steps} steps{' (compiled)' if args.compile else ''}\n")
    header = ["shape", "windows/s", "attention", "final loss", "peak CUDA MB"]
    if args.src:
        header[1:1] = ["before windows/s", "ratio"]
    lines = []
    for r in results:
        a = r["after"]
        line = [r["shape"], f"{a['windows_per_s']:.1f}", str(a["attention"]), f"{a['final_loss'] or float('nan'):.3f}",
                f"{a['cuda_peak_mb']:.0f}" if a["cuda_peak_mb"] else "-"]
        if args.src:
            line[1:1] = [f"{r['before']['windows_per_s']:.1f}",
                         f"{a['windows_per_s'] / r['before']['windows_per_s']:.2f}x"]
        lines.append(line)
    markdown_table(header, lines)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
