"""Shared benchmark machinery: interleaved timing in one worker process per configuration, peak memory, headers.

Every configuration of a table runs in its own spawned worker process, so its peak memory is its own (a process'
high-water mark cannot be shared or undone). The parent interleaves the workers: repeat r runs each configuration's
timed steps in turn (in a fresh random order every repeat), so drift of the machine (thermal, other load) hits every
configuration alike. Ratios are taken per repeat against the baseline measured in the same repeat.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks run as scripts from anywhere; the packages live at the repo root
    sys.path.insert(0, str(REPO))

MB = 1024 * 1024


# -- memory -------------------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process' resident high-water mark (Linux: clear_refs 5); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or the last `reset_peak_rss` (VmHWM; else ru_maxrss)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return kb / 1024


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


def run_timed(cmd: list[str], env=None) -> tuple[float, str]:
    """Run a command to completion; (wall seconds, stdout+stderr tail). Raises on failure.

    No peak memory here on purpose: a child's ru_maxrss (wait4) starts from the parent's own high-water mark,
    which the kernel records when the child execs out of the parent's (v)forked memory. A child that must report
    its peak reads its own VmHWM instead.
    """
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    text = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{text[-3000:]}")
    return wall, text[-2000:]


# -- statistics ---------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """Median and range of a sample."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values) -> "Summary":
        values = [float(v) for v in values]
        return cls(statistics.median(values), min(values), max(values), len(values))

    def fmt(self, digits: int = 3, unit: str = "") -> str:
        return f"{self.median:.{digits}f}{unit} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"

    def as_dict(self) -> dict:
        return {"median": self.median, "min": self.lo, "max": self.hi, "n": self.n}


# -- workers ------------------------------------------------------------------------------------------------------
def _timed(step, n: int) -> list[tuple[float, float]]:
    times = []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def _prepare(setup: Callable, spec: dict):
    rss_start = rss_mb()
    step, info = setup(spec)
    info = {"rss_start_mb": rss_start, "rss_ready_mb": rss_mb(), **(info or {})}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info["cuda_ready_mb"] = torch.cuda.memory_allocated() / MB
    return step, info


def _warm(step, n: int) -> dict:
    """Warm-up calls; returns the first call's rise of the resident high-water mark over the RSS before it: in a
    fresh process (nothing freed yet for the allocator to reuse) that is the call's peak of new memory, i.e. a
    training step's activations, gradients and first optimizer state."""
    rss0 = rss_mb()
    reset_peak_rss()
    first_rise = None
    for k in range(n):
        step()
        if k == 0:
            first_rise = peak_rss_mb() - rss0
    reset_peak_rss()  # the peak is over timed calls only; setup's transient copies are not the step's cost
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    return {"first_call_rss_rise_mb": first_rise}


