#!/usr/bin/env bash
# Download the wheels the GPU check needs on the device machine into .wheels/ (ignored by git), for `carry`.
#
# The device machine (nvidia-h200: Python 3.12, torch 2.11+cu130, accelerate, transformers, safetensors, pyarrow,
# pandas, imageio, tensorboard ...; no network) lacks diffusers, bitsandbytes, av, datasets (+ dill, multiprocess),
# ftfy (+ wcwidth; WanPipeline's prompt cleaning calls it), ml_dtypes (bf16/fp8 numpy types of the checkpoint
# files' code), and may hold an older peft: their py3.12 manylinux
# x86_64 wheels travel with the call. Everything that travels (working tree + carried paths) must stay under 64 MiB:
#
#   av 18.1.0 (bundles FFmpeg)      ~34 MiB   needed by slice_ft.data / corpus (trainer row, CUDA tests)
#   diffusers 0.42.1                ~6.1 MiB  every row
#   bitsandbytes 0.50.2, trimmed    ~6.8 MiB  AdamW8bit rows; the 41 MiB wheel holds one CUDA library per toolkit
#                                             (cuda118..cuda132, ROCm, XPU): only cpu, cuda130 and cuda132 are kept
#                                             (torch there is built with CUDA 13.0), and RECORD is rewritten to match
#   peft, datasets, dill, multiprocess, ftfy, wcwidth, ml_dtypes   ~2.2 MiB together
#
# about 48 MiB in all, plus the ~1 MiB repository. torch is never carried (far too large): the code runs on the
# machine's torch 2.11. Nothing else is fetched here: `pip download --no-deps` of exactly these pinned files.
#
# Then the device call (one `run`, see BENCHMARKS.md "GPU"):
#   command:   bash benchmarks/gpu_check.sh
#   carry:     [".wheels"]
#   timeout_s: 540
# gpu_check.sh installs these offline into /tmp/site (pip --no-index --no-deps --target, torch untouched) and runs
# every row within 8 minutes, writing gpu_check.json, gpu_check.log and the tables under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.wheels}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# One version of each (two copies of a package stop the whole install there); pins = what the CPU tests run with.
PINS=(diffusers==0.42.1 bitsandbytes==0.50.2 av==18.1.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
      peft==0.21.2 ftfy==6.3.1 wcwidth==0.2.14 ml_dtypes==0.7.0)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${PINS[@]}"

# Trim bitsandbytes to the libraries torch+cu13 loads (cuda130; cuda132 for a newer torch; cpu as bitsandbytes'
# fallback), and rewrite its RECORD so the wheel stays consistent.
python3 - "$DEST" <<'PY'
import pathlib, sys, zipfile
dest = pathlib.Path(sys.argv[1])
for whl in dest.glob("bitsandbytes-*.whl"):
    drop = lambda n: "/libbitsandbytes_" in "/" + n and not n.endswith(("_cpu.so", "_cuda130.so", "_cuda132.so"))
    with zipfile.ZipFile(whl) as src:
        if not any(drop(n) for n in src.namelist()):
            continue  # already trimmed
        tmp = whl.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in src.infolist():
                if drop(info.filename):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = ("\n".join(l for l in lines if not drop(l.split(",")[0])) + "\n").encode()
                out.writestr(info, data)
    tmp.replace(whl)
PY

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
ls -la "$DEST"
echo "wheels: $((total / 1048576)) MiB, tracked files: $((repo / 1048576)) MiB; limit 64 MiB for both (plus untracked files)"
if [ $((total + repo)) -ge $((64 * 1048576)) ]; then
    echo "error: the wheels and the repository exceed the device's 64 MiB working-tree limit" >&2
    exit 1
fi
