#!/usr/bin/env bash
# The README's test command: install the CPU torch wheel first (so no CUDA build is pulled), then the package, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip's own progress is shown: the first install downloads about 1 GB (torch, diffusers, transformers, ...)
echo "slice-ft: installing the CPU torch wheel (a few minutes on a fresh machine, seconds when already installed)"
python -m pip install --progress-bar on torch==2.13.0
echo "slice-ft: installing slice-ft with diffusers, transformers, peft, accelerate, datasets and the test tools"
python -m pip install --progress-bar on -e ".[test]"
echo "slice-ft: fetching PEFT's own tests for the installed peft (its PyPI sdist, cached in .cache/peft-tests/)"
python tests/peft_tests.py
echo "slice-ft: installed; starting the tests"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
