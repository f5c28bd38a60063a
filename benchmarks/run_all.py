"""Regenerate BENCHMARKS.md and its plots: every benchmark, then one report.

    python benchmarks/run_all.py                    # the full run (35-40 minutes on 2 busy CPU cores)
    python benchmarks/run_all.py --smoke            # seconds-long sizes, written to a temp folder (CI)
    python benchmarks/run_all.py --only merge       # re-measure some sections, keep the others' results
    python benchmarks/run_all.py --only decode      # PyAV against torchcodec: from a venv with torchcodec only
    python benchmarks/run_all.py --from-json benchmarks/results/cpu   # re-render from the saved JSON results
    python benchmarks/run_all.py --gpu-results DIR  # after the GPU check (gpu_check.sh): its files into the report
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("train_step", "train_depth", "step_parts", "inference", "merge", "plan", "quality", "decode")
# full-size runs measure these only when named: torchcodec loads beside a CUDA build of torch only, so its comparison runs from a venv that
# has one (`--only decode`); a run without it would replace the measured comparison with PyAV alone
ON_REQUEST = ("decode",)
SCRIPTS = {"train_step": "bench_train_step.py", "train_depth": "bench_train_step.py",
           "step_parts": "bench_step_parts.py", "inference": "bench_inference.py",
           "merge": "bench_merge.py", "plan": "bench_plan.py", "quality": "quality.py", "decode": "bench_decode.py"}
EXTRA_ARGS = {"train_depth": ["--depth"]}
RESULTS_DIR = HERE / "results" / "cpu"  # the JSON behind BENCHMARKS.md
QUALITY_PLOT = "quality_loss_curves.png"
TRAIN_PLOT = "train_step.png"
SWEEP_PLOT = "train_step_sweep.png"


def have_matplotlib() -> bool:
    """Plots need matplotlib (the `bench` extra); without it the report is written without them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# -- running --------------------------------------------------------------------------------------------------------
def run_benchmarks(names, json_dir: Path, plots_dir: Path, smoke: bool) -> dict:
    """Full runs: one subprocess per benchmark (its own imports and memory); a failure is reported and the rest
    still run. Smoke: in this process (one import), and any failure raises: that is what CI is for."""
    failed = {}
    for name in names:
        out = json_dir / f"{name}.json"
        argv = ["--output", str(out)] + EXTRA_ARGS.get(name, []) + (["--smoke"] if smoke else [])
        if name == "quality" and have_matplotlib():
            argv += ["--plot", str(plots_dir / QUALITY_PLOT)]
        print(f"== {name}: {SCRIPTS[name]} {shlex.join(argv)}", flush=True)
        t0 = time.perf_counter()
        if smoke:
            module = __import__(SCRIPTS[name][:-3])
            module.main(argv)
        else:
            proc = subprocess.run([sys.executable, str(HERE / SCRIPTS[name]), *argv])
            if proc.returncode != 0:
                failed[name] = f"`{SCRIPTS[name]}` exited with status {proc.returncode} (see the run's log)"
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return failed


# -- formatting -----------------------------------------------------------------------------------------------------
def _x(summary: dict, digits: int = 2) -> str:
    """A ratio summary as '1.02× (0.98–1.07)'."""
    return f"{summary['median']:.{digits}f}× ({summary['min']:.{digits}f}–{summary['max']:.{digits}f})"


def _s(summary: dict) -> str:
    """A time summary in the unit that reads best."""
    m = summary["median"]
    scale, unit = (1e3, "ms") if m < 1 else (1, "s")
    d = 0 if scale == 1e3 and m * scale >= 100 else 1 if scale == 1e3 else 2
    return f"{m * scale:.{d}f} {unit} ({summary['min'] * scale:.{d}f}–{summary['max'] * scale:.{d}f})"


def _n(n) -> str:
    return "—" if n is None else f"{n:,}"


def _cmd(script: str, only: str | None = None, extra: str = "") -> str:
    only_arg = f" --only {shlex.quote(only)}" if only else ""
    return f"`python benchmarks/{script}{only_arg} --output /tmp/{script[:-3]}.json{extra}`"


def _verdicts(targets, why: dict) -> str:
    """The row's targets as 'name: met' / 'name: missed — why'."""
    out = []
    for name, ok, measured in targets:
        out.append(f"{name}: **met** ({measured})" if ok else f"{name}: **missed** ({measured}) — {why.get(name, '')}")
    return "<br>".join(out) if out else "—"


def _ms(x: float) -> str:
    return f"{x:.1f} ms"


# -- sections -------------------------------------------------------------------------------------------------------
def _profile_note(data: dict) -> tuple[str, str]:
    """(one-line cause, markdown table) from a benchmark's profile of a slice row against its baseline."""
    prof = data.get("profile")
    if not prof:
        return "", ""
    config, baseline = prof["config"], prof["baseline"]
    # only ops the slice calls more often: an op with the same count is the base's own work, timed a bit apart
    extra = [(op, ms, calls) for op, ms, calls in prof["extra_ops"] if ms > 0 and calls > 0]
    rows = [[f"`{op}`", f"+{ms:.1f}", f"{calls:+.0f}"] for op, ms, calls in extra]
    totals = prof["ms_per_step_self_cpu"]
    top = ", ".join(f"`{op}`" for op, _, _ in extra[:3])
    total = sum(ms for _, ms, _ in extra)
    cause = f"slice ops +{total:.0f} ms per call (most: {top}; table below), the rest Python dispatch of its layers"
    table = common.md_table(["op (self CPU time)", f"extra ms per call vs {baseline}", "extra calls per call"], rows)
    table += (f"\n\nSelf CPU time of all ops per call: {baseline} {totals[baseline]:.0f} ms, {config} "
              f"{totals[config]:.0f} ms (one profiled run of 2 calls after the timing, so these totals are noisier "
              "than the table's timings; a call's time beyond its ops is Python and autograd dispatch, which the "
              "op table does not show).")
    return cause, table


SWEEP_WHY = {
    "step ≤ 1.05× frozen": "the tiles' gradient (one batched matmul over each sliced Linear's input) and, in the "
                           "default slice, the gradients of norm weights and `scale_shift_table`: tokens x width "
                           "reductions and products in every block (compare the Linear-only row)",
    "step ≤ LoRA's": "the Linear-only row's costs (see it), and the default slice also trains norms and "
                     "`scale_shift_table`, whose gradients need tokens x width reductions and products in every "
                     "block, which a LoRA of the Linears never computes (the Linear-only row is the like-for-like "
                     "comparison)",
    "activation memory ≤ 1.1× frozen": "what the Linear-only slice keeps (see its row): the products of "
                                       "`scale_shift_table` and the norm weights with activations keep only the "
                                       "columns the slice holds (`slice_adapter/saved_columns.py`; before, 7 tokens "
                                       "x width activations per block, 1.43× frozen at 192 tokens)",
    "unmerged ≤ 1.03× base": "a fixed cost per sliced layer and call (writing the tiles into the weight and back, "
                             "the patched norm weights, Python dispatch), felt most by short clips; merge the slice "
                             "for inference",
}


# the Linear-only slice trains what a LoRA of the Linears trains: where it reads slower, it is by the spread
LINEAR_ONLY_WHY = {
    "step ≤ LoRA's": "two costs a LoRA does not pay, felt by short clips and timed part by part in \"What the "
                     "slice's step pays that LoRA's does not\" below: backward makes the inputs that a norm or gelu "
                     "made again for the tiles' gradient (the FFN's hidden activation for ffn.net.2: a tanh GELU over "
                     "tokens x FFN width per block) instead of keeping them as LoRA does, the time the activation "
                     "target costs (LoRA keeps them: see the activation column); and the tiles' own gradient per "
                     "sliced Linear and call (a batched matmul over the held segments and its gathers), which a "
                     "short step feels most. Writing the tiles into the weight and back is not told apart from "
                     "nothing there",
    "step ≤ 1.05× frozen": "inside this machine's round-to-round spread (see the min–max ranges): the tiles' gradient "
                           "is one batched matmul over each Linear's input",
    "activation memory ≤ 1.1× frozen": "the tiles' gradient reads the input of each sliced Linear; backward "
                                       "recomputes those a block's norms feed from the norm's input and the FFN's "
                                       "hidden activation from gelu's (`slice_adapter/recompute.py`), except where "
                                       "the norm's input carries no gradient (the first block's q/k/v input, kept "
                                       "whole: one tokens x width tensor); LoRA's A gradient keeps every input it "
                                       "reads (see its row)",
}


