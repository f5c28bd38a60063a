#!/usr/bin/env bash
# The GPU check in one call of the device tool (issue 14): install the carried wheels offline, then run every row.
#
#   device run:  command   bash benchmarks/gpu_check.sh
#                carry     [".wheels"]          (made here first by: bash benchmarks/gpu_wheels.sh)
#                timeout_s 540
#
# The wheels go to /tmp/site with pip --no-index --no-deps --target (torch and the machine's other packages are
# never touched) and lead PYTHONPATH. Then benchmarks/gpu_check.py runs its rows within --budget_s (450 s), writing
# gpu_check.json, gpu_check.log (this install's output first) and the tables to $OUT. Extra arguments go to
# gpu_check.py (e.g. --only lowvram_14b --lowvram_rows 5,4 for a rerun). --dry-run skips the install (CPU machines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY=$(command -v python3 || command -v python)
if [[ " $* " != *" --dry-run "* ]] && compgen -G ".wheels/*.whl" >/dev/null; then
    echo "==== pip install of the carried wheels: $(ls .wheels | tr '\n' ' ')" | tee -a "$OUT/gpu_check.log"
    t0=$(date +%s)
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .wheels/*.whl >>"$OUT/gpu_check.log" 2>&1; then
        echo "pip install failed (see gpu_check.log); the env row reports what does not import" | tee -a "$OUT/gpu_check.log"
    fi
    echo "==== installed in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu_check.log"
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
