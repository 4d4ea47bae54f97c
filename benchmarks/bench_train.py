"""Training throughput: qatune's training path vs a run_qa.py-style transformers.Trainer, plus padding/bf16 rows.

Part 1 (padding): runs the same model on the same windows (a seeded sample of real SQuAD questions) through
qatune's own collate/batching and an AdamW step, in one process, and prints windows/s per setting, the ratio
to the pad-to-max fp32 baseline measured in the same run, the model FLOP/s achieved (6 x non-embedding
parameters x padded tokens + attention) and the machine's measured fp32/bf16 matmul FLOP/s.

Part 2 (Trainer): trains the same windows (the windows of ``--compare-questions`` questions drawn with the
seed) for one epoch three times, each from freshly loaded weights with the same seed, learning rate, batch
size, linear warm-up/decay schedule and weight decay: with ``transformers.Trainer`` configured as Hugging
Face's run_qa.py does (fp32, every window padded to max_seq_length, ``default_data_collator``), and with
``qatune.train.recipe.train`` in fp32 padded to max_seq_length and as qatune trains by default (dynamic padding,
length grouping, bf16 where the CPU has it). It prints windows/s, the ratio to the Trainer and two losses per
side so equal loss can be judged: the final training loss (mean per-step loss over the last quarter of the
steps) and the loss of the final weights scored the same way on the trained windows.

    python benchmarks/bench_train.py [--data ../shared/data/squad/dev-v1.1.json] [--windows 256]
                                     [--compare-questions 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _table import markdown_table  # sibling module: scripts run as python benchmarks/x.py

from qatune.answer.inference import autocast_context
from qatune.config import TrainConfig
from qatune.data.batches import epoch_batches
from qatune.data.features import build_features, collate
from qatune.data.splits import load_split, subsample
from qatune.data.squad import load_squad
from qatune.model.load import load_qa_model, load_tokenizer
from qatune.model.machine import cpu_has_bf16
from qatune.train.recipe import train as qatune_train

TARGET_VS_TRAINER = 3.0


class BenchError(RuntimeError):
    """The comparison cannot be made honestly (missing loss record, mismatched windows or steps)."""


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5, shape: tuple[int, int, int] | None = None) -> float:
    """FLOP/s of an (m x k) @ (k x n) matmul, best of ``reps`` (``shape`` = (m, k, n); default n x n by n x n)."""
    m, k, n = shape or (n, n, n)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


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


# --------------------------------------------------------------------------------------------------
# Part 2: qatune's training path vs transformers.Trainer configured as run_qa.py.
# --------------------------------------------------------------------------------------------------
def final_loss(losses: list[float]) -> tuple[float, float]:
    """The final-loss statistic used for both sides: mean per-step loss over the last quarter of the steps, and
    its standard error (the step-to-step spread of those losses / sqrt(steps); 0 with a single step)."""
    last = np.asarray(losses[-max(1, math.ceil(len(losses) / 4)) :], dtype=np.float64)
    se = float(last.std(ddof=1) / math.sqrt(len(last))) if len(last) > 1 else 0.0
    return float(last.mean()), se


def qatune_step_losses(run: dict, run_json: Path) -> list[float]:
    """Per-optimizer-step training losses from qatune's run.json (``loss.curve`` logged every step)."""
    if "loss" not in run or not isinstance(run["loss"], dict) or "curve" not in run["loss"]:
        raise BenchError(f"{run_json} has no 'loss' (expected \"loss\": {{\"final\": ..., \"curve\": [[step, loss], "
                           f"...]}}): this qatune does not record its training loss in run.json yet, so the final "
                           f"losses cannot be compared and the Trainer comparison is not printed")
    curve = run["loss"]["curve"]
    steps = [int(s) for s, _ in curve]
    total = run["resolved"]["total_steps"]
    if steps != list(range(1, total + 1)):
        raise BenchError(f"{run_json}: loss.curve should hold one point per optimizer step (logging_steps=1) for "
                           f"steps 1..{total}, got steps {steps[:5]}...{steps[-3:]}")
    return [float(v) for _, v in curve]


@torch.no_grad()
def windows_loss(model, feats, pad_id: int, batch_size: int = 64) -> float:
    """Mean span loss of a model's weights on the given windows, independent of how anyone padded: fp32, eval
    mode, start/end cross-entropy (averaged as the QA models do) over each window's own tokens only."""
    model.eval()
    order = np.argsort(feats.lengths, kind="stable")
    total = 0.0
    for i in range(0, len(order), batch_size):
        batch = collate(feats, order[i : i + batch_size], pad_id, pad_to_max_length=False)
        labels = batch.pop("start_positions"), batch.pop("end_positions")
        out = model(**batch)
        pad = batch["attention_mask"] == 0
        for logits, y in zip((out.start_logits, out.end_logits), labels):
            logits = logits.float().masked_fill(pad, float("-inf"))
            total += 0.5 * torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    return total / len(feats)


