#!/usr/bin/env bash
# Build .gpu-kit/: what the offline GPU machine (the `device` tool's H200) lacks to run the GPU tests and
# benchmarks. Its image has Python 3.12, torch, accelerate, triton, tokenizers and peft, but transformers
# 5.17 (we need 5.24: the model's `cache` argument was `past_key_values` before) and not bitsandbytes,
# liger-kernel, datasets, pydantic(-settings), python-dotenv, discord.py or the embedded SmolLM2 GGUF, and
# it cannot download anything. Run here after `bash scripts/install.sh` (it needs .venv and PyPI), then on
# the device:
#
#   carry: [".gpu-kit"]
#   command: bash bench/gpu_kit.sh --install && export PYTHONPATH=/tmp/site:$PWD && <your command>
#
# The serving benchmarks then take `--base-model .gpu-kit/smollm2-tokenizer` (tokenizer and chat template
# only: they write random 8B-shaped weights with `--random-shape llama-8b`). The runbook: bench/GPU.md.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-kit

if [[ "${1:-}" == "--install" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/*.whl
    tar -xzf "$KIT/smollm2-tokenizer.tar.gz" -C "$KIT"
    exit
fi

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/$KIT/" "$exclude" 2>/dev/null || echo "/$KIT/" >> "$exclude"
rm -rf "$KIT" && mkdir -p "$KIT"
# name every wheel: --no-deps fetches none of their needs (the image has numpy, pyarrow, pandas, ...)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$KIT" \
    bitsandbytes==0.50.2 liger-kernel datasets "dill<0.4.2" "multiprocess<0.70.20" pydantic pydantic-core \
    pydantic-settings annotated-types typing-inspection python-dotenv discord.py transformers==5.24.0 peft==0.21.2 \
    "regex>=2025.10.22"
# bitsandbytes for CUDA 13 (the image's torch) alone: its ROCm, XPU and CUDA 11-12 libraries are 36 of its
# 43 MB, and what travels to the device must stay under 64 MiB
python3 - "$KIT"/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
unused = re.compile(r"bitsandbytes/libbitsandbytes_(rocm|xpu|cuda1[12]).*[.]so")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if unused.fullmatch(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not unused.fullmatch(line.split(",")[0])).encode()
        dst.writestr(item, data)
slim.replace(wheel)
EOF
# the SmolLM2 tokenizer and chat template, as a folder `finetune.model.resolve` accepts (no weights)
.venv/bin/python - "$KIT/smollm2-tokenizer" <<'EOF'
import sys

from finetune.model import load_tokenizer, materialize, resolve
from transformers import AutoConfig

ref = resolve("smollm2")
load_tokenizer(ref).save_pretrained(sys.argv[1])
AutoConfig.from_pretrained(materialize(ref)).save_pretrained(sys.argv[1])
EOF
# compressed: the kit and the working tree must stay under the device's 64 MiB per call
tar -czf "$KIT/smollm2-tokenizer.tar.gz" -C "$KIT" smollm2-tokenizer && rm -r "$KIT/smollm2-tokenizer"
du -sb "$KIT"