def _memory() -> dict:
    """This process's peak and current RSS, and where CUDA is in use its peak and current allocated memory."""
    import torch

    out = {"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB
        out["cuda_mb"] = torch.cuda.memory_allocated() / MB
    return out


def tensor_peak_mb(step) -> float:
    """The peak rise of the memory tensors hold during one `step()` (MB), summed from the profiler's allocation
    events: on the CPU the counterpart of `torch.cuda.max_memory_allocated`, exact and free of the C allocator's
    reuse and trimming, which the RSS high-water mark includes."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak / MB


def _profile(step, n: int) -> dict:
    """Self CPU milliseconds and calls per step of each op over `n` profiled steps."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    return {e.key: (e.self_cpu_time_total / n / 1000, e.count / n) for e in prof.key_averages()}


def profile_summary(results: dict, config: str, baseline: str) -> dict | None:
    """The JSON profile entry of a benchmark: total self-CPU ms per step of both, and the ops `config` adds."""
    if config not in results or baseline not in results:
        return None
    return {"config": config, "baseline": baseline,
            "ms_per_step_self_cpu": {n: sum(v[0] for v in results[n].profile.values()) for n in (baseline, config)},
            "extra_ops": profile_diff(results[config].profile, results[baseline].profile)}


def profile_diff(profile: dict, baseline: dict, top: int = 12) -> list[tuple[str, float, float]]:
    """The ops a configuration spends the most extra self-CPU time on, vs the baseline: (op, +ms/step, +calls)."""
    keys = set(profile) | set(baseline)
    rows = [(k, profile.get(k, (0, 0))[0] - baseline.get(k, (0, 0))[0],
             profile.get(k, (0, 0))[1] - baseline.get(k, (0, 0))[1]) for k in keys]
    return sorted(rows, key=lambda r: -r[1])[:top]


def _worker_main(conn, setup: Callable, spec: dict, threads: int):
    """Worker loop: build the configuration, then answer ("warmup", n) and ("run", n) (n (wall, CPU) pairs)."""
    try:
        import torch

        torch.set_num_threads(threads)
        step, info = _prepare(setup, spec)
        conn.send(("ready", info))
        while True:
            cmd, arg = conn.recv()
            if cmd == "warmup":
                conn.send(("warm", _warm(step, arg)))
            elif cmd == "run":
                conn.send(("times", _timed(step, arg)))
            elif cmd == "profile":
                conn.send(("profile", _profile(step, arg)))
            elif cmd == "memory":
                conn.send(("memory", _memory()))
            elif cmd == "tensor_peak":
                conn.send(("tensor_peak", tensor_peak_mb(step)))
            else:
                conn.send(("bye", None))
                return
    except BaseException:
        conn.send(("error", traceback.format_exc()))


class _ProcessWorker:
    """One configuration in its own spawned process (its own peak memory)."""

    def __init__(self, ctx, name, setup, spec, threads):
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, setup, spec, threads), daemon=True)
        self.proc.start()

    def _ask(self, msg=None):
        if msg is not None:
            self.conn.send(msg)
        kind, payload = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"configuration {self.name!r} failed:\n{payload}")
        return payload

    def ready(self) -> dict:
        return self._ask()

    def warmup(self, n: int):
        return self._ask(("warmup", n))

    def run(self, n: int):
        return self._ask(("run", n))

    def profile(self, n: int):
        return self._ask(("profile", n))

    def tensor_peak(self) -> float:
        return self._ask(("tensor_peak", None))

    def memory(self) -> dict:
        return self._ask(("memory", None))

    def close(self):
        try:
            self.conn.send(("stop", None))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


class _InlineWorker:
    """Smoke mode: the configuration in this process (no spawn, no imports to pay again); memory is not its own."""

    def __init__(self, name, setup, spec):
        self.name = name
        self.step, self.info = _prepare(setup, spec)

    def ready(self) -> dict:
        return self.info

    def warmup(self, n: int):
        return _warm(self.step, n)

    def run(self, n: int):
        return _timed(self.step, n)

    def profile(self, n: int):
        return _profile(self.step, n)

    def tensor_peak(self) -> float:
        return tensor_peak_mb(self.step)

    def memory(self) -> dict:
        return _memory()

    def close(self):
        self.step = None


@dataclass
class Result:
    """One configuration's measurements: per repeat, per call, (wall seconds, process CPU seconds)."""

    name: str
    times: list[list[tuple[float, float]]] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)

    def per_repeat(self, clock: str = "wall") -> list[float]:
        k = 0 if clock == "wall" else 1
        return [statistics.median(c[k] for c in t) for t in self.times]

    def summary(self, clock: str = "wall") -> Summary:
        k = 0 if clock == "wall" else 1
        return Summary.of([c[k] for t in self.times for c in t])


# glibc returns freed memory to the kernel (munmap of large blocks, heap trimming) by rules that adapt to the
# allocation pattern, so two configurations doing the same matmuls can differ by 5-8 % in page faults alone (measured:
# unmerged-slice inference at 192 tokens 1.08x the base with glibc's defaults, 1.00x with these). Every worker runs
# with the same fixed rules: blocks up to 32 MiB come from the heap, and the heap is not trimmed.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}


