#!/usr/bin/env bash
# One short GPU check, for a session that is lent a GPU machine: real-size models built from their
# configs with random weights (no download). Writes JSON under $OUT (or benchmarks/results).
#   bash benchmarks/gpu_check.sh
# Sized for one H200 and 8 minutes in all, model builds included: every step has its own timeout
# (150 + 140 + 130 + 100 + 240 s), cut short so that none runs past the whole check's BUDGET_S (450 s);
# on an H200 (2026-12-04) steps 1-3 took 218 s (the whole check 255 s), step 4, run on its own, 85 s
# with its model build (its profiler pass is slow: 170,000 device events), and steps 2, 3 and 5 311 s
# (step 2 132 s, 106 s since the growing cache decodes without cuDNN; step 5 102 s, a minute of it compiling);
# steps 2 and 5 with step 5's three ways of compiling: 194 s (installing the wheels and checking the
# packages 40 s, step 2 68 s, step 5 86 s).
#   1. training: Qwen2.5-VL-3B LoRA in bf16, then QLoRA (skipped, with a note, without bitsandbytes),
#      batch 4, one 448x448 picture and a 1,400-token prompt per row: tokens/s, peak memory, loss
#   2. labelling: Qwen2-VL-2B, 16 rows at batch 1 / 8 / 32: rows/s (and ms per decoding step)
#   3. classification heads vs generation on the same backbone, 16 rows: rows/s
#   4. one labelling pass at batch 8 profiled: device kernel time against the host's (decode_profile.py)
#   5. labelling at batch 8 with a static decoding cache (mmllm label --static-cache), its decoding step
#      compiled each way (eager, the eager kernels as CUDA graphs, inductor), against the growing
#      cache: rows/s, the answers compared, and one profiled pass per way (copies and device time a step)
#   6. (only when asked: STEPS="6") listing_v1 at batch 8, this checkout against the code issue #16 was
#      filed against (wheels/against, from gpu_wheels.sh), alternately, two fresh `mmllm label` runs of each:
#      rows/s and the answers compared (label_throughput.py --against)
#   7. (only when asked: STEPS="7") the fusion recipe on the GPU (its text encoder tuned and its features
#      encoded there, with a small random text encoder from wheels/fusion) on 256 Amazon training rows, then
#      fusion_label_throughput.py on its folder: labelling rows/s with float32 and bf16 encoders
# STEPS="2 5" bash benchmarks/gpu_check.sh runs only those steps (default: 1-5).
# Wheels for what the GPU machine lacks (bitsandbytes, xgrammar and their deps) are fetched here by
# benchmarks/gpu_wheels.sh into wheels/ (ignored by git) and carried; without them QLoRA is skipped and
# the labelling steps generate unconstrained. A call carries 64 MiB at most and wheels/ holds ~64 (core
# 14, hf 24, plot 17, fusion 9, against 0.2): carry what the steps need, wheels/core wheels/hf
# wheels/against for steps 1-6, wheels/plot wheels/fusion for step 7.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MMLLM_CACHE="${TMPDIR:-/tmp}/mmllm-cache"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
BUDGET_S="${BUDGET_S:-450}"
STEPS=" ${STEPS:-1 2 3 4 5} "
start=$SECONDS

# step NUMBER SECONDS LABEL COMMAND...: run COMMAND for at most SECONDS (less if the budget is nearly
# spent), if NUMBER is in STEPS
step() {
  local number=$1 limit=$2 label=$3; shift 3
  if [[ "$STEPS" != *" $number "* ]]; then
    echo "== $label: not in STEPS"
    return
  fi
  local left=$((BUDGET_S - (SECONDS - start)))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "== $label: skipped, ${left}s of the ${BUDGET_S}s budget left"
    return
  fi
  echo "== $label (at most ${limit}s; $((SECONDS - start))s elapsed): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "!! $label: stopped after ${limit}s"
  elif ((rc != 0)); then
    echo "!! $label: exit $rc"
  fi
  echo "== $label: $((SECONDS - t0))s"
}

