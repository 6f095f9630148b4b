#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh, fetched HERE (where the package registries can be reached) for a
# GPU machine that has none: Python 3.12, x86-64 Linux, CUDA 13. Versions are those of constraints.txt,
# so the GPU check runs the library versions the tests run. Written to wheels/ (ignored by git).
#   bash benchmarks/gpu_wheels.sh
# Two sets, which gpu_check.sh installs into separate folders on the PYTHONPATH:
#   wheels/core: what the GPU machine lacks outright (bitsandbytes for QLoRA, xgrammar for constrained
#                decoding, and their needs). bitsandbytes is slimmed to its CUDA 13 and CPU libraries
#                (43 -> 7 MiB; its other CUDA and ROCm builds are of no use there).
#   wheels/hf:   transformers, peft, accelerate and the hub client at the locked versions; gpu_check.sh
#                uses them only if they import there, else the machine's own copies, and says which.
#   wheels/against: mmllm/ and prompts/ at ba0d89d (git archive), the code issue #16 was filed against,
#                for gpu_check.sh's step 6 (not wheels, but carried the same way).
#   wheels/plot: matplotlib and its needs (a recipe draws its training curves), installed there only when
#                the machine's Python has no matplotlib; for step 7.
#   wheels/fusion/text_encoder: a small random BERT (2 layers of 64) with MiniLM's tokenizer, for step 7's
#                fusion recipe (the bundled MiniLM is 87 MiB, past what a call carries).
set -euo pipefail
cd "$(dirname "$0")/.."
CORE="bitsandbytes xgrammar apache-tvm-ffi pydantic pydantic_core annotated-types typing-inspection typing-extensions"
HF="transformers tokenizers huggingface-hub hf-xet httpx2 httpcore2 truststore h11 idna anyio accelerate peft safetensors typer"
PLOT="matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pin() {  # the locked version of a package, from constraints.txt (names compared as pip does)
  local want
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  while IFS='=' read -r name _ version; do
    if [[ "$(echo "$name" | tr 'A-Z_.' 'a-z--')" == "$want" ]]; then echo "$version"; return; fi
  done < <(grep -E '^[A-Za-z0-9_.-]+==' constraints.txt)
  echo "gpu_wheels: $1 is not in constraints.txt" >&2; return 1
}

fetch() {  # fetch FOLDER PACKAGE...
  local folder=$1; shift
  mkdir -p "$folder"
  local args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$folder")
  for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
  for name in "$@"; do
    python3 -m pip download -q "${args[@]}" "$name==$(pin "$name")" 2>&1 | grep -v '^WARNING: Location' || true
    ls "$folder" | grep -qi "^$(echo "$name" | tr '-' '_')-" || { echo "gpu_wheels: no wheel for $name" >&2; exit 1; }
  done
}

rm -rf wheels/core wheels/hf wheels/plot
fetch wheels/core $CORE
fetch wheels/hf $HF
fetch wheels/plot $PLOT

# bitsandbytes: keep the CUDA 13 and CPU libraries only, and drop the others from the wheel's RECORD
python3 - <<'EOF'
import re, zipfile
from pathlib import Path

wheel = next(Path("wheels/core").glob("bitsandbytes-*.whl"))
slim = wheel.with_suffix(".slim")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not drop.search(line.split(b",")[0].decode()))
        dst.writestr(item, data)
slim.replace(wheel)
print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB after slimming")
EOF
# the code issue #16 was filed against (its throughput point's "today"), for gpu_check.sh's step 6
rm -rf wheels/against && mkdir -p wheels/against
git archive --format=tar.gz -o wheels/against/ba0d89d.tar.gz ba0d89d mmllm prompts
# a small random text encoder with MiniLM's tokenizer, for gpu_check.sh's step 7 (the fusion recipe)
rm -rf wheels/fusion && mkdir -p wheels/fusion
"${PYTHON:-.venv/bin/python}" - <<'EOF'
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from mmllm.models.fusion.encoders import _resolve

tokenizer = AutoTokenizer.from_pretrained(_resolve("minilm"))
torch.manual_seed(0)
BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128)).save_pretrained("wheels/fusion/text_encoder")
tokenizer.save_pretrained("wheels/fusion/text_encoder")
EOF
du -sh wheels/core wheels/hf wheels/plot wheels/against wheels/fusion
