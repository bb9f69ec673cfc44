#!/usr/bin/env bash
# The offline demo: install, fine-tune the embedded SmolLM2-135M-Instruct on Captain Brine (CPU, minutes),
# compare base vs adapter on held-out dialogue, then chat in the terminal. Extra args go to `finetune demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/finetune demo "$@"