# Wheels carried from a machine with the registries (benchmarks/gpu_wheels.sh), installed into folders
# of their own: wheels/core (bitsandbytes, xgrammar) always; wheels/hf (transformers, peft, accelerate
# at the locked versions) only where they import beside this machine's torch, else its own copies.
site="${TMPDIR:-/tmp}/mmllm-gpu-site"
install() {  # install FOLDER: the wheels of wheels/FOLDER into $site/FOLDER
  rm -rf "${site:?}/$1"
  timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/$1" wheels/"$1"/*.whl
}
if ls wheels/core/*.whl >/dev/null 2>&1; then
  if install core; then export PYTHONPATH="$PYTHONPATH:$site/core"; else echo "!! wheels/core: install failed"; fi
fi
if ls wheels/hf/*.whl >/dev/null 2>&1; then
  if install hf && PYTHONPATH="$site/hf:$PYTHONPATH" python3 -c \
      "import peft, accelerate, transformers; from transformers import AutoModelForImageTextToText; import mmllm.label" 2>"$site/hf.err"; then
    export PYTHONPATH="$site/hf:$PYTHONPATH"
    echo "wheels/hf: the locked transformers / peft / accelerate are used"
  else
    echo "!! wheels/hf: not used, this machine's own copies are (the import failed: $(tail -1 "$site/hf.err" 2>/dev/null))"
  fi
fi
if ls wheels/plot/*.whl >/dev/null 2>&1 && ! python3 -c "import matplotlib" 2>/dev/null; then
  if install plot; then export PYTHONPATH="$PYTHONPATH:$site/plot"; else echo "!! wheels/plot: install failed"; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - <<'EOF'
import importlib
import accelerate, torch, transformers, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "accelerate", accelerate.__version__)
without = {"bitsandbytes": "QLoRA is skipped", "xgrammar": "generation runs unconstrained",
           "flash_attn": "attention runs on SDPA"}
for name, consequence in without.items():
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "installed"))
    except Exception as error:  # not there, or there but unusable (a library it needs is missing)
        print(name, f"unusable ({type(error).__name__}: {error}): {consequence}")
EOF

step 1 150 "train step" python3 benchmarks/train_step.py --gpu --models qwen2_5_vl_3b --modes lora qlora \
  --steps 3 --batch 4 --image-side 448 --out "$out/train_step_gpu.json"
step 2 140 "labelling throughput" python3 benchmarks/label_throughput.py --gpu --rows 16 \
  --out "$out/label_throughput_gpu.json"
step 3 130 "classify vs generate" python3 benchmarks/classify_vs_generate.py --gpu --rows 16 --max-new-tokens 64 \
  --out "$out/classify_vs_generate_gpu.json"
step 4 100 "decode profile" python3 benchmarks/decode_profile.py --gpu --rows 8 --batch 8 \
  --out "$out/decode_profile_gpu.json"
step 5 240 "static cache" python3 benchmarks/label_throughput.py --gpu --static-cache --profile --rows 16 \
  --out "$out/label_throughput_static_gpu.json"
against="${TMPDIR:-/tmp}/mmllm-against"
if [[ "$STEPS" == *" 6 "* ]]; then
  rm -rf "$against" && mkdir -p "$against"
  for archive in wheels/against/*.tar.gz; do [[ -e "$archive" ]] && tar -xzf "$archive" -C "$against"; done
fi
step 6 240 "against the code of issue #16" python3 benchmarks/label_throughput.py --gpu --against "$against" \
  --rows 16 --against-runs 2 --out "$out/label_throughput_against_gpu.json"
fusion="${TMPDIR:-/tmp}/mmllm-gpu-fusion"
rm -rf "$fusion"
step 7 240 "the fusion recipe and its labelling on the GPU" bash -c "python3 -m mmllm.finetune \
  --config finetune/fusion_minilm_cpu.yaml fusion.text_encoder=wheels/fusion/text_encoder data.max_train_rows=256 \
  train.output_dir=$fusion/model && python3 benchmarks/fusion_label_throughput.py --model $fusion/model --rows 2000 \
  --out $out/fusion_label_throughput_gpu.json"
echo "== gpu_check done in $((SECONDS - start))s; results in $out"
