"""Where a training step's time goes, on the offline preset's shapes (issue 27's baseline and yardstick).

For MiniLM-L6 full fine-tuning, LoRA r=8 and r=128, and the 3-layer model (real weights; batch 8, at most 256
tokens, length-grouped, bf16 where the CPU has it, real SQuAD windows), the same windows in the same order three
ways, in one process:

- **plain**: a plain Hugging Face loop (transformers' model as it loads, PEFT's LoRA with its dropout 0.1, bf16
  autocast, clipping, fused AdamW, linear schedule), the yardstick of issue 27;
- **today**: qatune's training path (`qatune.train.recipe`) as it trained before issue 27 (SDPA attention, the model's
  attention dropout 0.1, LoRA dropout 0.1);
- **fast**: qatune's path with its defaults (the attention kernel ``auto``: eager on a CPU), attention dropout 0 and,
  for LoRA, LoRA dropout 0 (benchmarks/fastpath.toml measures what that does to F1).

Each prints windows/s and counted model FLOP/s (the runs' own count; the plain loop is credited with the FLOPs of the
same batches), the fast path's rate as a share of this machine's bf16 matmul rate at the step's shapes (tokens of a
batch x 384 by 384 x 1536), and the top operators' share of a profiled fast run (torch.profiler, self CPU time).
Threads: ``--threads`` (1 by default, the issue's setting).

    python benchmarks/bench_step.py [--data ../shared/data/squad/dev-v1.1.json] [--steps 20] [--threads 1]
                                    [--only LoRA] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from _table import markdown_table  # sibling modules: scripts run as python benchmarks/x.py
from bench_train import matmul_flops

from qatune.config import TrainConfig
from qatune.model.machine import cpu_has_bf16
from qatune.train.recipe import Recipe, train

SHAPES = [  # (label, options): the offline preset's arms
    ("MiniLM-L6 full", {"strategy": "full"}),
    ("MiniLM-L6 LoRA r=8", {"strategy": "lora", "lora_rank": 8, "alpha_policy": "rslora"}),
    ("MiniLM-L6 LoRA r=128", {"strategy": "lora", "lora_rank": 128, "alpha_policy": "rslora"}),
    ("3-layer full", {"strategy": "full", "num_layers": 3}),
]
GROUPS = {  # operator families, as the issue counts them
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "dropout masks": ("aten::bernoulli_",),
    "dtype casts": ("aten::copy_", "aten::to", "aten::_to_copy"),
    "attention mask": ("aten::where", "aten::isneginf", "aten::all", "aten::masked_fill"),
}


PATHS = {"today": {"attention": "sdpa"}, "fast": {"attention_dropout": 0.0}}


def config(data: str, out: Path, cache: Path, steps: int, options: dict, path: str = "fast") -> TrainConfig:
    extra = {**PATHS[path], **({"lora_dropout": 0.0} if path == "fast" and options["strategy"] == "lora" else {})}
    return TrainConfig(model="minilm-l6", train_data=data, train_articles="1-36", max_steps=steps, batch_size=8,
                       max_seq_length=256, doc_stride=85, save_steps=10**6, output_dir=str(out),
                       feature_cache_dir=str(cache), learning_rate=5e-4, **options, **extra)


def plain_loop(cfg: TrainConfig) -> dict:
    """The same batches through a plain Hugging Face loop; its windows/s and counted FLOP/s over every step."""
    import time

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForQuestionAnswering, get_linear_schedule_with_warmup

    from qatune.methods import DEFAULT_LORA_TARGETS
    from qatune.model.load import quiet_transformers, resolve_model

    recipe = Recipe(cfg, progress=False)  # only for its windows and batch order
    recipe.setup()
    recipe.plan = recipe._plan()
    kw = {"num_hidden_layers": cfg.num_layers} if cfg.num_layers else {}
    with quiet_transformers():  # no load report for the span head it adds
        model = AutoModelForQuestionAnswering.from_pretrained(resolve_model(cfg.model), **kw)
    if cfg.strategy == "lora":
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.1,
                                                 use_rslora=cfg.alpha_policy == "rslora",
                                                 target_modules=list(DEFAULT_LORA_TARGETS["bert"]),
                                                 modules_to_save=["qa_outputs"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01, fused=True)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * cfg.max_steps), cfg.max_steps)
    model.train()
    windows, t0 = 0, time.perf_counter()
    for step in range(cfg.max_steps):
        n, batch = recipe._batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_bf16()):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        windows += n
    seconds = time.perf_counter() - t0
    return {"windows_per_s": windows / seconds, "flop_per_s": recipe.costs.between(0, cfg.max_steps) / seconds}


def profile(cfg: TrainConfig, top: int) -> dict:
    """Operator self-CPU-time shares of a run's training loop (setup and saving outside the profile)."""
    recipe = Recipe(cfg, progress=False)
    recipe.setup()
    recipe.writer = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        recipe.train()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)
    return {"top": [{"op": e.key, "share": e.self_cpu_time_total / total} for e in ranked[:top]],
            "groups": {g: sum(e.self_cpu_time_total for e in events if e.key in ops) / total
                       for g, ops in GROUPS.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/squad/dev-v1.1.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--only", nargs="+", help="labels (substrings) of the shapes to run")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not Path(args.data).exists():
        print(f"error: {args.data} not found (real SQuAD data)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    shapes = [s for s in SHAPES if not args.only or any(o.lower() in s[0].lower() for o in args.only)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k, (label, options) in enumerate(shapes):
            rates = {"plain": plain_loop(config(args.data, tmp / f"plain-{k}", tmp / "cache", args.steps, options))}
            for path in PATHS:
                t = train(config(args.data, tmp / f"{path}-{k}", tmp / "cache", args.steps, options, path),
                          progress=False).timing
                rates[path] = {"windows_per_s": t["train_windows_per_s"], "flop_per_s": t["train_flop_per_s"]}
            rows = round(t["train_tokens_per_s"] / t["train_windows_per_s"] * 8)  # tokens of a batch of 8
            peak = matmul_flops(dtype, reps=20, shape=(rows, 384, 1536))  # the feed-forward shape of a step
            prof = profile(config(args.data, tmp / f"prof-{k}", tmp / "cache", max(4, args.steps // 2), options),
                           args.top)
            results.append({"shape": label, **{f"{p}_windows_per_s": r["windows_per_s"] for p, r in rates.items()},
                            **{f"{p}_flop_per_s": r["flop_per_s"] for p, r in rates.items()},
                            "matmul_flop_per_s": peak, "share_of_matmul": rates["fast"]["flop_per_s"] / peak,
                            "batch_tokens": rows, **prof})
            print(f"  {label}: " + ", ".join(f"{p} {r['windows_per_s']:.1f}" for p, r in rates.items())
                  + " windows/s", flush=True)
    print(f"\nTraining steps on the offline shapes, {args.threads} thread(s), {dtype}, batch 8, <= 256 tokens, "
          f"{args.steps} steps; windows/s (counted model GFLOP/s)\n")
    markdown_table(["shape", "plain HF loop", "qatune today", "qatune fast", "fast / today", "fast / plain",
                    f"matmul GFLOP/s ({dtype})", "fast: share of matmul", *GROUPS],
                   [[r["shape"], *(f"{r[f'{p}_windows_per_s']:.2f} ({r[f'{p}_flop_per_s'] / 1e9:.0f})"
                                   for p in ("plain", *PATHS)),
                     f"{r['fast_windows_per_s'] / r['today_windows_per_s']:.2f}x",
                     f"{r['fast_windows_per_s'] / r['plain_windows_per_s']:.2f}x",
                     f"{r['matmul_flop_per_s'] / 1e9:.0f}", f"{r['share_of_matmul']:.2f}",
                     *(f"{r['groups'][g]:.0%}" for g in GROUPS)] for r in results])
    for r in results:
        print(f"\n{r['shape']}: " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in r["top"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