def run_interleaved(setup: Callable, specs: dict[str, dict], *, repeats: int, calls: int, warmup: int = 1,
                    threads: int = 1, inline: bool = False, profile: tuple = (), profile_steps: int = 2,
                    tensor_peak: tuple = (), log=print) -> dict[str, Result]:
    """Time `step()` of each configuration, interleaved; one spawned worker per configuration, all alive together.

    `setup(spec) -> (step, info)` runs in the worker (it must be a module-level function). Each of `repeats`
    rounds runs `calls` timed calls of every configuration, in a fresh random order each round. `inline=True` runs
    every configuration in this process instead (smoke runs: seconds, but no per-configuration memory). The
    configurations named in `profile` are then profiled op by op (after the memory is read: the profiler allocates),
    and those in `tensor_peak` get one more call whose peak of tensor memory goes in `memory["tensor_peak_mb"]`.
    """
    ctx = mp.get_context("spawn")
    workers = {}
    results = {name: Result(name) for name in specs}
    saved_env = {k: os.environ.get(k) for k in ALLOCATOR_ENV}
    try:
        os.environ.update(ALLOCATOR_ENV)  # read by each spawned worker's C library when it starts
        for name, spec in specs.items():  # all start together: their imports overlap; timing waits for all
            workers[name] = (_InlineWorker(name, setup, spec) if inline
                             else _ProcessWorker(ctx, name, setup, spec, threads))
        for name, worker in workers.items():
            results[name].info = worker.ready()
        for name, worker in workers.items():  # one at a time: warm-up steps must not fight each other for the cores
            results[name].info.update(worker.warmup(warmup) or {})
        log(f"  ready: {', '.join(workers)}")
        names = list(specs)
        for r in range(repeats):
            # a fresh random order each round: a configuration's time depends a little on which one ran just before
            # it (caches, freed memory); rotating a fixed order kept the same neighbours (measured: unmerged-slice
            # inference 1.07x the base when it always followed the base, 1.01-1.02x in another order)
            order = random.Random(r).sample(names, len(names))
            for name in order:
                results[name].times.append(workers[name].run(calls))
            log(f"  repeat {r + 1}/{repeats}: " + ", ".join(
                f"{n} {results[n].per_repeat()[-1] * 1e3:.0f} ms" for n in names))
        for name, worker in workers.items():
            results[name].memory = worker.memory()
        for name in tensor_peak:
            results[name].memory["tensor_peak_mb"] = workers[name].tensor_peak()
        for name in profile:
            results[name].profile = workers[name].profile(profile_steps)
    finally:
        for worker in workers.values():
            worker.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


def ratio_summary(results: dict[str, Result], name: str, baseline: str, clock: str = "wall") -> Summary:
    """Per-repeat ratio of medians (same repeat, so same machine state), summarised over the repeats."""
    a, b = results[name].per_repeat(clock), results[baseline].per_repeat(clock)
    return Summary.of([x / y for x, y in zip(a, b)])


