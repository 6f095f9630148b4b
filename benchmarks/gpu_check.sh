#!/usr/bin/env bash
# One short GPU check, for a session that is lent a GPU machine: real-size models built from their
# configs with random weights (no download). Writes JSON under $OUT (or benchmarks/results).
#   bash benchmarks/gpu_check.sh
# Wheels for what the GPU machine lacks (bitsandbytes, xgrammar) can be carried in wheels/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMLLM_CACHE="${TMPDIR:-/tmp}/mmllm-cache"
out="${OUT:-benchmarks/results}"
if ls wheels/*.whl >/dev/null 2>&1; then python -m pip install -q --no-index --find-links wheels wheels/*.whl; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python benchmarks/train_step.py --gpu --steps 5 --out "$out/train_step_gpu.json"
python benchmarks/label_throughput.py --gpu --rows 64 --out "$out/label_throughput_gpu.json"
python benchmarks/classify_vs_generate.py --gpu --rows 64 --out "$out/classify_vs_generate_gpu.json"
