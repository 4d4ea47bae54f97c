"""Training throughput: dynamic padding + length grouping vs pad-to-max, bf16 vs fp32, and model FLOP/s.

Runs the same model on the same windows (a seeded sample of real SQuAD questions) through qatune's own
collate/batching and an AdamW step, in one process, and prints windows/s per setting, the ratio to the
pad-to-max fp32 baseline measured in the same run, the model FLOP/s achieved (6 x non-embedding
parameters x real tokens + attention) and the machine's measured fp32/bf16 matmul FLOP/s.

    python benchmarks/bench_train.py [--data ../shared/data/squad/dev-v1.1.json] [--windows 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qatune.data import load_squad, subsample
from qatune.features import build_features, collate
from qatune.inference import autocast_context
from qatune.models import load_qa_model, load_tokenizer
from qatune.train import epoch_batches


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def train_flops(model, tokens_per_row: np.ndarray, width: int) -> float:
    """Training FLOPs of one batch: 6 x non-embedding params per padded token, plus attention (QK^T and AV)."""
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layers
    hidden = getattr(cfg, "hidden_size", None) or cfg.dim
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in model.parameters()) - emb
    rows = len(tokens_per_row)
    return 6 * dense * rows * width + 3 * 4 * layers * hidden * rows * width * width


def run(model, feats, pad_id, batches, precision, pad_to_max) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    windows = real_tokens = 0
    flops = 0.0
    t0 = None
    for i, rows in enumerate(batches):
        if i == 1:  # first batch warms up allocators and kernels
            t0, windows, real_tokens, flops = time.perf_counter(), 0, 0, 0.0
        batch = collate(feats, rows, pad_id, pad_to_max_length=pad_to_max)
        with autocast_context(torch.device("cpu"), precision):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        windows += len(rows)
        real_tokens += int(batch["attention_mask"].sum())
        flops += train_flops(model, feats.lengths[rows], batch["input_ids"].shape[1])
    dt = time.perf_counter() - t0
    return {"windows_per_s": windows / dt, "real_tokens_per_s": real_tokens / dt, "model_flops": flops / dt,
            "seconds": dt, "windows": windows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/squad/dev-v1.1.json")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--windows", type=int, default=256, help="windows per setting (after one warm-up batch)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not Path(args.data).exists():
        print(f"error: {args.data} not found (real SQuAD data; see ../shared/data/squad/README.md)", file=sys.stderr)
        return 2
    tok = load_tokenizer(args.model)
    data = load_squad(args.data)
    examples = subsample(data.examples, args.windows + args.batch_size, seed=0)
    feats = build_features(examples, tok, args.max_seq_length, 128)
    n = args.windows + args.batch_size
    grouped = epoch_batches(feats.lengths, args.batch_size, 0, 0, True)
    plain = epoch_batches(feats.lengths, args.batch_size, 0, 0, False)
    grouped = [b for b in grouped if len(b) == args.batch_size][: n // args.batch_size]
    plain = [b for b in plain if len(b) == args.batch_size][: n // args.batch_size]

    peak = {"fp32": matmul_flops(torch.float32), "bf16": matmul_flops(torch.bfloat16)}
    settings = [
        ("pad to max_seq_length (baseline)", plain, "fp32", True),
        ("dynamic padding, random order", plain, "fp32", False),
        ("dynamic padding + length grouping", grouped, "fp32", False),
        ("dynamic padding + length grouping, bf16", grouped, "bf16", False),
    ]
    results = []
    for name, batches, precision, pad in settings:
        torch.manual_seed(0)
        model = load_qa_model(args.model)
        r = run(model, feats, tok.pad_token_id, batches, precision, pad)
        r.update(name=name, precision=precision, mfu=r["model_flops"] / peak[precision])
        results.append(r)
    base = results[0]["windows_per_s"]
    print(f"\nTraining throughput, {args.model}, {results[0]['windows']} windows of real SQuAD questions, batch "
          f"{args.batch_size}, max_seq_length {args.max_seq_length}, {torch.get_num_threads()} threads")
    print(f"measured 2048^2 matmul: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s\n")
    print("| setting | windows/s | real tokens/s | model GFLOP/s | of matmul peak | ratio vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['windows_per_s']:.2f} | {r['real_tokens_per_s']:.0f} | "
              f"{r['model_flops'] / 1e9:.1f} | {100 * r['mfu']:.0f}% | {r['windows_per_s'] / base:.2f}x |")
    print("\nTarget: dynamic padding + length grouping >= 1.8x pad-to-max (fp32). Model FLOP/s counts padded tokens.")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_flops": peak, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