# compiled: what differs from eager (`slice_adapter/patched_weight.py`, `slice_ft/compile.py`)
COMPILED_WHY = {
    "step ≤ 1.05× frozen": "the sliced Linears' matmuls run as custom ops on the patched weight, as eager runs them "
                           "(`slice_adapter/patched_weight.py`), which the compiler cannot fuse with what surrounds "
                           "them, and the tiles' gradient is one batched matmul more per Linear",
    "activation memory ≤ 1.1× frozen": "a compiled block keeps what the frozen base's keeps (`slice_ft/compile.py`), "
                                       "and the FFN's hidden activation is made again a chunk of tokens at a time "
                                       "(`slice_adapter/layer.py`); but the held-columns rule for norm and "
                                       "modulation products (`slice_adapter/saved_columns.py`) is eager-only, so the "
                                       "default slice keeps those products whole (LoRA: see its row)",
}


def _why(label: str, compiled: bool = False) -> dict:
    why = {**SWEEP_WHY, **LINEAR_ONLY_WHY} if label.startswith("slice Linear-only") else dict(SWEEP_WHY)
    return {**why, **COMPILED_WHY} if compiled else why


def _rounds(repeats) -> str:
    """Rounds of a sweep: one number, or per token count (`{"192": 15, ...}`)."""
    if isinstance(repeats, dict):
        return " / ".join(f"{n} ({int(t):,} tokens)" for t, n in sorted(repeats.items(), key=lambda kv: int(kv[0])))
    return str(repeats)


def section_train_sweep(sweep: dict, plots_rel: str | None) -> tuple[str, list]:
    """The token sweep: per token count and eager/compiled, each row's ratio to its baseline in the same rounds."""
    lay = sweep["layout"]
    summary, rows = [], []
    for r in sweep["rows"]:
        mode = "compiled" if r["compiled"] else "eager"
        label = r["name"] + (f" (r={r['rank']})" if r.get("rank") else "")
        if r["mode"] != "infer":
            for t in r["targets"]:
                summary.append((f"Training step sweep ({mode})", f"{label} @ {r['tokens']:,} tokens", *t,
                                _why(label, r["compiled"]).get(t[0], "")))
        else:
            for t in r["targets"]:
                summary.append(("Inference sweep", f"{label} @ {r['tokens']:,} tokens", *t, SWEEP_WHY.get(t[0], "")))
        act = r.get("activation_mb")
        ax = r.get("activation_x_frozen")
        rss_x = r.get("rss_rise_x_frozen")
        rows.append([f"{r['tokens']:,}", mode, label, _n(r["trainable"]) if r["mode"] != "infer" else "—",
                     _s(r["wall_s"]), _x(r["x_base_wall"]), _x(r["x_base_cpu"]),
                     _x(r["x_lora_wall"]) if r.get("x_lora_wall") else "—",
                     "—" if act is None else f"{act:.0f} MB", "—" if ax is None else f"{ax:.2f}×",
                     "—" if rss_x is None else f"{rss_x:.2f}×", _verdicts(r["targets"], _why(label, r["compiled"]))])
    device = sweep.get("device", "cpu")
    text = [
        f"### Training step and inference against clip size ({device.upper()})",
        "",
        f"Wan layout {lay['num_attention_heads']} heads × {lay['attention_head_dim']}, ffn {lay['ffn_dim']}, "
        f"{lay['num_layers']} block(s), text {sweep['text_len']} tokens; slices at fraction {sweep['fraction']:g} "
        "(*slice*: every block parameter, norms and `scale_shift_table` included; *slice Linear-only*: the block "
        "Linears only); LoRA and SHiRA at the rank of equal trainable weights. Per token count the eager rows run "
        "interleaved with their own frozen base (and the two inference rows with each other), the compiled rows "
        "(each block's forward under torch.compile, as `--compile`) with their own compiled frozen base, "
        f"{_rounds(sweep['repeats'])} rounds after {sweep['warmup']} warm-up call(s), {sweep['threads']} thread(s), "
        "each configuration in its own process with the same fixed glibc allocator rules (`common.ALLOCATOR_ENV`: "
        "otherwise page faults from the allocator's adaptive trimming differ by configuration). "
        "*× baseline*: the frozen step (training rows) or the base forward (inference rows). *activation*: "
        + ("the step's peak of memory held by tensors above what is held between steps (activations and "
           "gradients), summed from the profiler's allocation events over one step after the timing: the CPU's "
           "counterpart of `torch.cuda.max_memory_allocated`, exact and free of the C allocator's reuse. *RSS rise*: "
           "the first call's rise of the process's resident high-water mark, as measured before (it adds the "
           "allocator's behaviour and the first optimizer state; compiled rows built their kernels first: —)."
           if device == "cpu" else "peak allocated minus allocated before the step.")
        + " Wall ratios swing with the machine's other load (see the min–max ranges and the load average in the "
        "header); the CPU-time column is steadier.",
        "",
        common.md_table(["tokens", "mode", "configuration", "trainable", "time", "× baseline (wall)",
                         "× baseline (CPU)", "× LoRA (wall)", "activation", "activation × frozen",
                         "RSS rise × frozen", "targets"], rows),
    ]
    if plots_rel:
        text += ["", f"![ratio to the frozen base against tokens]({plots_rel}/{SWEEP_PLOT})"]
    text += ["", "Commands: `python benchmarks/bench_train_step.py --sweep-only --output /tmp/train_step.json` "
             "(`--tokens 192,768,3072`, `--no-compile`); with a GPU lent: `python benchmarks/bench_train_step.py "
             "--gpu --output /tmp/train_step_gpu.json` (14B width, one block, bf16 autocast, up to 32,760 tokens)."]
    return "\n".join(text), summary