def run_qatune(args, questions: int, precision: str, pad_to_max: bool, group_by_length: bool, feats,
               pad_id: int) -> dict:
    """One real `qatune.train.recipe.train` run (one epoch); throughput and per-step losses read from its run.json,
    then its saved final weights scored with `windows_loss` on the windows it trained on."""
    with tempfile.TemporaryDirectory(prefix="bench_train_qatune_") as tmp:
        cfg = TrainConfig(model=args.model, train_data=args.data, train_questions=questions, eval_data=None,
                          output_dir=tmp, max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                          batch_size=args.batch_size, epochs=1.0, max_steps=0, learning_rate=args.learning_rate,
                          warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, precision=precision,
                          pad_to_max_length=pad_to_max, group_by_length=group_by_length, save_steps=10**9,
                          logging_steps=1, seed=args.seed)
        qatune_train(cfg, progress=False)  # its return type is changing: read run.json instead
        run_json = Path(tmp) / "run.json"
        run = json.loads(run_json.read_text())
        losses = qatune_step_losses(run, run_json)
        if run["resolved"]["train_windows"] != len(feats):
            raise BenchError(f"qatune trained {run['resolved']['train_windows']} windows, the benchmark built "
                               f"{len(feats)} from the same questions")
        weights_loss = windows_loss(load_qa_model(str(Path(tmp) / "model")), feats, pad_id)
    t = run["timing"]
    return {"windows": run["resolved"]["train_windows"], "steps": run["resolved"]["total_steps"],
            "precision": run["resolved"]["precision"], "seconds": t["train_s"],
            "windows_per_s": t["train_windows_per_s"], "losses": losses, "weights_loss": weights_loss}


