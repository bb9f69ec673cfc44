#!/usr/bin/env bash
# The offline demo: install, fine-tune the embedded SmolLM2-135M-Instruct on Captain Brine (CPU, minutes),
# compare base vs adapter on held-out dialogue, then chat in the terminal. Extra args go to `finetune demo`:
# `bash scripts/demo.sh --card persona_data/nettle` starts from a character card alone (synthetic dialogue first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/finetune demo "$@"