def section_train_depth(depth: dict) -> tuple[str, list]:
    """The depth check: the default slice's extra over the Linear-only slice and LoRA, at two depths."""
    lay = depth["layout"]
    compiled_tokens = sorted({r["tokens"] for r in depth["rows"] if r.get("compiled")})
    by = {(r["blocks"], r["tokens"], r.get("compiled", False), r["name"]): r for r in depth["rows"]}
    summary, rows, notes = [], [], []
    for r in depth["rows"]:
        if not r["name"].startswith("slice"):
            continue
        compiled = r.get("compiled", False)
        label = f"{r['name']} @ {r['tokens']:,} tokens, {r['blocks']} blocks" + (", compiled" if compiled else "")
        lin = by.get((r["blocks"], r["tokens"], compiled, "slice Linear-only"))
        extra = (r["x_base_wall"]["median"] - lin["x_base_wall"]["median"]) if lin and r is not lin else None
        for t in r["targets"]:
            if t[0] == "step ≤ LoRA's" or (compiled and t[0] == "activation memory ≤ 1.1× frozen"):
                summary.append((f"Training step depth ({'compiled' if compiled else 'eager'})", label, *t,
                                _why(r["name"], compiled).get(t[0], "")))
        prof = r.get("profile") if extra is not None else None
        ops = "—"
        if prof:
            ms = prof["ms_per_step_self_cpu"]
            ops = f"{ms[prof['config']] / ms[prof['baseline']]:.3f}×"
            top = ", ".join(f"{op} {d:+.0f} ms ({round(n):+d} calls)" for op, d, n in prof["extra_ops"][:3])
            notes.append(f"{r['blocks']} blocks, {r['tokens']:,} tokens{', compiled' if compiled else ''}: "
                         f"{ms[prof['config']]:.0f} against "
                         f"{ms[prof['baseline']]:.0f} ms; most of the difference in {top}")
        act = r.get("activation_x_frozen")
        rows.append([r["name"] + (" (compiled)" if compiled else ""), r["blocks"], f"{r['tokens']:,}",
                     _x(r["x_base_wall"]), _x(r["x_base_cpu"]), _x(r["x_lora_wall"]),
                     "—" if extra is None else f"{extra:+.3f}", ops, "—" if act is None else f"{act:.3f}×"])
    text = [
        "### Training step against depth (CPU)",
        "",
        f"The sweep's layout ({lay['num_attention_heads']} heads × {lay['attention_head_dim']}, ffn {lay['ffn_dim']}, "
        f"text {depth['text_len']} tokens) with {' and '.join(str(b) for b in depth['blocks'])} blocks, eager"
        + (f" (and compiled at {', '.join(f'{t:,}' for t in compiled_tokens)} tokens)" if compiled_tokens else "")
        + ", slices "
        f"at fraction {depth['fraction']:g}, LoRA at the rank of equal trainable weights; per depth and token count "
        f"the rows run interleaved with their own frozen base, {_rounds(depth['repeats'])} rounds. The default "
        "slice trains norms and `scale_shift_table` too: their gradients need tokens × width reductions and "
        "products in every block, which neither the Linear-only slice nor a LoRA computes. In the first block the "
        "modulation's gradient reads attn1's q/k/v input gradient, which nothing else there needs: the slice asks "
        "q/k/v only for the columns it holds (`slice_adapter/modulation.py`; before, that block paid three tokens "
        "× width × width matmuls more, a share that fell as blocks were added). Their products with activations keep "
        "only the held columns of those activations for backward (`slice_adapter/saved_columns.py`), which backward "
        "fills out with zeros again. *default − Linear-only*: what the extra targets cost, in units of the frozen "
        "step. *tensor peak*: the step's peak of tensor memory over the frozen base's (as in the sweep); a compiled "
        "block keeps what the frozen base's keeps, and its backward makes the FFN's hidden activation again a chunk "
        "of tokens at a time for the tiles' gradient (`slice_adapter/layer.py`).",
        "",
        common.md_table(["configuration", "blocks", "tokens", "× frozen (wall)", "× frozen (CPU)", "× LoRA (wall)",
                         "default − Linear-only", "op time: default ÷ Linear-only", "tensor peak × frozen"], rows),
    ]
    if notes:
        text += ["", "*op time*: the self-CPU time of all ops in one step, profiled over 2 steps after the timing in "
                 "the same processes. It swings too (an op both configurations call equally often can differ by "
                 "~10 % between the two processes), so the extra calls say more than the totals. Per step, default "
                 "slice against Linear-only slice:", ""] + [f"- {n}" for n in notes]
    text += ["", "Command: `python benchmarks/bench_train_step.py --depth --output /tmp/train_depth.json`."]
    return "\n".join(text), summary


def section_step_parts(parts: dict) -> str:
    """What the Linear-only slice's step pays that LoRA's does not, part by part (timing only)."""
    lay = parts["layout"]
    rows = []
    for r in parts["rows"]:
        saves, ci = r.get("saves_x_lora"), r.get("saves_ci95")
        rows.append([r["name"], f"{r['tokens']:,}", r.get("removes") or "— (the baseline)", _s(r["wall_s"]),
                     _x(r["x_lora_wall"], 3), _x(r["x_lora_cpu"], 3), "—" if saves is None else f"{saves:+.3f}",
                     f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "—"])
    rounds = sorted({(r["tokens"], r["repeats"]) for r in parts["rows"]})
    text = [
        "### What the slice's step pays that LoRA's does not (CPU, timing only)",
        "",
        f"The sweep's layout ({lay['num_attention_heads']} heads × {lay['attention_head_dim']}, ffn {lay['ffn_dim']}, "
        f"{lay['num_layers']} block(s), text {parts['text_len']} tokens), eager, the Linear-only slice at fraction "
        f"{parts['fraction']:g} against LoRA of equal trainable weights: the step whole, then with one part of the "
        "slice's code left out at a time, every row in the same rounds, each in its own process "
        f"({', '.join(f'{n} rounds at {t:,} tokens' for t, n in rounds)}, {parts['threads']} thread(s)). "
        "A row with a part left out computes something else (matmuls on the base weight without the tiles, zero "
        "gradients for the slice): it says what that part costs and is never a way to train; *inputs kept* is one "
        "(it keeps each sliced Linear's input as LoRA does: LoRA's activation memory, see the sweep). *saves*: per "
        "round, the whole slice's step minus the row's over that round's LoRA step, the median over the rounds; "
        "*95 % interval*: the bootstrap interval of that median (an interval that holds 0: a part this machine does "
        "not tell apart from none).",
        "",
        common.md_table(["configuration", "tokens", "left out", "time", "× LoRA (wall)", "× LoRA (CPU)", "saves",
                         "saves: 95 % interval"], rows),
        "",
        "Command: `python benchmarks/bench_step_parts.py --output /tmp/step_parts.json` (`--tokens 192,768`).",
    ]
    return "\n".join(text)


