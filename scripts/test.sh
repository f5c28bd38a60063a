#!/usr/bin/env bash
# The README's test command: install the CPU torch wheel first (so no CUDA build is pulled), then the package, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
echo "fetching PEFT's own tests for the installed peft (its PyPI sdist, cached in .cache/peft-tests/)"; python tests/peft_tests.py
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