class PaddedWindows(torch.utils.data.Dataset):
    """run_qa.py's training set: one dict per window, every window padded to max_seq_length."""

    def __init__(self, feats, pad_id: int):
        self.batch = collate(feats, np.arange(len(feats)), pad_id, pad_to_max_length=True)

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def run_trainer(args, feats, pad_id: int) -> dict:
    """transformers.Trainer as run_qa.py sets it up (fp32, pad to max, default_data_collator), one epoch."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments, default_data_collator, set_seed
    from transformers.trainer_callback import PrinterCallback

    dataset = PaddedWindows(feats, pad_id)
    steps = math.ceil(len(dataset) / args.batch_size)
    set_seed(args.seed)  # as qatune.train.recipe: seed, then load (the fresh span head draws from the seeded RNG)
    model = load_qa_model(args.model)
    # qatune's Accelerator may have left a bf16 process-wide accelerate state behind; start clean.
    AcceleratorState._reset_state(reset_partial_state=False)
    with tempfile.TemporaryDirectory(prefix="bench_train_trainer_") as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
            num_train_epochs=1, lr_scheduler_type="linear",
            # qatune warms up for int(ratio * steps) steps; a float warmup_steps would round up instead
            warmup_steps=int(args.warmup_ratio * steps), weight_decay=args.weight_decay, seed=args.seed,
            report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1,
            dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=default_data_collator)
        trainer.remove_callback(PrinterCallback)  # it prints every logged step (logging_steps=1) to stdout
        if trainer.accelerator.mixed_precision != "no":
            raise BenchError(f"the Trainer would run in {trainer.accelerator.mixed_precision}, not fp32")
        out = trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    losses = [float(h["loss"]) for h in hist]
    if [h["step"] for h in hist] != list(range(1, steps + 1)):
        raise BenchError(f"the Trainer logged losses at steps {[h['step'] for h in hist][:5]}..., expected 1..{steps}")
    sec = out.metrics["train_runtime"]
    return {"windows": len(dataset), "steps": trainer.state.global_step, "precision": "fp32", "seconds": sec,
            "windows_per_s": len(dataset) / sec, "losses": losses,
            "weights_loss": windows_loss(trainer.model, feats, pad_id),
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                              else trainer.optimizer).__name__}


def compare_with_trainer(args, tok) -> dict:
    questions, pad = args.compare_questions, tok.pad_token_id
    # The windows qatune trains on: the same questions drawn with the seed (as `qatune.train.recipe` draws them),
    # windowed the same way. The Trainer trains on these; every side's final weights are scored on them.
    data = load_split(args.data, "train", None, questions, args.seed, False)
    feats = build_features(data.examples, tok, args.max_seq_length, args.doc_stride)
    qatune_precision = "bf16" if cpu_has_bf16() else "fp32"
    rows = [
        ("qatune train, fp32, pad to max_seq_length, random order",
         lambda: run_qatune(args, questions, "fp32", True, False, feats, pad)),
        (f"qatune train (default path: dynamic padding + length grouping, {qatune_precision})",
         lambda: run_qatune(args, questions, qatune_precision, False, True, feats, pad)),
        ("transformers.Trainer, run_qa.py config (fp32, pad to max_seq_length)",
         lambda: run_trainer(args, feats, pad)),
    ]
    results = []
    for name, fn in rows:
        print(f"[bench_train] training: {name} ...", file=sys.stderr, flush=True)
        r = fn()
        r["final_loss"], r["final_loss_se"] = final_loss(r["losses"])
        r["name"] = name
        results.append(r)
    windows = {r["windows"] for r in results}
    steps = {r["steps"] for r in results}
    if len(windows) != 1 or len(steps) != 1:
        raise BenchError(f"the runs did not train the same windows/steps: windows {windows}, steps {steps}")
    trainer = results[-1]
    for r in results:
        r["ratio_vs_trainer"] = r["windows_per_s"] / trainer["windows_per_s"]
        r["loss_minus_trainer"] = r["final_loss"] - trainer["final_loss"]
        r["weights_loss_minus_trainer"] = r["weights_loss"] - trainer["weights_loss"]
    return {"questions": questions, "windows": windows.pop(), "steps": steps.pop(),
            "last_quarter_steps": max(1, math.ceil(trainer["steps"] / 4)), "learning_rate": args.learning_rate,
            "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay, "seed": args.seed,
            "batch_size": args.batch_size, "target_ratio": TARGET_VS_TRAINER, "results": results}


def print_comparison(cmp: dict, model: str) -> None:
    print(f"\nqatune vs transformers.Trainer (run_qa.py config), {model}: {cmp['windows']} windows of "
          f"{cmp['questions']} real SQuAD questions, one epoch = {cmp['steps']} optimizer steps of batch "
          f"{cmp['batch_size']}, lr {cmp['learning_rate']:g} (linear, warm-up ratio {cmp['warmup_ratio']:g}), "
          f"weight decay {cmp['weight_decay']:g}, seed {cmp['seed']}, {torch.get_num_threads()} threads\n")
    header = ["setting", "precision", "windows/s", "windows/s vs Trainer", "train s",
              f"final train loss (last {cmp['last_quarter_steps']} steps)", "vs Trainer",
              "final weights' loss", "vs Trainer"]
    lines = [[r["name"], r["precision"], f"{r['windows_per_s']:.2f}", f"{r['ratio_vs_trainer']:.2f}x",
              f"{r['seconds']:.1f}", f"{r['final_loss']:.3f} ± {r['final_loss_se']:.3f}",
              f"{r['loss_minus_trainer']:+.3f}", f"{r['weights_loss']:.3f}", f"{r['weights_loss_minus_trainer']:+.3f}"]
             for r in cmp["results"]]
    markdown_table(header, lines, left=2)
    best, trainer = cmp["results"][1], cmp["results"][-1]
    print(f"\nGoal: qatune >= {cmp['target_ratio']:g}x the Trainer's windows/s at equal loss. Measured: "
          f"{best['ratio_vs_trainer']:.2f}x ({'at or above' if best['ratio_vs_trainer'] >= cmp['target_ratio'] else 'below'} "
          f"the windows/s goal); final train loss {best['final_loss']:.3f} (qatune) vs "
          f"{trainer['final_loss']:.3f} (Trainer); final weights' loss {best['weights_loss']:.3f} vs "
          f"{trainer['weights_loss']:.3f}.")
    print("Timings include the first (warm-up) step on every side; qatune's also include writing its final "
          "checkpoint. Final train loss: mean per-step training loss over the last quarter of the steps, ± its "
          "standard error over those steps; it is computed over each batch's padded width, so with dynamic "
          "padding (fewer positions to choose from) it is lower than with padding to max_seq_length at the same "
          "weights. Final weights' loss: each side's final weights scored on all these windows the same way "
          "(fp32, eval mode, span cross-entropy over each window's own tokens, padding excluded).")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/squad/dev-v1.1.json")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--windows", type=int, default=256, help="windows per setting (after one warm-up batch)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--compare-questions", type=int, default=200,
                    help="questions whose windows qatune and the Trainer each train on for one epoch (0 skips it)")
    ap.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (Trainer comparison)")
    ap.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up share (Trainer comparison)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (Trainer comparison)")
    ap.add_argument("--seed", type=int, default=42, help="seed for the Trainer comparison")
    ap.add_argument("--json")
    ap.add_argument("--check-target", action="store_true",
                    help=f"exit with status 3 when qatune's default path is below {TARGET_VS_TRAINER:g}x the Trainer's "
                         f"windows/s (the losses are printed, not checked)")
    args = ap.parse_args()
    if not Path(args.data).exists():
        print(f"error: {args.data} not found (real SQuAD data; see ../shared/data/squad/README.md)", file=sys.stderr)
        return 2
    tok = load_tokenizer(args.model)
    data = load_squad(args.data)
    examples = subsample(data.examples, args.windows + args.batch_size, seed=0)
    feats = build_features(examples, tok, args.max_seq_length, args.doc_stride)
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
    try:
        cmp = compare_with_trainer(args, tok) if args.compare_questions > 0 else None
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cmp:
        print_comparison(cmp, args.model)
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_flops": peak, "results": results, "trainer_comparison": cmp},
                                              indent=2))
    if args.check_target and cmp and cmp["results"][1]["ratio_vs_trainer"] < TARGET_VS_TRAINER:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