def median_ci(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of `values` (per-round figures): whether a difference of a percent
    is the method's or the round-to-round spread's. Seeded, so a re-render gives the same interval."""
    values = [float(v) for v in values]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    cut = round((1 - level) / 2 * resamples)
    return medians[cut], medians[resamples - 1 - cut]


# -- headers and output -------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Machine, versions and commit: enough to know whether two tables are comparable."""
    import diffusers
    import peft
    import torch

    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        mem_gb = float("nan")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def command_line() -> str:
    """This script's command line, relative to the repo root when possible."""
    argv = list(sys.argv)
    try:
        argv[0] = os.path.relpath(os.path.abspath(argv[0]), REPO)
    except ValueError:
        pass
    return shlex.join(["python", *argv])


LAYOUT_KEYS = ("num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim", "num_layers")  # a result's "layout"


def write_result(path, benchmark: str, smoke: bool, **fields) -> None:
    """A benchmark's JSON result: its name, whether it was a smoke run, this command line and machine, then `fields`."""
    write_json(path, {"benchmark": benchmark, "smoke": smoke, "command": command_line(), "machine": machine_info(),
                      **fields})


def write_json(path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    os.replace(tmp, path)


def verdict(ok: bool, why: str = "") -> str:
    """A target cell: "met", or "missed — why"."""
    return "met" if ok else f"missed — {why}" if why else "missed"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def select_rows(specs: dict, only, always: tuple, parser) -> dict:
    """The rows `--only` names (comma-separated) plus the `always` rows (baselines), in table order."""
    if not only:
        return specs
    keep = {*always, *[s.strip() for s in only.split(",") if s.strip()]}
    unknown = keep - set(specs)
    if unknown:
        parser.error(f"--only names unknown rows {sorted(unknown)}; the rows are {list(specs)}")
    return {n: s for n, s in specs.items() if n in keep}


def quiet_warnings() -> None:
    """Silence library warnings that repeat every step (SHiRA's sparse-tensor note) and would flood the logs."""
    import warnings

    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")  # inherited by spawned workers


def base_arg_parser(description: str, rows: bool = True):
    """Flags every benchmark script takes: --smoke (seconds-long sizes), --output (its JSON result), ...;
    `rows=True` adds --only, for tables whose rows can be measured one at a time against their baseline."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes: runs in seconds; checks the script, not speed.")
    parser.add_argument("--output", required=True, help="Where to write the JSON result (read by run_all.py).")
    parser.add_argument("--repeats", type=int, default=None, help="Interleaved rounds (default: per benchmark).")
    if rows:
        parser.add_argument("--only", default=None,
                            help="Comma-separated row names to measure (with the baseline they are compared to).")
    # One thread by default: on a shared machine a descheduled OpenMP thread stalls every parallel region, which
    # measured as 2-10x swings with 2 threads while other jobs ran; ratios of compute are what the tables compare.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per configuration.")
    return parser


# -- shared Wan models and methods --------------------------------------------------------------------------------
# The Linear layers of the transformer blocks: LoRA's and SHiRA's targets (the slice targets every block parameter).
BLOCK_LINEARS = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"
METHODS = ("frozen", "slice", "lora", "shira", "full")


def wan_layout(name: str = "wan2.1-t2v-1.3b", **overrides) -> dict:
    """A published Wan config with some entries replaced (e.g. `num_layers=2`)."""
    from slice_adapter.wan_configs import wan_config

    return {**wan_config(name), **overrides}


def build_wan(config: dict, seed: int = 0):
    """A float32 `WanTransformer3DModel` with deterministic random weights."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config)


def wan_inputs(config: dict, latent_shape, text_len: int, seed: int = 1) -> dict:
    """Random latents (B, C, F, H, W), a mid-range timestep and a text embedding of `text_len` tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batch = latent_shape[0]
    return dict(
        hidden_states=torch.randn(*latent_shape, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text_len, config["text_dim"], generator=g),
    )


def block_linear_rank_cost(model) -> int:
    """Trainable weights per unit of LoRA/SHiRA rank on the block Linears: sum of in + out."""
    import re

    from torch import nn

    return sum(m.in_features + m.out_features for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and re.fullmatch(BLOCK_LINEARS, n))


def equal_rank(model, trainable: int) -> int:
    """The LoRA/SHiRA rank whose trainable count is closest to `trainable` (at least 1)."""
    return max(1, round(trainable / block_linear_rank_cost(model)))


def apply_method(model, method: str, *, fraction: float = 1e-3, rank: int = 1, slice_id: int = 0,
                 adapter_name: str = "default", seed: int = 0, target_modules=None) -> list:
    """Make `model` trainable the way `method` does; returns the trainable parameters.

    frozen: nothing trainable (the caller asks for input gradients); slice: a SliceConfig over every block
    parameter (or `target_modules`); lora/shira: PEFT on the block Linears with rank `rank` (LoRA alpha = rank, so scale 1); full: every
    block parameter.
    """
    import peft

    import slice_adapter  # noqa: F401  (registers the SLICE type)
    from slice_adapter import SliceConfig

    model.requires_grad_(False)
    if method == "slice":
        model.add_adapter(SliceConfig(fraction=fraction, slice_id=slice_id, target_modules=target_modules),
                          adapter_name=adapter_name)
    elif method == "lora":
        import torch

        with torch.random.fork_rng(devices=[]):  # LoRA's A init draws from the global RNG: seed it, or a pool
            torch.manual_seed(seed)               # worker's earlier jobs would decide it
            model.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=BLOCK_LINEARS),
                              adapter_name=adapter_name)
    elif method == "shira":
        model.add_adapter(peft.ShiraConfig(r=rank, target_modules=BLOCK_LINEARS, random_seed=seed),
                          adapter_name=adapter_name)
    elif method == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("blocks."))
    elif method != "frozen":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return [p for p in model.parameters() if p.requires_grad]
