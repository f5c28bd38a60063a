"""The first GPU run, in one call: every CUDA path exercised and the Wan 14B low-VRAM table measured (issue 14).

On the device machine, one `run` of the device tool (BENCHMARKS.md "GPU" has the exact call):

    bash benchmarks/gpu_check.sh          # installs the carried .wheels/ offline, then: gpu_check.py --out $OUT

Here, before any GPU time is spent, the whole script at toy sizes (rows that need CUDA say "skipped: no CUDA"):

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check

Rows, most valuable first, each in its own process with its own timeout inside one time box (--budget_s, 450 s by
default, so the call ends within 8 minutes with the install), results rewritten after every row:

1. env          versions, the GPU, whether every carried package imports (what the other rows need)
2. cuda_tests   pytest tests/test_cuda.py: block swap with real streams, fp8, activation offload, AdamW8bit, bf16
                autocast in the slice layer, a tiny trainer run with every low-VRAM flag and a validation sample,
                exact resume
3. lowvram_14b  benchmarks/gpu_lowvram.py: peak VRAM and s/step of the real 14B layout at 480x832x81; rows in the
                order the targets need them (all swapped + offload, no swap, half swapped, LoRA, fp8, all swapped
                without offload), 1 warm-up + 1 timed step each (a 14B step takes seconds to tens of seconds)
4. train_step   benchmarks/bench_train_step.py --gpu: the slice step against the frozen base at 14B width, one block,
                up to 32,760 tokens (issue 16 adds --gpu; without it the row says "not available in this checkout")
5. fsdp2        benchmarks/gpu_fsdp.py: FSDP2 with 1 process, tiny and 1.3B layouts, per-rank peak against DDP (issue
                13 adds it; same rule)

Everything lands in --out (the device's $OUT brings back at most 8 files): gpu_check.json (every row: status,
reason, time, command, a summary of its result), gpu_check.log (all rows' output, one after the other),
lowvram_14b.md, train_step_gpu.json, fsdp_gpu.json. Render them into BENCHMARKS.md with

    python benchmarks/run_all.py --from-json benchmarks/results/cpu --gpu-results <folder holding those files>

A later call can rerun what ran out of time: `bash benchmarks/gpu_check.sh --only lowvram_14b --lowvram_rows 5,4`.
Exit status: 0 when every row that ran passed, 1 otherwise (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NEEDS_CUDA_REASON = "needs a CUDA device"  # tests/test_cuda.py's one allowed skip
# Measurement order of the 14B rows (gpu_lowvram.py's row numbers): the 12 GiB target, then the no-swap baseline the
# 1.3x and LoRA targets compare against, half swapped (1.3x), LoRA (memory), then the two rows that only inform.
LOWVRAM_ORDER = "3,1,2,6,5,4"
CARRIED = ("diffusers", "bitsandbytes", "av", "datasets", "peft", "ftfy", "ml_dtypes")  # what gpu_wheels.sh carries
PRESENT = ("torch", "accelerate", "transformers", "safetensors", "numpy", "PIL", "pyarrow", "yaml")


@dataclass(frozen=True)
class Row:
    name: str
    title: str
    timeout_s: float  # at most this long
    min_s: float  # not started with less left; also what earlier rows leave for it
    needs_cuda: bool = True


ROWS = (
    Row("env", "versions, GPU, carried packages import", 90, 10, needs_cuda=False),
    Row("cuda_tests", "pytest tests/test_cuda.py", 180, 30),
    Row("lowvram_14b", "Wan 14B low-VRAM table (gpu_lowvram.py)", 420, 60),
    Row("train_step", "slice step vs frozen base at 14B width (bench_train_step.py --gpu)", 150, 45),
    Row("fsdp2", "FSDP2, 1 process, per-rank peak vs DDP (gpu_fsdp.py)", 120, 30),
)
ROW_NAMES = tuple(r.name for r in ROWS)


# -- the env row (runs in its own process: --probe) --------------------------------------------------------------------
def probe(path: Path) -> int:
    """Write versions, file locations and a CUDA smoke (a bf16 matmul, a pinned copy) to `path`; exit 1 if a package
    the rows need does not import or CUDA does not work where it is available."""
    import importlib
    import platform

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "packages": {}, "missing": {}}
    for name in PRESENT + CARRIED:
        try:
            mod = importlib.import_module(name)
            info["packages"][name] = {"version": getattr(mod, "__version__", "?"), "file": getattr(mod, "__file__", "")}
        except Exception as e:  # noqa: BLE001 (any import failure is the finding)
            info["missing"][name] = f"{type(e).__name__}: {e}"[:300]
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if info["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                           "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
            a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
            ref = a.double() @ a.double()
            rel = ((a @ a).double() - ref).norm() / ref.norm()
            pinned = torch.randn(1 << 20).pin_memory()
            back = pinned.to("cuda", non_blocking=True).cpu()
            info["cuda_smoke"] = {"bf16_matmul_rel_err": float(rel), "pinned_round_trip_equal": bool(torch.equal(back, pinned))}
            if not (rel < 1e-2 and info["cuda_smoke"]["pinned_round_trip_equal"]):
                info["missing"]["cuda"] = f"CUDA smoke failed: {info['cuda_smoke']}"
    except Exception as e:  # noqa: BLE001
        info["missing"]["torch.cuda"] = f"{type(e).__name__}: {e}"[:300]
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"not available ({type(e).__name__})"
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info["cpu_count"] = os.cpu_count()
    path.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return 1 if info["missing"] else 0


# -- running rows ------------------------------------------------------------------------------------------------------
def run_process(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int | None, float]:
    """Run `cmd` in its own process group, its output appended to `log`; (exit status or None on timeout, seconds).
    On timeout the whole group (pytest's or gpu_lowvram's children too) is killed."""
    t0 = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"\n==== {shlex.join(cmd)}  (timeout {timeout:.0f} s)\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this Popen created, nothing else
            proc.wait()
            rc = None
        fh.write(f"==== exit status {rc if rc is not None else 'timeout'} after {time.monotonic() - t0:.1f} s\n")
    return rc, time.monotonic() - t0


def junit_summary(path: Path) -> dict:
    """Counts and each test's outcome (with skip reason or failure message) from pytest's --junitxml."""
    root = ET.parse(path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "")[:500]
                break
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


def markdown_rows(path: Path) -> list[dict]:
    """The rows of the first markdown table in `path` as dicts keyed by its header."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return []
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def available(script: str, flag: str | None = None) -> bool:
    """Whether this checkout has `script` (and, if given, the `flag` in its source): rows other issues add."""
    path = HERE / script
    return path.is_file() and (flag is None or f'"{flag}"' in path.read_text())


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        # scratch (junit xml, the probe's json), outside --out: $OUT brings back 8 files at most
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.log = self.out / "gpu_check.log"
        self.json = self.out / "gpu_check.json"
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                        TOKENIZERS_PARALLELISM="false")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (self.env.get("PYTHONPATH", ""), str(REPO)) if p)
        self.cuda = self._cuda_available() and not args.dry_run
        self.mode = "dry-run" if args.dry_run else "gpu" if self.cuda else "no-cuda"
        self.result = {"benchmark": "gpu_check", "mode": self.mode, "command": shlex.join(
            ["python", "benchmarks/gpu_check.py", *sys.argv[1:]]) if args.argv is None else shlex.join(
            ["python", "benchmarks/gpu_check.py", *args.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget_s, "rows": []}

    @staticmethod
    def _cuda_available() -> bool:
        try:
            import torch

            return torch.cuda.is_available()
        except Exception:  # noqa: BLE001 (no torch: the env row says why)
            return False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.result["wall_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.json.with_name(self.json.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(self.json)

    def record(self, row: Row, status: str, reason: str = "", **fields) -> dict:
        entry = {"name": row.name, "title": row.title, "status": status, "reason": reason, **fields}
        self.result["rows"].append(entry)
        self.save()
        line = f"[gpu_check] {row.name:<12} {status:<14} {fields.get('wall_s', 0):6.1f} s  {reason}"
        print(line, flush=True)
        return entry

    def timeout_for(self, row: Row, later: list[Row]) -> float:
        """What this row may spend: its own cap, and no more than leaves the later rows their minimum."""
        reserve = sum(r.min_s for r in later)
        return min(row.timeout_s, self.left() - reserve)

    # -- the rows --------------------------------------------------------------------------------------------------
    def run(self, rows: list[Row]) -> int:
        self.save()
        for k, row in enumerate(rows):
            later = [r for r in rows[k + 1:] if not (r.needs_cuda and not self.cuda and not self.args.dry_run)]
            if row.needs_cuda and not self.cuda and not self.args.dry_run:
                self.record(row, "skipped", "no CUDA", wall_s=0.0)
                continue
            timeout = self.timeout_for(row, later)
            if timeout < row.min_s:
                self.record(row, "skipped", f"time budget: {max(timeout, 0):.0f} s left for it, needs {row.min_s:.0f}",
                            wall_s=0.0)
                continue
            getattr(self, "row_" + row.name)(row, timeout)
        failed = [r["name"] for r in self.result["rows"] if r["status"] in ("failed", "timeout")]
        self.result["failed"] = failed
        self.save()
        print(self.summary(), flush=True)
        return 1 if failed else 0

    def row_env(self, row: Row, timeout: float) -> None:
        path = self.work / "env.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(path)]
        rc, wall = run_process(cmd, self.log, timeout, self.env)
        info = json.loads(path.read_text()) if path.exists() else {}
        self.result["env"] = info
        status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
        reason = "" if rc == 0 else "; ".join(f"{k}: {v}" for k, v in info.get("missing", {}).items())[:500]
        self.record(row, status, reason or ("" if rc == 0 else f"exit status {rc}"), wall_s=round(wall, 1),
                    timeout_s=round(timeout), command=shlex.join(cmd[1:]))

    def row_cuda_tests(self, row: Row, timeout: float) -> None:
        xml = self.work / "cuda_tests.xml"
        xml.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_cuda.py",
               f"--junitxml={xml}", f"--timeout={int(timeout)}"]
        rc, wall = run_process(cmd, self.log, timeout, self.env)
        summary = junit_summary(xml) if xml.exists() else {}
        counts = summary.get("counts", {})
        if rc is None:
            status, reason = "timeout", f"no result within {timeout:.0f} s"
        elif not counts:
            status, reason = "failed", f"pytest exit status {rc} without a report (collection error? see the log)"
        elif counts["failed"] or counts["error"]:
            status, reason = "failed", f"{counts}"
        else:
            # with CUDA nothing may skip; without it only the CUDA tests may, for exactly that reason (their CPU
            # variants still run and must pass)
            bad = [t["test"] for t in summary["tests"] if t["outcome"] == "skipped"
                   and (self.cuda or NEEDS_CUDA_REASON not in t["message"])]
            if bad:
                status, reason = "failed", f"skipped, which they may not: {bad}"
            elif counts["skipped"]:
                status = "skipped"
                reason = (f"no CUDA: {counts['skipped']} tests skipped ('{NEEDS_CUDA_REASON}'), "
                          f"{counts['passed']} CPU variants passed")
            else:
                status, reason = "passed", f"{counts['passed']} tests passed"
        self.record(row, status, reason, wall_s=round(wall, 1), timeout_s=round(timeout), rc=rc,
                    command=shlex.join(cmd[1:-2]), summary=summary)

    def row_lowvram_14b(self, row: Row, timeout: float) -> None:
        name = "lowvram_14b.md" if self.cuda else "lowvram_smoke.md"
        output = self.out / name
        cmd = [sys.executable, "benchmarks/gpu_lowvram.py", "--rows", self.args.lowvram_rows,
               "--budget_s", f"{timeout - 15:.0f}", "--output", str(output)]
        cmd += ["--steps", "1", "--warmup", "1"] if self.cuda else ["--smoke", "--steps", "1", "--warmup", "0"]
        rc, wall = run_process(cmd, self.log, timeout, self.env)
        rows = markdown_rows(output) if output.exists() else []
        measured = [r for r in rows if r.get("s/step", "") not in ("", "not run", "OOM", "timeout", "error")]
        status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
        reason = f"{len(measured)} of {len(rows)} rows measured"
        if rc not in (0, None):
            reason += f"; exit status {rc} (a row failed, timed out or was skipped: see its note)"
        self.record(row, status, reason, wall_s=round(wall, 1), timeout_s=round(timeout), rc=rc,
                    command=shlex.join(["python", *cmd[1:]]), outputs=[name], summary={"rows": rows})

    def _optional_row(self, row: Row, timeout: float, script: str, flag: str | None, output: str,
                      extra: list[str]) -> None:
        if not available(script, flag):
            self.record(row, "not available", f"not available in this checkout (no {script}"
                        + (f" with {flag}" if flag else "") + ")", wall_s=0.0)
            return
        if not self.cuda:
            self.record(row, "skipped", "no CUDA", wall_s=0.0)
            return
        path = self.out / output
        cmd = [sys.executable, f"benchmarks/{script}", *extra, "--output", str(path)]
        rc, wall = run_process(cmd, self.log, timeout, self.env)
        status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
        summary = None
        if path.exists():
            try:
                summary = json.loads(path.read_text())
            except ValueError:
                summary = None
        self.record(row, status, "" if rc == 0 else f"exit status {rc}" if rc is not None else
                    f"no result within {timeout:.0f} s", wall_s=round(wall, 1), timeout_s=round(timeout), rc=rc,
                    command=shlex.join(["python", *cmd[1:]]), outputs=[output] if path.exists() else [],
                    summary=summary)

    def row_train_step(self, row: Row, timeout: float) -> None:
        self._optional_row(row, timeout, "bench_train_step.py", "--gpu", "train_step_gpu.json", ["--gpu"])

    def row_fsdp2(self, row: Row, timeout: float) -> None:
        self._optional_row(row, timeout, "gpu_fsdp.py", None, "fsdp_gpu.json", [])

    def summary(self) -> str:
        lines = [f"gpu_check ({self.mode}) in {self.result['wall_s']:.0f} s of {self.args.budget_s:.0f}; "
                 f"results in {self.out}:"]
        for r in self.result["rows"]:
            lines.append(f"  {r['name']:<12} {r['status']:<14} {r.get('wall_s', 0):6.1f} s  {r['reason']}")
        return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="CPU, toy sizes: every row's plumbing runs, rows that need CUDA say 'skipped: no CUDA'")
    parser.add_argument("--budget_s", type=float, default=450,
                        help="seconds for all rows together (default 450: with the install, the call ends in 8 min)")
    parser.add_argument("--only", default=None, help=f"comma-separated rows to run, of {', '.join(ROW_NAMES)}")
    parser.add_argument("--lowvram_rows", default=LOWVRAM_ORDER,
                        help=f"gpu_lowvram.py rows in measurement order (default {LOWVRAM_ORDER})")
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)  # the env row's child
    args = parser.parse_args(argv)
    if args.probe is not None:
        return probe(args.probe)
    if not args.out:
        parser.error("--out is required when $OUT is not set (the device machine sets it)")
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ROW_NAMES)
    bad = [n for n in names if n not in ROW_NAMES]
    if bad:
        parser.error(f"--only names unknown rows {bad}; choose from {', '.join(ROW_NAMES)}")
    if args.budget_s <= 0:
        parser.error(f"--budget_s must be > 0, got {args.budget_s:g}")
    args.argv = argv
    return Check(args).run([r for r in ROWS if r.name in names])


if __name__ == "__main__":
    sys.exit(main())
