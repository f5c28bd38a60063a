"""The GPU section of BENCHMARKS.md: what benchmarks/gpu_check.py brought back from the device, with issue 14's
targets judged met or missed from the numbers (run_all.py calls this; nothing here measures).

    python benchmarks/run_all.py --gpu-results DIR     # DIR: the device call's files (gpu_check.json, ...)

copies the GPU results into benchmarks/results/gpu/ (kept in git; a rerun's rows are merged in, so a second call
that measured only the rows the first one missed completes the table) and re-renders BENCHMARKS.md from the saved
CPU and GPU results. Until then the section lists every row with "not yet measured" and the command that measures it.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
GPU_RESULTS_DIR = HERE / "results" / "gpu"
CHECK, LOWVRAM, TRAIN_STEP, FSDP = "gpu_check.json", "lowvram_14b.md", "train_step_gpu.json", "fsdp_gpu.json"
GPU_FILES = (CHECK, LOWVRAM, TRAIN_STEP, FSDP)

# gpu_lowvram.py's row labels the targets read
ROW_NO_SWAP, ROW_HALF, ROW_ALL_OFFLOAD, ROW_LORA = (
    "slice", "slice + block swap", "slice + block swap (all) + activation offload",
    "LoRA baseline (equal trainable weights)")
PEAK, STEP = "peak VRAM (GiB)", "s/step"
TOKENS_14B = 32760  # 480x832x81 through the Wan VAE and the 1x2x2 patch: 21 x 30 x 52

DEVICE_CALL = ("device `run`: command `bash benchmarks/gpu_check.sh`, carry `[\".wheels\"]`, timeout_s `540` "
               "(first, here: `bash benchmarks/gpu_wheels.sh`)")


# -- reading ---------------------------------------------------------------------------------------------------------
def table_rows(text: str) -> list[dict]:
    """The rows of the first markdown table in `text`, as dicts keyed by its header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return []
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def measured_on_a_gpu(table: str) -> bool:
    """A gpu_lowvram.py table from a CUDA device (not a smoke, plan or CPU run's)."""
    import gpu_lowvram

    gpu = [line for line in table.splitlines() if line.startswith("- GPU: ")]
    return bool(gpu) and not gpu[0].startswith("- GPU: none") and gpu_lowvram.NOT_MEASURED not in table


def _number(cell: str | None) -> float | None:
    try:
        return float(str(cell).replace(",", ""))
    except (TypeError, ValueError):
        return None


# -- importing a device call's files ---------------------------------------------------------------------------------
def _merge_lowvram(old: str, new: str) -> str:
    """`new`'s table with the rows it did not measure taken from `old` (an earlier call of the same check)."""
    old_rows = {r.get("run"): r for r in table_rows(old)}
    lines = new.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    keys = [c.strip() for c in lines[header].strip().strip("|").split(" | ")]
    out = lines[:header + 2]
    labels = set()
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            continue
        row = dict(zip(keys, [c.strip() for c in line.strip().strip("|").split(" | ")]))
        labels.add(row["run"])
        if _number(row.get(STEP)) is None and _number(old_rows.get(row["run"], {}).get(STEP)) is not None:
            row = old_rows[row["run"]]
        out.append("| " + " | ".join(row.get(k, "") for k in keys) + " |")
    out += ["| " + " | ".join(r.get(k, "") for k in keys) + " |" for label, r in old_rows.items() if label not in labels]
    return "\n".join(out) + "\n"


def _merge_check(old: dict, new: dict) -> dict:
    """`new`'s rows, plus `old`'s rows that `new` skipped or did not run."""
    merged = dict(new)
    rows = {r["name"]: r for r in old.get("rows", [])}
    for r in new.get("rows", []):
        if r["status"] not in ("skipped",) or r["name"] not in rows:
            rows[r["name"]] = r
    merged["rows"] = list(rows.values())
    merged["calls"] = old.get("calls", [old.get("date")]) + [new.get("date")]
    return merged


def import_gpu_results(src: Path, dest: Path | None = None) -> list[str]:
    """Copy a GPU check's files from `src` into `dest` (default benchmarks/results/gpu/), merging with an earlier
    call's; the names copied.

    Raises ValueError (naming the fix) when `src` holds no GPU check files or holds a dry run's (toy sizes)."""
    src = Path(src)
    present = [name for name in GPU_FILES if (src / name).is_file()]
    if not present:
        raise ValueError(f"{src} holds none of {', '.join(GPU_FILES)}: pass the folder the device call's files "
                         "landed in (its files_at)")
    if CHECK in present:
        mode = json.loads((src / CHECK).read_text()).get("mode")
        if mode != "gpu":
            raise ValueError(f"{src / CHECK} is from a {mode!r} run, not a GPU run: its numbers are toy sizes or "
                             "nothing; run benchmarks/gpu_check.sh on a CUDA machine")
    if LOWVRAM in present and not measured_on_a_gpu((src / LOWVRAM).read_text()):
        raise ValueError(f"{src / LOWVRAM} was not measured on a GPU (its '- GPU:' line says none)")
    dest = Path(dest) if dest is not None else GPU_RESULTS_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for name in present:
        new, old = src / name, dest / name
        if name == LOWVRAM and old.exists():
            text = _merge_lowvram(old.read_text(), new.read_text())
        elif name == CHECK and old.exists():
            text = json.dumps(_merge_check(json.loads(old.read_text()), json.loads(new.read_text())), indent=1)
        else:
            shutil.copyfile(new, old)
            continue
        old.write_text(text)
    return present


