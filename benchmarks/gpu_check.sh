#!/usr/bin/env bash
# One short GPU check, for a session that is lent a GPU machine: real-size models built from their
# configs with random weights (no download). Writes JSON under $OUT (or benchmarks/results).
#   bash benchmarks/gpu_check.sh
# Wheels for what the GPU machine lacks (bitsandbytes, xgrammar and their deps) can be carried in
# wheels/ (ignored by git); each step is bounded by STEP_TIMEOUT seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMLLM_CACHE="${TMPDIR:-/tmp}/mmllm-cache"
out="${OUT:-benchmarks/results}"
if ls wheels/*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --find-links wheels bitsandbytes xgrammar || echo "wheel install failed"
fi
step() { echo "== $*"; timeout "${STEP_TIMEOUT:-170}" "$@" || echo "!! exit $? from: $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
step python benchmarks/train_step.py --gpu --steps 5 --out "$out/train_step_gpu.json"
step python benchmarks/label_throughput.py --gpu --rows 64 --out "$out/label_throughput_gpu.json"
step python benchmarks/classify_vs_generate.py --gpu --rows 64 --out "$out/classify_vs_generate_gpu.json"
