#!/usr/bin/env bash
# The README's demo command: install the CPU torch wheel first (so no CUDA build is pulled), then the package, then
# train the tiny embedded Wan on a generated corpus (configs/demo.yaml). Extra flags override the config.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
export WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python train_slice_ft.py --config configs/demo.yaml "$@"