# -- targets (issue 14, point 4) -------------------------------------------------------------------------------------
def lowvram_targets(rows: list[dict]) -> list[list[str]]:
    """[target, measured, verdict] for the three targets the 14B table decides (no rows: none measured yet)."""
    by = {r.get("run"): r for r in rows}

    def cell(label, key):
        return by.get(label, {}).get(key, "absent")

    def value(label, key):
        return _number(cell(label, key))

    def unknown(*needs) -> str:
        if not rows:
            return "not yet measured"
        return "not measured (" + ", ".join(f"{label}: {cell(label, key)}" for label, key in needs) + ")"

    out = []
    peak = value(ROW_ALL_OFFLOAD, PEAK)
    out.append(["all 40 blocks swapped (39 of 40 streamed) with activation offload: peak < 12 GiB",
                f"{peak:.2f} GiB" if peak is not None else unknown((ROW_ALL_OFFLOAD, PEAK)),
                "—" if peak is None else common.verdict(peak < 12, f"{peak:.2f} GiB ≥ 12 GiB")])
    half, none = value(ROW_HALF, STEP), value(ROW_NO_SWAP, STEP)
    ratio = half / none if half is not None and none else None
    out.append(["20 blocks swapped: step ≤ 1.3× the no-swap step",
                f"{ratio:.2f}× ({half:.2f} s vs {none:.2f} s)" if ratio is not None else
                unknown((ROW_HALF, STEP), (ROW_NO_SWAP, STEP)),
                "—" if ratio is None else common.verdict(ratio <= 1.3, f"{ratio:.2f}× > 1.3×: the copies of 20 "
                                                         "blocks do not hide behind their compute")])
    sp, lp = value(ROW_NO_SWAP, PEAK), value(ROW_LORA, PEAK)
    out.append(["slice peak memory ≤ LoRA's at equal trainable weights",
                f"{sp:.2f} vs {lp:.2f} GiB" if sp is not None and lp is not None else
                unknown((ROW_NO_SWAP, PEAK), (ROW_LORA, PEAK)),
                "—" if sp is None or lp is None else common.verdict(sp <= lp, f"+{sp - lp:.2f} GiB over LoRA")])
    return out


def train_step_target(data: dict | None) -> list[str]:
    """[target, measured, verdict] for the slice step against the frozen base at 14B size, read from the GPU
    train-step result (issue 16's `bench_train_step.py --gpu`): the slice row at the most tokens (32,760 wanted)
    with its ratio to the frozen base (`x_frozen_wall`, as the CPU results record it)."""
    target = "slice step ≤ 1.02× the frozen base at 14B width, 32,760 tokens"
    if not data:
        return [target, "not measured (no GPU train-step result)", "—"]
    best = None
    for r in data.get("rows", []):
        if r.get("method") != "slice" and not str(r.get("name", "")).startswith("slice"):
            continue
        tokens = r.get("tokens") or data.get("setup", {}).get("tokens")
        ratio = r.get("x_frozen_wall")
        ratio = ratio.get("median") if isinstance(ratio, dict) else ratio
        if isinstance(tokens, (int, float)) and isinstance(ratio, (int, float)) and (
                best is None or tokens > best[0]):
            best = (int(tokens), float(ratio), r.get("name", "slice"))
    if best is None:
        return [target, f"not read: {TRAIN_STEP} has no slice row with `tokens` and `x_frozen_wall` (see the file)",
                "—"]
    tokens, ratio, name = best
    note = "" if tokens >= TOKENS_14B else f" (largest measured: {tokens:,} tokens, not 32,760)"
    return [target, f"{ratio:.3f}× ({name}, {tokens:,} tokens){note}",
            common.verdict(ratio <= 1.02 and tokens >= TOKENS_14B,
                           "over 1.02×" if ratio > 1.02 else "not measured at 32,760 tokens")]


# -- the section -----------------------------------------------------------------------------------------------------
def _plan_table() -> str:
    import gpu_lowvram

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        out = Path(tmp) / "lowvram.md"
        gpu_lowvram.main(["--plan_only", "--output", str(out)])
        return out.read_text()


