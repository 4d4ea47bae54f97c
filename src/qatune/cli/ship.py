"""`qatune export` (merged weights or ONNX, optionally int8) and `qatune serve` (HTTP answers)."""

from __future__ import annotations

import argparse

from qatune.cli.common import MODEL_HELP, emit


def add(sub) -> None:
    x = sub.add_parser("export", help="export a model to ship: merged PyTorch weights, or ONNX (optionally int8)",
                       description="LoRA adapters are merged into their base first. A parity probe compares the "
                                   "export's logits with the torch model's and fails beyond a stated tolerance. "
                                   "The directory holds the model, tokenizer, inference configuration and a model "
                                   "card (README.md).")
    x.add_argument("--model", required=True, help=MODEL_HELP)
    x.add_argument("--format", choices=["merged", "onnx"], default="merged",
                   help="merged: standalone PyTorch weights; onnx: an ONNX Runtime model (needs qatune[onnx])")
    x.add_argument("--quantize", choices=["int8"], help="with --format onnx: int8 weights (dynamic quantization)")
    x.add_argument("--output-dir", required=True)
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=export)

    sv = sub.add_parser("serve", help="answer questions over HTTP: POST /answer, GET /health, docs at /docs",
                        description="Needs qatune[serve]. Requests arriving together are answered in one batch.")
    sv.add_argument("model", help=MODEL_HELP)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    sv.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    sv.add_argument("--max-batch", type=int, default=32, help="questions answered together at most (default 32)")
    sv.add_argument("--batch-wait-ms", type=float, default=2.0,
                    help="how long a batch waits for more requests (default 2 ms)")
    sv.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger requests get 413 (default 1 MB)")
    sv.add_argument("--max-context-chars", type=int, default=100_000,
                    help="longer contexts get 413 (default 100,000 characters)")
    sv.set_defaults(func=serve)


def export(args: argparse.Namespace) -> None:
    from qatune.answer.export import export as export_model

    r = export_model(args.model, args.output_dir, args.format, args.quantize)
    what = args.format + (f" {args.quantize}" if args.quantize else "")
    emit(r, args.json, [f"exported {args.model} -> {args.output_dir} ({what}, {r['size_bytes'] / 2**20:.1f} MiB)",
                        f"  parity probe: {r['parity_measure']} {r['parity_value']:.2e} (tolerance {r['tolerance']:.0e}; "
                        f"largest single difference {r['max_abs_logit_diff']:.2e})"])


def serve(args: argparse.Namespace) -> None:
    from qatune.answer.serve import serve as serve_model

    serve_model(args.model, args.host, args.port, device=args.device, threads=args.threads,
                max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_body_bytes=args.max_body_bytes,
                max_context_chars=args.max_context_chars)
