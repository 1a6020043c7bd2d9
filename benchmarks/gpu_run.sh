#!/usr/bin/env bash
# The GPU figures of benchmarks/results/gpu/, in one run on one CUDA machine:
#   1. the CUDA tests (tests/test_cuda.py and the bf16 env test);
#   2. gpu_figures.py: bf16 matmul peak, copy bandwidth, the update's MFU, decode against
#      the bandwidth floor (eager and CUDA-graph);
#   3. env_throughput.py at batch 256 in bf16, the CPU sizes and GPT-2 small's shape;
#   4. rlhf bench --suite gpu (GPU-sized base models built on the GPU), stopped at the
#      deadline if it has not finished, with the report written from the cells done.
#
#     bash benchmarks/gpu_run.sh OUT [TOTAL_SECONDS]
#
# Each step has its own time limit, so one that fails or hangs does not take the others.
# OUT gets a few files: the logs of each step and bench_gpu.tgz (the suite's results folder
# without checkpoints and models).
set -u
OUT=${1:?usage: bash benchmarks/gpu_run.sh OUT [TOTAL_SECONDS]}
DEADLINE=$((SECONDS + ${2:-3600}))  # the suite gets what the steps before it left, less 45 s to stop and pack
BENCH=${BENCH_DIR:-/tmp/bench_gpu}
SUITE=${SUITE:-gpu}  # another suite for a dry run elsewhere
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
quiet() { grep -v -e '^\[transformers\]' -e 'UserWarning' -e '^  warnings.warn'; }
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

stamp "machine" | tee "$OUT/run.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; } >>"$OUT/run.txt" 2>&1

stamp "CUDA tests" | tee -a "$OUT/run.txt"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  "tests/test_models.py::test_vector_env_on_cuda_bf16_matches_cpu_float32" >"$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"

stamp "gpu_figures" | tee -a "$OUT/run.txt"
timeout 100 $PY benchmarks/gpu_figures.py 2>&1 | quiet >"$OUT/gpu_figures.txt"
grep -v '^{' "$OUT/gpu_figures.txt"

stamp "env_throughput" | tee -a "$OUT/run.txt"
timeout 120 $PY benchmarks/env_throughput.py --device cuda --dtype bfloat16 --batch 256 --repeats 3 --warmup 1 --cuda-graph \
  --configs tiny-2L-64d small-4L-256d base-6L-512d-bpe4k gpt2s-12L-768d-bpe8k 2>&1 | quiet >"$OUT/env_throughput.txt"
grep -v '^{' "$OUT/env_throughput.txt" | tail -12

SUITE_S=$((DEADLINE - SECONDS - 45))
stamp "rlhf bench --suite $SUITE (${SUITE_S}s at most)" | tee -a "$OUT/run.txt"
timeout -k 20 -s INT "$SUITE_S" $PY -m rlhf_env bench --suite "$SUITE" --out "$BENCH" --no-progress 2>&1 | quiet >"$OUT/bench.txt"
if ! grep -q "cells ok in" "$OUT/bench.txt" && [ -d "$BENCH" ]; then
  stamp "the suite stopped: report from the cells done" | tee -a "$OUT/bench.txt"
  $PY - "$SUITE" "$BENCH" >>"$OUT/bench.txt" 2>&1 <<'EOF'
import sys
from pathlib import Path
from rlhf_env.bench.report import write_report
from rlhf_env.bench.suite import load_suite
print(Path(write_report(load_suite(sys.argv[1]), sys.argv[2])["markdown"]).read_text())
EOF
fi
tail -40 "$OUT/bench.txt"
tar czf "$OUT/bench_gpu.tgz" --exclude='checkpoint*' --exclude='*.safetensors' --exclude='*.pt' \
  -C "$(dirname "$BENCH")" "$(basename "$BENCH")"
stamp "done" | tee -a "$OUT/run.txt"
