"""Inference throughput: qatune's Reader (PyTorch, ONNX fp32, ONNX int8) vs the transformers-docs recipe.

transformers 5 removed the question-answering pipeline; what its docs now give for extractive QA inference is a
recipe: ``AutoModelForQuestionAnswering`` plus the tokenisation and post-processing of the course / ``utils_qa.py``
(``tokenizer(..., truncation="only_second", stride, return_overflowing_tokens, return_offsets_mapping,
padding="max_length")``, non-context offsets set to None, a forward pass in batches, then per question and per window
``np.argsort`` for the top 20 start and end logits and a Python loop over their pairs). That recipe is written here as
the baseline and answers the same questions as

* ``qatune.answer.inference.Reader`` on the PyTorch model (fp32: the answers must be the recipe's),
* ``Reader`` on the model's ONNX export (fp32) and on its int8 export (ONNX Runtime dynamic quantization),

each one question at a time (batch 1: tokenise, forward, decode per question, what a client of a server sees) and all
at once (batched). Reported: questions/s, p50/p95 ms per question at batch 1, EM/F1 on the questions, the ratios to
the recipe, and how many answers equal the recipe's. Stated goal: int8 >= 2x the recipe's questions/s on the CPU
with F1 within 1.5 points of fp32.

The model: ``--run DIR`` (a qatune run or model directory), else MiniLM-L6 fine-tuned here once on articles 1-36 of
the SQuAD dev file (kept in ``--work`` for the next invocation); the questions come from articles 37-48.

Run from the project root:  python benchmarks/bench_inference.py [--questions 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _table import markdown_table  # sibling module: scripts run as python benchmarks/x.py

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "squad" / "dev-v1.1.json"
TARGET_INT8_SPEEDUP, TARGET_INT8_F1_DROP = 2.0, 1.5


# --------------------------------------------------------------------------------------------------
# Baseline: the transformers-docs recipe (AutoModelForQuestionAnswering + utils_qa-style post-processing).
# --------------------------------------------------------------------------------------------------
class Recipe:
    def __init__(self, model_dir: Path, max_length: int, stride: int, batch_size: int, n_best: int = 20,
                 max_answer_length: int = 30):
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        self.model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_length, self.stride, self.batch_size = max_length, stride, batch_size
        self.n_best, self.max_answer_length = n_best, max_answer_length

    @torch.no_grad()
    def answer_many(self, items: list[tuple[str, str]]) -> list[str]:
        questions = [q.lstrip() for q, _ in items]
        contexts = [c for _, c in items]
        enc = self.tokenizer(questions, contexts, truncation="only_second", max_length=self.max_length,
                             stride=self.stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                             padding="max_length")
        sample_map = enc.pop("overflow_to_sample_mapping")
        offsets = enc.pop("offset_mapping")
        for i in range(len(enc["input_ids"])):
            seq = enc.sequence_ids(i)
            offsets[i] = [o if seq[k] == 1 else None for k, o in enumerate(offsets[i])]
        names = self.tokenizer.model_input_names
        starts, ends = [], []
        for lo in range(0, len(enc["input_ids"]), self.batch_size):
            batch = {k: torch.tensor(enc[k][lo : lo + self.batch_size]) for k in names}
            out = self.model(**batch)
            starts.append(out.start_logits.numpy())
            ends.append(out.end_logits.numpy())
        start_logits, end_logits = np.concatenate(starts), np.concatenate(ends)
        features = collections.defaultdict(list)
        for i, e in enumerate(sample_map):
            features[e].append(i)
        answers = []
        for e, context in enumerate(contexts):
            candidates = []
            for i in features[e]:
                s_logit, e_logit, offset = start_logits[i], end_logits[i], offsets[i]
                for s in np.argsort(s_logit)[-1 : -self.n_best - 1 : -1].tolist():
                    for t in np.argsort(e_logit)[-1 : -self.n_best - 1 : -1].tolist():
                        if offset[s] is None or offset[t] is None:
                            continue
                        if t < s or t - s + 1 > self.max_answer_length:
                            continue
                        candidates.append({"text": context[offset[s][0] : offset[t][1]],
                                           "logit_score": s_logit[s] + e_logit[t]})
            answers.append(max(candidates, key=lambda x: x["logit_score"])["text"] if candidates else "")
        return answers


# --------------------------------------------------------------------------------------------------
# Systems and measurement
# --------------------------------------------------------------------------------------------------
def qatune_answers(reader):
    def answer_many(items):
        return [a[0]["text"] if a else "" for a in reader.answer_many(items)]

    return answer_many


def batch1(answer_many, items) -> tuple[list[str], list[float]]:
    out, times = [], []
    for item in items:
        t = time.perf_counter()
        out += answer_many([item])
        times.append(time.perf_counter() - t)
    return out, times


def train_model(work: Path, data: Path) -> Path:
    from qatune.config import TrainConfig
    from qatune.train.recipe import train

    run = work / "minilm-full"
    if (run / "run.json").exists():
        return run
    print(f"fine-tuning MiniLM-L6 on articles 1-36 of {data} into {run} (once) ...", flush=True)
    train(TrainConfig(model="minilm-l6", train_data=str(data), train_articles="1-36", train_questions=1500,
                      eval_data=str(data), eval_articles="37-48", eval_questions=300, max_seq_length=256,
                      doc_stride=96, max_steps=120, batch_size=16, learning_rate=1.5e-4, precision="bf16",
                      save_steps=1000, output_dir=str(run)), progress=False)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD v1.1 dev JSON (default: %(default)s)")
    p.add_argument("--run", type=Path, help="a qatune run or model directory (default: fine-tune MiniLM once)")
    p.add_argument("--work", type=Path, default=Path("/tmp/qatune-bench"), help="model and exports (kept)")
    p.add_argument("--questions", type=int, default=200, help="questions from articles 37-48 (default 200)")
    p.add_argument("--repeats", type=int, default=2, help="batched runs per system, interleaved (best is reported)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)

    from qatune.answer.export import export
    from qatune.answer.inference import Reader, resolve_model_dir
    from qatune.answer.metrics import squad_v1
    from qatune.data.splits import select_articles
    from qatune.data.squad import load_squad

    if not args.data.exists():
        print(f"SQuAD dev file not found: {args.data} (pass --data)", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run or train_model(args.work, args.data)
    model_dir = resolve_model_dir(run)
    exports = {}
    for name, fmt, q in (("merged", "merged", None), ("onnx-fp32", "onnx", None), ("onnx-int8", "onnx", "int8")):
        out = args.work / f"{model_dir.parent.name}-{name}"
        if not (out / "qatune.json").exists():
            export(model_dir, out, fmt, q)
        exports[name] = out
    data = select_articles(load_squad(args.data), "37-48")
    examples = data.examples[: args.questions]
    items = [(ex.question, ex.context) for ex in examples]
    refs = {ex.id: [a.text for a in ex.answers] for ex in examples}

    torch_reader = Reader.load(exports["merged"], device="cpu", precision="fp32")
    c = torch_reader.config
    systems = {
        "transformers-docs recipe (PyTorch fp32)": Recipe(exports["merged"], c.max_seq_length, c.doc_stride,
                                                          c.batch_size, c.n_best, c.max_answer_length).answer_many,
        "qatune Reader, PyTorch fp32": qatune_answers(torch_reader),
        "qatune Reader, ONNX fp32": qatune_answers(Reader.load(exports["onnx-fp32"])),
        "qatune Reader, ONNX int8": qatune_answers(Reader.load(exports["onnx-int8"])),
    }
    print(f"{len(items)} questions, max_seq_length {c.max_seq_length}, doc_stride {c.doc_stride}, "
          f"{torch.get_num_threads()} threads; model {model_dir}", flush=True)
    for answer_many in systems.values():  # warm-up
        answer_many(items[:4])
    results = {name: {"batched_s": []} for name in systems}
    for name, answer_many in systems.items():
        answers, times = batch1(answer_many, items)
        results[name].update(answers=answers, batch1_s=sum(times), p50_ms=1000 * statistics.median(times),
                             p95_ms=1000 * float(np.percentile(times, 95)))
    for _ in range(args.repeats):
        for name, answer_many in systems.items():
            t = time.perf_counter()
            batched = answer_many(items)
            results[name]["batched_s"].append(time.perf_counter() - t)
            results[name]["batched_answers"] = batched
    base_name = next(iter(systems))
    base = results[base_name]
    rows, checks = [], {}
    for r in results.values():
        preds = dict(zip(refs, r["batched_answers"]))
        m = squad_v1(refs, preds)
        r.update(exact_match=m["exact_match"], f1=m["f1"], batch1_qps=len(items) / r["batch1_s"],
                 batched_qps=len(items) / min(r["batched_s"]),
                 same_as_recipe=sum(a == b for a, b in zip(r["batched_answers"], base["batched_answers"])),
                 batch1_equals_batched=r["answers"] == r["batched_answers"])
    for name, r in results.items():
        rows.append([name, f"{r['batch1_qps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}",
                     f"{r['batched_qps']:.1f}", f"{r['batch1_qps'] / base['batch1_qps']:.2f}x",
                     f"{r['batched_qps'] / base['batched_qps']:.2f}x", f"{r['exact_match']:.2f}", f"{r['f1']:.2f}",
                     f"{r['same_as_recipe']}/{len(items)}"])
    markdown_table(["system", "q/s batch 1", "p50 ms", "p95 ms", "q/s batched", "batch 1 vs recipe",
                    "batched vs recipe", "EM", "F1", "answers = recipe"], rows)
    torch_r = results["qatune Reader, PyTorch fp32"]
    int8 = results["qatune Reader, ONNX int8"]
    checks["PyTorch answers identical to the recipe's"] = torch_r["same_as_recipe"] == len(items)
    checks["ONNX fp32 answers identical to PyTorch's"] = \
        results["qatune Reader, ONNX fp32"]["batched_answers"] == torch_r["batched_answers"]
    # (int8 is left out: dynamic quantization scales activations per batch, so its answers depend on the batch)
    checks["batch 1 answers equal batched answers (qatune fp32)"] = all(
        results[n]["batch1_equals_batched"] for n in results if n.startswith("qatune") and "int8" not in n)
    checks[f"int8 F1 within {TARGET_INT8_F1_DROP} of fp32"] = abs(int8["f1"] - torch_r["f1"]) <= TARGET_INT8_F1_DROP
    checks[f"goal: int8 >= {TARGET_INT8_SPEEDUP}x the recipe's q/s (batch 1)"] = \
        int8["batch1_qps"] >= TARGET_INT8_SPEEDUP * base["batch1_qps"]
    checks[f"goal: int8 >= {TARGET_INT8_SPEEDUP}x the recipe's q/s (batched)"] = \
        int8["batched_qps"] >= TARGET_INT8_SPEEDUP * base["batched_qps"]
    print()
    for k, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    if not checks["PyTorch answers identical to the recipe's"]:
        for q, a, b in zip(items, torch_r["batched_answers"], base["batched_answers"]):
            if a != b:
                print(f"  differs: {q[0]!r}: qatune {a!r}, recipe {b!r}")
    if args.json:
        out = {"settings": {"questions": len(items), "model": str(model_dir), "threads": torch.get_num_threads(),
                            "config": c.to_dict(), "cpu": platform.processor() or platform.machine()},
               "results": {n: {k: v for k, v in r.items() if "answers" not in k} for n, r in results.items()},
               "checks": checks}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    correctness = [k for k in checks if not k.startswith("goal")]
    return 0 if all(checks[k] for k in correctness) else 1


if __name__ == "__main__":
    sys.exit(main())