def plot_train_sweep(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict = {}
    for r in sweep["rows"]:
        if r["name"] in ("frozen", "infer base"):
            continue
        key = r["name"] + (" (compiled)" if r["compiled"] else "")
        series.setdefault(key, []).append((r["tokens"], r["x_base_wall"]["median"]))
    for key, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="--" if "compiled" in key else "-",
                label=key)
    ax.axhline(1.05, color="tab:red", lw=0.8, ls=":", label="1.05× target")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("× frozen step (inference rows: × base forward)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_loader(loader: dict, sweep: dict | None) -> str:
    """The input pipeline's clips per second for one Wan 14B-sized clip, beside the training step's consumption."""
    frames, height, width = loader["clip"]
    rows = [[r["num_workers"], "spread over the clip" if r["frame_stride"] is None else
             f"--frame_stride {r['frame_stride']} (mid-clip, " + ("seek)" if r.get("seek", True) else
                                                                 "decoded from frame 0)"),
             f"{r['clips_per_s']:.2f}", f"{1 / r['clips_per_s']:.2f} s"] for r in loader["rows"]]
    step = None
    if sweep:
        eager = [r for r in sweep["rows"] if r["name"] == "slice" and not r["compiled"]]
        if eager:
            big = max(eager, key=lambda r: r["tokens"])
            step = (big["tokens"], big["wall_s"]["median"])
    text = [
        f"### Input pipeline: {width}x{height}x{frames} clips",
        "",
        f"`BucketedLoader` decoding mp4s of {loader['source_frames']} frames to {frames} frames at {width}x{height} "
        "(PyAV; batch size 1; `num_workers` DataLoader workers decode ahead, 0 = in the training process).",
        "",
        common.md_table(["num_workers", "frames taken", "clips/s", "s per clip"], rows),
        "",
        "Workers overlap decoding with the training step; they do not make one decode faster, so where every core "
        "is busy (as on this shared 2-core machine) they cannot raise clips/s. The seek skips decoding up to the "
        "keyframe before a clip's first frame: it saves most on long videos, and nothing on a clip shorter than "
        "the encoder's keyframe interval (libx264: 250 frames), whose only keyframe is frame 0. Each frame is "
        "converted to RGB with one thread (`to_ndarray(format=\"rgb24\", threads=1)`): FFmpeg's threaded "
        "conversion of one frame at a time cost about 7 ms a frame more on this busy CPU, for the same pixels. "
        "PyAV against torchcodec (what `datasets`' Video feature decodes with): section 5.",
    ]
    if step:
        text += ["", f"The training step consumes one clip per step: on this CPU a slice step at {step[0]:,} tokens "
                 f"took {step[1]:.1f} s (sweep above), so the loader keeps up where s per clip is below that; a "
                 "Wan 14B step at 32,760 tokens on a GPU takes seconds to tens of seconds (not measured here: run "
                 "the `--gpu` sweep), against which the in-process decode time above is what the GPU would wait "
                 "for per step without workers."]
    return "\n".join(text)


def section_train_step(data: dict, plots_rel: str | None) -> tuple[str, list]:
    sweep_text, sweep_summary = ("", [])
    if data.get("sweep"):
        sweep_text, sweep_summary = section_train_sweep(data["sweep"], plots_rel)
    if data.get("loader"):
        sweep_text += ("\n\n" if sweep_text else "") + section_loader(data["loader"], data.get("sweep"))
    if "setup" not in data:  # a sweep-only run
        return "## 1. Training step\n\n" + sweep_text, sweep_summary
    text, summary = _section_train_fixed(data, plots_rel)
    return text + ("\n\n" + sweep_text if sweep_text else ""), summary + sweep_summary


def _section_train_fixed(data: dict, plots_rel: str | None) -> tuple[str, list]:
    st = data["setup"]
    lay = st["layout"]
    rows_by = {r["name"]: r for r in data["rows"]}
    cause, prof_table = _profile_note(data)
    summary = []
    rows = []
    for r in data["rows"]:
        why = {}
        if r["method"] == "slice":
            lora = rows_by.get(f"lora {r['name'].split()[1]}")
            why["step ≤ 1.05× frozen"] = cause or "see the profile"
            if lora:
                lora_x = lora["x_frozen_wall"]["median"]
                why["step ≤ LoRA's"] = (
                    f"LoRA is {lora_x:.2f}× frozen (thin matmuls, no gradient into the input latents); the slice's "
                    "per-layer cost above does not shrink with its fraction")
                diff = r["peak_rss_mb"] - lora["peak_rss_mb"]
                why["peak memory ≤ LoRA's"] = (
                    f"{diff:+.0f} MB ({100 * diff / lora['peak_rss_mb']:+.1f} %)"
                    + (", within the allocator's run-to-run spread" if abs(diff) < 0.01 * lora["peak_rss_mb"] else
                       ": the slice's per-layer temporaries (padded tile deltas, gathered inputs)"))
            for t in r["targets"]:
                summary.append(("Training step", r["name"], *t, why.get(t[0], "")))
        rows.append([
            f"{r['name']}" + (f" (r={r['rank']})" if r.get("rank") else ""),
            _n(r["trainable"]),
            _s(r["wall_s"]),
            _x(r["x_frozen_wall"]),
            _x(r["x_frozen_cpu"]),
            f"{r['peak_rss_mb']:.0f} MB",
            f"{r['peak_x_frozen']:.2f}×",
            _verdicts(r["targets"], why),
            _cmd("bench_train_step.py", r["name"] if r["name"] != "frozen" else None),
        ])
    text = [
        "## 1. Training step (CPU)",
        "",
        f"Wan 2.1 1.3B block layout ({lay['num_attention_heads']} heads × {lay['attention_head_dim']}, ffn "
        f"{lay['ffn_dim']}, text dim {lay['text_dim']}) with {lay['num_layers']} blocks; latents "
        f"{tuple(st['latent'])}, text ({st['latent'][0]}, {st['text_len']}, {lay['text_dim']}); float32; one step = "
        "forward, flow-matching loss, backward, AdamW step. *frozen*: no trainable weight, gradients flow to the "
        "input latents (the backward pass any adapter pays). *slice f*: `SliceConfig(fraction=f)` over every block "
        "parameter. *lora f* / *shira f*: PEFT LoRA / SHiRA on the block Linears with the rank whose r·(in+out) "
        "count is closest to slice f's trainable weights. *full*: every block parameter trainable.",
        "",
        f"Each configuration lives in its own process; {st['repeats']} interleaved rounds of {st['calls']} step(s) "
        f"after {st['warmup']} warm-up steps, {st['threads']} torch thread(s). Times: median (min–max) over all "
        "steps. Ratios: per round against the frozen base of the same round, median (min–max) over rounds; the CPU "
        "column uses process CPU time, which other jobs on the machine disturb less than wall time. Peak: the "
        "process's resident high-water mark over the timed steps (model, optimizer state and activations).",
        "",
        common.md_table(["configuration", "trainable weights", "step time", "× frozen (wall)", "× frozen (CPU)",
                         "peak RSS", "peak × frozen", "targets (issue 5)", "command"], rows),
    ]
    if plots_rel:
        text += ["", f"![training step ratios]({plots_rel}/{TRAIN_PLOT})"]
    if prof_table:
        text += ["", "Where the slice's extra time goes (slice 0.001 vs frozen, one training step):", "", prof_table]
    return "\n".join(text), summary


def plot_train_step(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, key, title in ((axes[0], "x_frozen_wall", "step time × frozen (median, min–max over rounds)"),
                           (axes[1], None, "peak RSS × frozen")):
        if key:
            med = [r[key]["median"] for r in rows]
            err = [[m - r[key]["min"] for m, r in zip(med, rows)], [r[key]["max"] - m for m, r in zip(med, rows)]]
        else:
            med, err = [r["peak_x_frozen"] for r in rows], None
        colors = ["tab:blue" if r["method"] == "slice" else "tab:gray" if r["method"] == "frozen" else
                  "tab:orange" if r["method"] == "lora" else "tab:purple" if r["method"] == "shira" else "tab:green"
                  for r in rows]
        ax.bar(range(len(rows)), med, yerr=err, color=colors, capsize=3)
        ax.axhline(1.0, color="black", lw=0.8)
        if key:
            ax.axhline(1.05, color="tab:red", lw=0.8, ls="--", label="1.05× target (slice 0.001)")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_inference(data: dict) -> tuple[str, list]:
    st = data["setup"]
    cause, prof_table = _profile_note(data)
    summary, rows = [], []
    for r in data["rows"]:
        why = {"unmerged ≤ 1.03× base": (cause or "the slice's per-layer ops") + "; merge it for inference"}
        for t in r["targets"]:
            summary.append(("Inference", r["name"], *t, why.get(t[0], "")))
        rows.append([r["name"], _s(r["wall_s"]), _x(r["x_base_wall"], 3), _x(r["x_base_cpu"], 3),
                     f"{r['peak_rss_mb']:.0f} MB", _verdicts(r["targets"], why),
                     _cmd("bench_inference.py", r["name"] if r["name"] != "base" else None)])
    lay = st["layout"]
    text = [
        "## 2. Inference (CPU)",
        "",
        f"One transformer forward under `torch.inference_mode()`, same layout as above ({lay['num_layers']} blocks "
        f"of width {lay['num_attention_heads'] * lay['attention_head_dim']}), latents {tuple(st['latent'])}. The "
        "slices hold random non-zero values. *merged*: `slice_adapter.merge_adapters(model)` (the wrappers stay, "
        f"inactive). {st['repeats']} interleaved rounds of {st['calls']} forward(s), {st['threads']} thread(s).",
        "",
        common.md_table(["configuration", "forward time", "× base (wall)", "× base (CPU)", "peak RSS",
                         "targets (issue 5)", "command"], rows),
    ]
    if prof_table:
        text += ["", "Where the unmerged slice's extra time goes (unmerged slice 0.001 vs base, one forward):", "",
                 prof_table]
    return "\n".join(text), summary


def section_merge(data: dict) -> tuple[str, list]:
    st = data["setup"]
    ck = st["checkpoint"]
    imports = data["imports"]
    copy = data["copy"]
    summary, rows = [], []
    cli, call = data["rows"][0], data["rows"][1]
    startup = cli["wall_s"]["median"] - call["wall_s"]["median"]
    streaming = ("untouched tensors are copied in the kernel (`copy_file_range`) like `cp`; beyond the copy the "
                 "merge reads and plans the slices and patches the selected weights of nearly every tensor in place "
                 "(at this fraction almost every tensor holds a few)")
    loaded = imports.get("modules")
    why_cli = (f"{startup:.1f} s of the CLI's {cli['wall_s']['median']:.1f} s are interpreter start and imports"
               + (f" ({', '.join(loaded)})" if loaded else "") + "; the merge alone runs at "
               f"{call['x_copy_throughput']['median']:.2f}× copy. The start-up is a fixed cost, as long here as "
               "the whole `cp`: on larger checkpoints (a 14B model is 10× this one) the CLI's ratio approaches the "
               "merge's own" if startup > 0.3 * cli["wall_s"]["median"]
               else streaming)
    for r in data["rows"]:
        w = {"≥ 0.7× copy throughput": why_cli if r is cli else streaming}
        for name, ok, _ in r["targets"]:
            if name.startswith("peak <"):
                w[name] = (f"the interpreter with the CLI's imports alone peaks at {imports['peak_rss_mb']['median']:.0f}"
                           " MB, over the 300 MB allowance; the merge adds "
                           f"{call['above_imports_mb']:.0f} MB to that")
            if name.startswith("peak above"):
                w[name] = "the merge holds more than three tensors at once"
        for t in r["targets"]:
            summary.append(("Merge", r["name"], *t, w.get(t[0], "")))
        rows.append([r["name"], _s(r["wall_s"]), f"{r['gb_per_s']:.2f} GB/s", _x(r["x_copy_throughput"]),
                     _x(r["x_pycopy_throughput"]), f"{r['peak_rss_mb']['median']:.0f} MB",
                     _verdicts(r["targets"], w), _cmd("bench_merge.py")])
    py = data["pycopy"]
    rows.insert(0, ["plain copy (`cp`)", _s(copy["wall_s"]), f"{copy['gb_per_s']:.2f} GB/s", "1×",
                    f"{py['wall_s']['median'] / copy['wall_s']['median']:.2f}×", "—", "baseline",
                    _cmd("bench_merge.py")])
    rows.insert(1, ["Python streaming copy (1 MiB buffer)", _s(py["wall_s"]), f"{py['gb_per_s']:.2f} GB/s",
                    f"{copy['wall_s']['median'] / py['wall_s']['median']:.2f}×", "1×", "—",
                    "context: the floor of any merge that moves the bytes through user space", _cmd("bench_merge.py")])
    text = [
        "## 3. Merge",
        "",
        f"`scripts/merge_slices.py` merges two slices (fraction {st['fraction']:g}, ids "
        f"{', '.join(map(str, st['slice_ids']))}, random values) into a synthetic checkpoint with the "
        f"{ck['layout']} layout in bf16 (diffusers keys, {ck['tensors']} tensors, {ck['bytes'] / 1e9:.2f} GB, "
        f"largest tensor `{ck['largest_tensor']}` {ck['largest_tensor_bytes'] / common.MB:.1f} MB), written to "
        f"/tmp. Baseline: `{st['copy_command']}` of the same file (which copies inside the kernel, then fsyncs the copy "
        "once, as the merge fsyncs its output once); for context, a Python loop copying it through a 1 MiB buffer "
        "(also fsynced). "
        f"{st['repeats']} rounds, the order alternating; every run reads the base from the page cache. Peak: the "
        "merge process's own resident high-water mark (VmHWM; not wait4's ru_maxrss, which starts from the "
        "parent's high-water mark when the child is exec'd from its forked memory). "
        "The second row runs the same CLI in a process that imported its modules first, so the merge's own time "
        f"and memory show apart from start-up: imports take {imports['seconds']['median']:.1f} s and peak at "
        f"{imports['peak_rss_mb']['median']:.0f} MB.",
        "",
        common.md_table(["run", "time", "throughput", "× copy throughput", "× Python copy throughput",
                         "peak RSS", "targets (issue 5)", "command"], rows),
    ]
    return "\n".join(text), summary


def section_plan(data: dict) -> str:
    st = data["setup"]
    rows = [[r["name"], _n(r["weights"]), _n(r["selected"]), _s(r["wall_s"]), f"{r['peak_rss_mb']:.0f} MB",
             _cmd("bench_plan.py", r["name"] if r["op"] != "build" else None)] for r in data["rows"]]
    return "\n".join([
        "## 4. Planning (meta device)",
        "",
        f"The {st['model']} layout on the meta device (no weights). *plan f*: `slice_adapter.plan(model, "
        "SliceConfig(fraction=f))`, which selects the slice's tiles; *build + add_adapter*: a fresh meta model and "
        f"the slice layers injected. {st['repeats']} interleaved rounds. No target in issue 5; reported for scale.",
        "",
        common.md_table(["operation", "model weights", "selected weights", "time", "peak RSS", "command"], rows),
    ])


def section_decode(data: dict) -> str:
    """PyAV (load_clip's decode) against torchcodec (`datasets`' Video decoder) per clip; which the loader uses."""
    st, ver = data["setup"], data["versions"]
    tc_error = data.get("torchcodec_error")
    rows, tc_x, equal = [], [], True
    for case in data["cases"]:
        res = case["results"]

        def cell(method):
            r = res.get(method)
            if r is None:
                return "not measured" + (" (failed)" if method in data.get("method_errors", {}) else "")
            return _s(r["s_per_clip"])

        ratios, diffs = [], {}
        for method, label in (("torchcodec_exact", "exact"), ("torchcodec_approximate", "approximate")):
            if method in res:
                tc_x.append(res[method]["x_pyav"]["median"])
                ratios.append(f"{label} {_x(res[method]['x_pyav'])}")
                diffs[label] = res[method]["check"]["max_abs_diff"]
        indices = all(r["check"]["indices_ok"] for r in res.values())
        equal &= indices and all(d == 0 for d in diffs.values())
        same = ("yes, bit for bit" if all(d == 0 for d in diffs.values()) else "max abs diff " + ", ".join(
            f"{label} {'— (shape differs)' if d is None else d}" for label, d in diffs.items())) if diffs else "—"
        rows.append([f"{case['name']}" + (f", seek from keyframe {case['seek_keyframe']}" if case["first"] else ""),
                     cell("pyav"), cell("torchcodec_exact"), cell("torchcodec_approximate"),
                     "<br>".join(ratios) or "—",
                     same + ("; right frames" if indices else "; **wrong frames**"),
                     cell("pyav_ffmpeg_threads")])
    threads = st["decoder_threads"]
    thread_text = ("the FFmpeg decoder threads FFmpeg chooses" if threads == 0 else "one FFmpeg decoder thread"
                   if threads == 1 else f"{threads} FFmpeg decoder threads")
    tc_ffmpeg = ver.get("torchcodec_ffmpeg")
    tc_ffmpeg = tc_ffmpeg.get("ffmpeg_version", "?") if isinstance(tc_ffmpeg, dict) else tc_ffmpeg
    if tc_x and min(tc_x) > 1:
        speed = (f"PyAV is faster: torchcodec takes {min(tc_x):.2f}–{max(tc_x):.2f}× its time per clip (medians), "
                 "now that load_clip converts each frame to RGB with one thread (`to_ndarray(..., threads=1)`)")
    elif tc_x:
        speed = (f"torchcodec takes {min(tc_x):.2f}–{max(tc_x):.2f}× PyAV's time per clip (medians), not gain "
                 "enough to outweigh the rest")
    else:
        speed = f"torchcodec could not be measured in this run ({tc_error or 'see method_errors in the JSON'})"
    text = [
        "## 5. Video decoding: PyAV against torchcodec (CPU)",
        "",
        f"One {st['width']}x{st['height']} clip of {data['cases'][0]['frames']} frames decoded to uint8 RGB, the file "
        "opened afresh per clip as the loader does. *PyAV*: `slice_ft.data.load_clip`'s decode (its "
        "`_frames_from` seek to the keyframe before the first frame, `to_ndarray(format=\"rgb24\", threads=1)`), "
        f"without the resize; *torchcodec*: `VideoDecoder(path, device=\"cpu\", dimension_order=\"NHWC\", "
        "seek_mode=...).get_frames_in_range(...)` (*exact* scans the whole file first, *approximate* does not). "
        f"Both with {thread_text}; the last column is load_clip as it runs, the thread count "
        f"left to FFmpeg. Test videos: libx264 {st['encoder'].split()[1]}, {st['fps']} fps, every frame carrying its "
        f"index (checked). {st['repeats']} interleaved rounds, order rotated each round; time median (min–max), "
        "ratio per round. Versions: PyAV " + f"{ver['av']} (its own FFmpeg {ver.get('av_ffmpeg')})"
        + (f", torchcodec {ver['torchcodec']} (the system's FFmpeg {tc_ffmpeg}), torch {ver['torch']}"
           if ver.get("torchcodec") else f", torch {ver['torch']}; torchcodec not importable: {tc_error}") + ".",
        "",
        common.md_table(["case", "PyAV, per clip", "torchcodec exact", "torchcodec approximate",
                         "torchcodec ÷ PyAV (wall)", "frames equal", "PyAV, FFmpeg's threads (load_clip as is)"],
                        rows),
        "",
        f"**Chosen: PyAV stays.** {speed}" + ("; both decoders give the same pixels" if tc_x and equal else "")
        + ". PyAV's wheel carries its own FFmpeg, while torchcodec loads the system's FFmpeg shared libraries (4–8), "
        "which every machine that trains would have to provide; and the PyPI torchcodec wheel is tied to a CUDA torch "
        "build (it links `libtorch_cuda.so` and `libcudart.so.13`), so it does not load with a CPU torch such as this "
        "project's main environment's.",
        "",
        "Command (in a venv with torchcodec: `python -m venv /tmp/tcvenv && /tmp/tcvenv/bin/pip install torch "
        "torchcodec -e .`, with FFmpeg's shared libraries installed, e.g. `apt-get install ffmpeg`): "
        "`/tmp/tcvenv/bin/python benchmarks/bench_decode.py --output benchmarks/results/cpu/decode.json`; without "
        "torchcodec the script records why and measures PyAV alone.",
    ]
    return "\n".join(text)


def section_quality(data: dict, plots_rel: str | None) -> str:
    st, sm, m, base = data["setup"], data["summary"], data["setup"]["model"], data["base_losses"]
    methods, variants = list(sm), list(data["variants"])
    slice_v, lora_v = sm["slice"]["variants"], sm["lora"]["variants"]
    tgt, ver = data["targets"], data["verdicts"]
    remedy = data["chain_variants"][-1]  # the recommended remedy, also used in the chain
    batch, steps = st["batch"], st["steps"]

    def ms(d, digits=4, unit="", sign=False):
        return f"{d['mean']:{'+' if sign else ''}.{digits}f}{unit} ± {d['std']:.{digits}f}"

    def pct(d):
        return ms(d, 1, " %", sign=True)

    def better(name):  # which keeps A better; a tie when the means differ by less than the larger std
        a, b = slice_v[name]["a_pct"], lora_v[name]["a_pct"]
        if abs(a["mean"] - b["mean"]) < max(a["std"], b["std"]):
            return "tie"
        return "slice" if a["mean"] < b["mean"] else "lora"

    def how(name):
        v = data["variants"][name]
        if v.get("replay"):
            return f"A's {st['n_train']} training clips mixed into B's training set"
        if v.get("preserve") == "real":
            return f"A's real training clips as a separate batch of {v['batch']} (flow-matching loss)"
        if v.get("preserve"):
            target = "the teacher's prediction" if v["preserve"] == "distill" else "the flow-matching target"
            return f"self-generated: a batch of {v['batch']} generated clips, {target}"
        return "B's clips only"

    method_rows = [[meth, _n(sm[meth]["trainable"]), f"{sm[meth]['lr']:g}", ms(sm[meth]["fit_a"]),
                    ms(sm[meth]["variants"]["plain"]["b_loss"]), pct(sm[meth]["variants"]["plain"]["a_pct"]),
                    pct(sm[meth]["variants"][remedy]["a_pct"]), ms(sm[meth]["variants"][remedy]["b_loss"]),
                    f"{sm[meth]['generation_s']['mean']:.1f} s"] for meth in methods]
    variant_rows = [[name, how(name), pct(slice_v[name]["a_pct"]), ms(slice_v[name]["b_loss"]),
                     pct(slice_v[name]["b_vs_plain_slice_pct"]), pct(lora_v[name]["a_pct"]), ms(lora_v[name]["b_loss"]),
                     better(name), f"{slice_v[name]['step_ratio']['mean']:.2f}×",
                     f"{lora_v[name]['step_ratio']['mean']:.2f}×"] for name in variants]
    target_rows = []
    for name, t in ver["targets"].items():
        target_rows.append([
            f"slice, {name}",
            f"{t['a_pct']:+.1f} %: **{'met' if t['a_met'] else 'missed'}**",
            f"{t['b_pct']:+.1f} %: **{'met' if t['b_met'] else 'missed'}**"])
    chain_rows = [[meth, name, ms(sm[meth]["fit_a"]), pct(sm[meth]["chain"][name]["a_pct"]),
                   ms(sm[meth]["variants"][name]["b_loss"]), pct(sm[meth]["chain"][name]["b_pct"]),
                   ms(sm[meth]["chain"][name]["c_loss"])] for meth in methods for name in data["chain_variants"]]
    sweep_rows = [[meth, *[f"{lr}: {v:.4f}" for lr, v in d.items()]] for meth, d in data["sweep"].items()]
    width = max(len(r) for r in sweep_rows)
    sweep_rows = [r + [""] * (width - len(r)) for r in sweep_rows]

    # Honest comparisons the issue asks for.
    best = min(data["self_generated"], key=lambda v: slice_v[v]["a_pct"]["mean"])
    calls = {v: better(v) for v in variants}
    both = [v for v, t in ver["targets"].items() if t["a_met"] and t["b_met"]]
    verdict = (
        f"Targets (issue 10), slice with self-generated preservation: A within {tgt['a_pct']:+g} % of its loss right "
        f"after A, and B's held-out loss within {tgt['b_pct']:g} % of the plain slice run's. "
        + (f"Both met by: {', '.join(both)}. " if both else "No self-generated variant meets both. ")
        + f"The slice keeps A best with {best} ({slice_v[best]['a_pct']['mean']:+.1f} %, against "
        f"{slice_v['plain']['a_pct']['mean']:+.1f} % plain). Slice or LoRA, under the same way of training B: "
        + ", ".join(f"{v}: {calls[v]}" for v in variants)
        + " (a tie where the means differ by less than the seeds' std).")
    remedied = [calls[v] for v in variants if v != "plain"]
    if all(c == "tie" for c in remedied):
        verdict += " With a remedy the two keep A equally well within the seeds' spread" + (
            "; without one the slice forgets less." if calls["plain"] == "slice" else ".")

    # Cost: measured here, then scaled to a 14B run whose batch is one clip.
    def per_clip(name):  # extra compute of one preservation clip, in main-batch clips
        v = data["variants"][name]
        return (slice_v[name]["step_ratio"]["mean"] - 1) * batch / v["batch"]

    preserving = [name for name in variants if data["variants"][name].get("preserve")]
    largest = {}  # per kind, the variant with the largest preservation batch: the least per-call overhead
    for name in preserving:
        v = data["variants"][name]
        if v["batch"] > data["variants"].get(largest.get(v["preserve"]), {}).get("batch", 0):
            largest[v["preserve"]] = name
    plain_step = sm["slice"]["variants"]["plain"]["step_s"]["mean"]
    gen = sm["slice"]["generation_s"]["mean"]
    gen_clips = gen / (plain_step / batch)  # generation in training-clip units (one clip's forward + backward)
    batches = sorted({data["variants"][n]["batch"] for n in preserving}, reverse=True)
    cost_lines = [
        "Extra compute per step (process CPU time of a training step against the plain step of the same job, mean "
        "over seeds; in brackets, what one preservation clip costs in main-batch clips): "
        + "; ".join(f"{name} {slice_v[name]['step_ratio']['mean']:.2f}× ({per_clip(name):.2f})" for name in preserving)
        + f". The small batches cost more per clip here: on a model this small a forward's fixed per-call cost "
        f"weighs. One-off generation of {st['preserve_samples']} clips ({st['generation_steps']} Euler steps, no "
        f"VAE, batch {batch}): {gen:.1f} s of CPU, as much as training {gen_clips:.0f} clips "
        f"({gen_clips / batch:.1f} plain steps of batch {batch}).",
        "",
        "At 14B (assumptions: compute grows linearly with the number of clips, so a preservation clip of the "
        "training clips' size costs what one costs here with the largest preservation batch, "
        + ", ".join(f"{kind} {per_clip(name):.2f}" for kind, name in largest.items())
        + " clips; a 14B run trains batch 1; the GPU table below will give its s/step, not yet measured): "
        + "; ".join(f"with a preservation batch of {p}, " + ", ".join(
            f"{kind} {1 + per_clip(name) * p:.1f}×" for kind, name in largest.items()) for p in batches)
        + f" the plain 14B step; generating {st['preserve_samples']} clips costs about {gen_clips:.0f} plain 14B "
        "steps, once. So at 14B preservation is not cheap: a batch of 8 full-size clips is an order of magnitude "
        "more compute than the step it protects; use a batch of 1–2, or generate the preservation clips with fewer "
        "frames or a lower resolution than the training clips. With gradient checkpointing the step recomputes its "
        "forward, so distill's teacher forward weighs less than here.",
    ]
    text = [
        "## Quality study",
        "",
        f"A small Wan: {m['num_layers']} blocks, width {m['num_attention_heads'] * m['attention_head_dim']} "
        f"({m['num_attention_heads']} heads × {m['attention_head_dim']}), ffn {m['ffn_dim']}, text dim "
        f"{m['text_dim']}; latents {tuple(st['latent'])} (C, F, H, W). "
        + ("The width is the smallest the issue allows: the whole study has to fit half an hour of 2 CPU cores."
           if m["num_attention_heads"] * m["attention_head_dim"] >= 256 else
           "Smaller than the issue's width of 256–512 (smoke sizes)."),
        "",
        "**Data, in latent space** (no VAE, no text encoder). The base is pretrained on five classes (blob, stripes, "
        "rings, checker, gradient), each a family of space-time patterns whose colour (a direction in the class's own "
        "plane of latent channels) and shape (radius, frequency, cell size, sharpness) vary from clip to clip, "
        "captioned by the class word and two pose words (direction, position, speed). A concept is one member of a "
        "class the base knows, as a character is one person on a model that knows people: its colour and shape are "
        "fixed, its pose still varies, and it is captioned `trigger class pose pose`: A `sks_a blob`, B `sks_b "
        f"stripes`, C `sks_c rings`. Each word is a fixed random vector of the text width ({data.get('text_len', 4)} "
        "tokens per caption). Drift is measured on the checker class, which no phase trains on.",
        "",
        f"**Protocol.** Pretrain all weights {st['pretrain_steps']} steps (AdamW lr {st['pretrain_lr']:g}, batch "
        f"{batch}, {st['pretrain_per_class']} clips per class); the same base for every seed. Each concept: "
        f"{steps} steps, batch {batch}, {st['n_train']} training clips, AdamW, gradient clipping 1.0, uniform "
        f"sigmas. *slice*: `SliceConfig(fraction={st['fraction']:g})` over every block parameter, slice ids 1, 2, 3 "
        f"for A, B, C (at most {data.get('slice_overlap', 0)} weights shared by any two); *lora*: rank "
        f"{data['rank']} (alpha = rank) on the block Linears, the same trainable count up to rounding, a new LoRA "
        "per concept; each concept is merged before the next. A's learning rate per method is chosen on seed "
        f"{st['seeds'][0]} by A's validation loss ({st['n_val']} clips) and used for every concept. Self-generated "
        f"preservation uses the trainer's own code (`slice_ft/preservation.py`): before B's phase the A-merged "
        f"model (the new adapter disabled) samples {st['preserve_samples']} latent clips for A's training captions "
        f"({st['generation_steps']} Euler steps, shift 3, no guidance); each step adds a batch of them at uniform "
        "sigmas, with `||student − teacher||²` against the same transformer with its adapter disabled (distill) or "
        "the flow-matching loss (flow), weight 1. Losses are held-out flow-matching losses on "
        f"{st['n_test']} test clips per concept with fixed noise and stratified sigmas, the same for every seed; "
        f"seeds {', '.join(map(str, st['seeds']))} vary the training clips, noise and initialisation. Mean ± std "
        "over seeds. Full fine-tuning is left out: it has no adapter to disable for a teacher, and the previous "
        "study measured it forgetting like the LoRA.",
        "",
        "Base model losses: " + ", ".join(f"{'unrelated' if k == 'U' else k} {v:.4f}" for k, v in base.items()) + ".",
        "",
        common.md_table(["method", "trainable weights", "lr", "A loss after A", "B loss after B (plain)",
                         "A change after B (plain)", f"A change after B ({remedy})", f"B loss after B ({remedy})",
                         "one-off generation (CPU)"], method_rows),
        "",
        "Ways of training B on the A-merged model (A's change is against its loss right after A; B's loss also "
        "against the plain slice run of the same seed; lower is better; step compute against the plain step):",
        "",
        common.md_table(["way of training B", "what", "slice: A change", "slice: B loss", "slice: B vs plain slice",
                         "LoRA: A change", "LoRA: B loss", "keeps A better", "slice step ×", "LoRA step ×"],
                        variant_rows),
        "",
        verdict,
        "",
        common.md_table(["run", f"A change after B (target ≤ {tgt['a_pct']:+g} %)",
                         f"B vs plain slice (target ≤ {tgt['b_pct']:+g} %)"], target_rows),
        "",
        f"Chain of three concepts: C trained on the A+B-merged model, without a remedy (after a plain B) and with "
        f"{remedy} on both B's and C's phase (C's preservation set: clips generated by the A+B-merged model for A's "
        "and B's captions). A's change is against its loss right after A, B's against its loss right after B.",
        "",
        common.md_table(["method", "B and C trained", "A loss after A", "A change after C", "B loss after B",
                         "B change after C", "C loss after C"], chain_rows),
        "",
        *cost_lines,
        "",
        "Learning-rate sweep (A validation loss, seed " f"{st['seeds'][0]}):",
        "",
        common.md_table(["method"] + [f"lr {i + 1}" for i in range(width - 1)], sweep_rows),
        "",
        f"Command: {_cmd('quality.py', extra=' --plot benchmarks/plots/' + QUALITY_PLOT)} "
        f"({data['seconds'] / 60:.1f} min here).",
    ]
    if plots_rel:
        text += ["", f"![quality loss curves]({plots_rel}/{QUALITY_PLOT})"]
    return "\n".join(text)


def measured_on_a_gpu(table: str) -> bool:
    """A gpu_lowvram.py table that holds measurements from a CUDA device (not a smoke, plan or CPU run's)."""
    import gpu_report

    return gpu_report.measured_on_a_gpu(table)


def gpu_section(results: Path | None = None) -> str:
    """The GPU section (gpu_report.py): the GPU check's results in `results` (default benchmarks/results/gpu/; a
    gpu_lowvram.py table file works too), else its rows and commands, not yet measured."""
    import gpu_report

    return gpu_report.section(results)


def fsdp_section(results: Path | None = None) -> str:
    """FSDP2 vs DDP per-rank peak memory: the table a GPU run of gpu_fsdp.py wrote, else its rows, not measured."""
    import gpu_fsdp

    results = results or gpu_fsdp.RESULTS.with_suffix(".md")
    measured = results.exists() and gpu_fsdp.NOT_MEASURED not in results.read_text()
    body = results.read_text().strip() if measured else gpu_fsdp.plan_table()
    text = ["## GPU: FSDP2 vs DDP (issue 13)", "",
            "Per-rank peak device memory of slice training under FSDP2 (the trainer's `fully_shard` per block + root) "
            "and DDP, on the tiny Wan and the Wan 2.1 1.3B layout with random bf16 weights, 1 process each:", "",
            "    python benchmarks/gpu_fsdp.py", "", body]
    if not measured:
        text += ["", "**Not yet measured**: no GPU was lent to the tasks that wrote this report. On CPU (gloo), "
                 "`tests/test_fsdp.py` runs FSDP2 on 2 processes: each holds about half the frozen base, and the slice "
                 "matches a one-process run's; `python benchmarks/gpu_fsdp.py --dry-run` runs these rows on the CPU."]
    return "\n".join(text) + "\n"


def render(results: dict, output: Path, plots_dir: Path, wall_s: float | None, argv: list[str],
           failed: dict | None = None) -> str:
    plots_rel = os.path.relpath(plots_dir, output.parent)
    sections, summary = [], []
    if "train_step" in results:
        plotted = have_matplotlib()
        if plotted and "rows" in results["train_step"]:
            plot_train_step(results["train_step"], plots_dir / TRAIN_PLOT)
        if plotted and results["train_step"].get("sweep"):
            plot_train_sweep(results["train_step"]["sweep"], plots_dir / SWEEP_PLOT)
        text, s = section_train_step(results["train_step"], plots_rel if plotted else None)
        sections.append(text)
        summary += s
    if "train_depth" in results:
        text, s = section_train_depth(results["train_depth"]["depth"])
        sections.append(text)
        summary += s
    if "step_parts" in results:
        sections.append(section_step_parts(results["step_parts"]["parts"]))
    if "inference" in results:
        text, s = section_inference(results["inference"])
        sections.append(text)
        summary += s
    if "merge" in results:
        text, s = section_merge(results["merge"])
        sections.append(text)
        summary += s
    if "plan" in results:
        sections.append(section_plan(results["plan"]))
    if "decode" in results:
        sections.append(section_decode(results["decode"]))
    if "quality" in results:
        sections.append(section_quality(results["quality"], plots_rel
                                        if (plots_dir / QUALITY_PLOT).exists() else None))
    for name, why in (failed or {}).items():
        sections.append(f"## {name}: not measured\n\nThe run failed: {why}.")
    if not have_matplotlib():
        sections.append("(No plots: matplotlib is not installed; `pip install matplotlib` and run again.)")
    sections.append(gpu_section())
    sections.append(fsdp_section())
    target_rows = [[bench, row, name, measured, "met" if ok else f"missed — {why}"]
                   for bench, row, name, ok, measured, why in summary]
    smoke = any(r.get("smoke") for r in results.values())
    # One row per run that measured sections of this report (re-rendered reports may combine runs).
    by_run: dict = {}
    for name, r in results.items():
        key = (r["machine"]["commit"], r["machine"]["cpu"], r["machine"]["torch"])
        by_run.setdefault(key, ([], r["machine"]))[0].append(name)
    runs = list(by_run.values())
    head = [
        "# Benchmarks",
        "",
        ("**SMOKE RUN: toy sizes, the numbers mean nothing.**\n\n" if smoke else "")
        + "Generated by `" + shlex.join(["python", "benchmarks/run_all.py", *argv]) + "`"
        + (f" in {wall_s / 60:.1f} min" if wall_s else "") + "; do not edit by hand. Each section's rows come "
        "from one run of its script, every configuration interleaved with its baseline; the table says which run "
        "measured which sections.",
        "",
        common.md_table(["sections", "machine", "versions", "commit", "date", "load average at start"], [[
            ", ".join(names),
            f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}",
            f"Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, peft {m['peft']}",
            m["commit"], m["date"], m["load_average"]] for names, m in runs]),
        "",
        "The machine is shared with other jobs: wall times swing, so the tables also give ratios of process CPU "
        "time, and all timings use one torch thread per configuration (see `--threads`).",
        "",
        "## Targets (issue 5)",
        "",
        common.md_table(["benchmark", "row", "target", "measured", "verdict"], target_rows),
    ]
    return "\n".join(head + [""] + ["\n\n".join(sections)]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="Toy sizes, in this process: seconds. Writes to a temp folder unless --output is given.")
    parser.add_argument("--output", default=None,
                        help="The report: a .md path, or a folder to hold BENCHMARKS.md and plots/ (default: "
                             "BENCHMARKS.md at the repository root with plots in benchmarks/plots/).")
    parser.add_argument("--only", default=None, help=f"Comma-separated benchmarks to run, of {', '.join(BENCHMARKS)}.")
    parser.add_argument("--json-dir", default=None,
                        help="Where the benchmarks' JSON results go (default: benchmarks/results/cpu/, kept in git "
                             "so the report can be re-rendered; --smoke: a temp folder).")
    parser.add_argument("--from-json", default=None, metavar="DIR",
                        help="Render the report from the JSON results in DIR without running anything.")
    parser.add_argument("--gpu-results", default=None, metavar="DIR",
                        help="Files a GPU check brought back (benchmarks/gpu_check.sh on the device): copied into "
                             "benchmarks/results/gpu/ (merged with an earlier call's) and rendered in the GPU "
                             "section; runs nothing (implies --from-json benchmarks/results/cpu unless given).")
    args = parser.parse_args(argv)
    if args.gpu_results:
        import gpu_report

        try:
            copied = gpu_report.import_gpu_results(Path(args.gpu_results))
        except ValueError as e:
            parser.error(f"--gpu-results: {e}")
        print(f"GPU results {', '.join(copied)} -> {gpu_report.GPU_RESULTS_DIR}")
        args.from_json = args.from_json or str(RESULTS_DIR)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else [
        n for n in BENCHMARKS if args.smoke or n not in ON_REQUEST]
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        parser.error(f"--only names unknown benchmarks {bad}; choose from {', '.join(BENCHMARKS)}")

    if args.output is None:
        if args.smoke:
            output = Path(tempfile.mkdtemp(prefix="slice_ft_bench_smoke_")) / "BENCHMARKS.md"
            plots_dir = output.parent / "plots"
        else:
            output, plots_dir = common.REPO / "BENCHMARKS.md", HERE / "plots"
    else:
        output = Path(args.output)
        if output.suffix != ".md":
            output = output / "BENCHMARKS.md"
        plots_dir = output.parent / "plots"
    output.parent.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)

    common.quiet_warnings()
    t0 = time.perf_counter()
    failed = {}
    if args.from_json:
        json_dir = Path(args.from_json)
    else:
        json_dir = Path(args.json_dir) if args.json_dir else (
            Path(tempfile.mkdtemp(prefix="slice_ft_bench_json_")) if args.smoke else RESULTS_DIR)
        json_dir.mkdir(parents=True, exist_ok=True)
        failed = run_benchmarks(names, json_dir, plots_dir, args.smoke)
    # A full-size run renders every result in its folder, so `--only X` refreshes X and keeps the other sections.
    shown_names = names if (args.smoke or args.from_json) else list(BENCHMARKS)
    results = {n: json.loads((json_dir / f"{n}.json").read_text())
               for n in shown_names if (json_dir / f"{n}.json").exists()}
    if not results:
        parser.error(f"no benchmark results in {json_dir}")
    wall = None if args.from_json else time.perf_counter() - t0
    output.write_text(render(results, output, plots_dir, wall, raw_argv, failed))
    print(f"wrote {output} (JSON results in {json_dir})")
    return output

if __name__ == "__main__":
    main()