def _load_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def section(results: Path | None = None, title: str = "## GPU (issue 6)") -> str:
    """The GPU section from `results` (a folder of GPU check files, or a gpu_lowvram.py table; default
    benchmarks/results/gpu/), or the rows to measure and the one call that measures them."""
    results = Path(results) if results is not None else GPU_RESULTS_DIR
    folder = results if results.is_dir() or not results.suffix else results.parent
    table_path = results if results.suffix == ".md" else folder / LOWVRAM
    check = _load_json(folder / CHECK) if results.suffix != ".md" else None
    train = _load_json(folder / TRAIN_STEP) if results.suffix != ".md" else None
    fsdp_exists = results.suffix != ".md" and (folder / FSDP).is_file()
    table = table_path.read_text() if table_path.is_file() else ""
    measured = bool(table) and measured_on_a_gpu(table)
    if not measured:
        table = _plan_table()
    # the table's own title goes; so do the lines about a run, when nothing ran
    skip = ("# ",) if measured else ("# ", "- command:", "- GPU:", "- versions:")
    body = "\n".join(line for line in table.splitlines() if not line.startswith(skip))
    text = [
        title,
        "",
        "Low-VRAM training of the real Wan 14B layout: peak VRAM and s/step for `--blocks_to_swap` 0, 20, 39 and an "
        "fp8 base, against a PEFT LoRA of equal trainable weights; the slice step against the frozen base at 14B "
        "width; FSDP2's per-rank peak; and `tests/test_cuda.py`, every CUDA path (side-stream block swap, pinned "
        "copies, fp8, activation offload, AdamW8bit, bf16 autocast in the slice layer, validation, exact resume).",
        "",
        "**One call measures all of it**, `benchmarks/gpu_check.py` (rows in their own processes, most valuable "
        "first, inside an 8-minute time box; a dry run on CPU proves it first: `python benchmarks/gpu_check.py "
        f"--dry-run --out /tmp/gpu_check`): {DEVICE_CALL}. Then `python benchmarks/run_all.py --gpu-results DIR` "
        "(DIR: where the call's files landed) puts the results here and judges the targets. The 14B rows get one "
        "warm-up and one timed step each (a step takes seconds to tens of seconds), in the order the targets need "
        "them; a second call can measure what the first did not reach: `bash benchmarks/gpu_check.sh --only "
        "lowvram_14b --lowvram_rows 5,4`.",
        "",
        "With gradient checkpointing, autograd keeps every block's input until backward: 40 x 32,760 tokens x 5,120 "
        "x 2 bytes = 12.5 GiB, more than the 12 GiB target on its own. So the all-swapped target row also keeps those "
        "inputs in pinned CPU memory (`--gradient_checkpointing_cpu_offload`); the row after it shows the same run "
        "without.",
        "",
    ]
    if check:
        env = check.get("env", {})
        gpu = env.get("gpu", {})
        text += [f"GPU check of {check.get('date', '?')}: {gpu.get('name', '?')} ({gpu.get('memory_gib', '?')} GiB), "
                 f"Python {env.get('python', '?')}, torch {env.get('packages', {}).get('torch', {}).get('version', '?')}"
                 f" (CUDA {env.get('torch_cuda', '?')}); `{check.get('command', '')}`; {check.get('wall_s', '?')} s.",
                 "",
                 common.md_table(["row", "status", "time", "result"],
                                 [[r["name"], r["status"], f"{r.get('wall_s', 0):.0f} s", r.get("reason", "")]
                                  for r in check.get("rows", [])]),
                 ""]
        tests = next((r.get("summary", {}).get("tests") for r in check.get("rows", [])
                      if r["name"] == "cuda_tests" and r.get("summary")), None)
        if tests:
            text += ["`tests/test_cuda.py` on the GPU:", "",
                     common.md_table(["test", "outcome", "time", "message"],
                                     [[t["test"].split("::")[-1], t["outcome"], f"{t['seconds']:.1f} s",
                                       t["message"].splitlines()[0][:200] if t["message"] else ""] for t in tests]),
                     ""]
    targets = lowvram_targets(table_rows(table) if measured else []) + [train_step_target(train)]
    if not measured and not train:
        targets = [[t[0], "not yet measured", "—"] for t in targets]
    text += [body.strip(), "", "Targets (issue 14):", "", common.md_table(["target", "measured", "verdict"], targets)]
    if train:
        text += ["", f"The GPU train-step sweep's full result: `benchmarks/results/gpu/{TRAIN_STEP}`."]
    if fsdp_exists:
        text += ["", f"FSDP2 per-rank peak against DDP: `benchmarks/results/gpu/{FSDP}`."]
    if not measured:
        text += [
            "",
            "**Not yet measured**: no GPU was lent to the tasks that wrote this report; the script above is ready "
            "and dry-run on CPU by the tests. The mechanisms are proven on CPU by `tests/test_offload.py`: block swap "
            "gives the same outputs and gradients as no swap and computes only on loaded copies; activation offload "
            "frees every block input before backward and keeps gradients identical; bitsandbytes AdamW8bit steps "
            "under block swap match the unswapped run and its 8-bit state never moves; fp8 storage stays within "
            "e4m3's rounding bounds. The CUDA side stream, pinned copies and events have not run on a GPU yet.",
        ]
    return "\n".join(text) + "\n"
