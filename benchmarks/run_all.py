"""Regenerate BENCHMARKS.md and its plots: every benchmark, then one report.

    python benchmarks/run_all.py                    # the full run (about 15 minutes on 2 CPU cores)
    python benchmarks/run_all.py --smoke            # seconds-long sizes, written to a temp folder (CI)
    python benchmarks/run_all.py --only merge       # re-measure some sections, keep the others' results
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
BENCHMARKS = ("train_step", "inference", "merge", "plan", "quality")
SCRIPTS = {"train_step": "bench_train_step.py", "inference": "bench_inference.py", "merge": "bench_merge.py",
           "plan": "bench_plan.py", "quality": "quality.py"}
RESULTS_DIR = HERE / "results" / "cpu"  # the JSON behind BENCHMARKS.md
QUALITY_PLOT = "quality_loss_curves.png"
TRAIN_PLOT = "train_step.png"


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
        argv = ["--output", str(out)] + (["--smoke"] if smoke else [])
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


def section_train_step(data: dict, plots_rel: str | None) -> tuple[str, list]:
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
               f"{call['x_copy_throughput']['median']:.2f}× copy" if startup > 0.3 * cli["wall_s"]["median"]
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


def section_quality(data: dict, plots_rel: str | None) -> str:
    st = data["setup"]
    sm = data["summary"]
    m = st["model"]

    def ms(d, digits=4, unit=""):
        return f"{d['mean']:.{digits}f}{unit} ± {d['std']:.{digits}f}"

    rows = [[meth, _n(sm[meth]["trainable"]), f"{sm[meth]['lr']:g}", ms(sm[meth]["fit_a"]),
             ms(sm[meth]["fit_b"]), ms(sm[meth]["retention_pct"], 2, " %"), ms(sm[meth]["gain_lost_pct"], 1, " %"),
             ms(sm[meth]["drift_a_pct"], 2, " %"), ms(sm[meth]["drift_ab_pct"], 2, " %")] for meth in sm]
    base = data["base_losses"]
    sweep_rows = [[meth, *[f"{lr}: {v:.4f}" for lr, v in d.items()]] for meth, d in data["sweep"].items()]
    width = max(len(r) for r in sweep_rows)
    sweep_rows = [r + [""] * (width - len(r)) for r in sweep_rows]
    claim = data["claim"]
    s, lo = sm["slice"], sm["lora"]
    verdict = (
        f"Slice retention of A: {s['retention_pct']['mean']:+.2f} % ± {s['retention_pct']['std']:.2f} "
        f"(claim: within 1 %: **{'supported' if claim['retention_within_1pct'] else 'not supported'}**); LoRA "
        f"{lo['retention_pct']['mean']:+.2f} %, full {sm['full']['retention_pct']['mean']:+.2f} %. Fit of B: slice "
        f"{s['fit_b']['mean']:.4f} vs LoRA {lo['fit_b']['mean']:.4f} ({claim['fit_b_vs_lora']:.3f}× LoRA's loss; "
        f"base model {base['B']:.4f}). Fit of A: slice {s['fit_a']['mean']:.4f}, LoRA {lo['fit_a']['mean']:.4f}, "
        f"full {sm['full']['fit_a']['mean']:.4f} (base model {base['A']:.4f}).")
    remedies = [n for n in ("replay", "lr/3") if f"retention_pct ({n})" in s]
    if not claim["retention_within_1pct"]:
        verdict += (" Disjoint weights are not a disjoint function: B's slice changes the shared activations A's "
                    "slice relies on.")
        if not remedies:
            verdict += (" Every method trains B with no prior preservation, at the learning rate chosen for fitting "
                        "A; whether lower rates forget less was not measured.")
    remedy_text = []
    if remedies:
        remedy_rows = [[meth, ms(sm[meth]["retention_pct"], 2, " %"), ms(sm[meth]["fit_b"])]
                       + [x for n in remedies for x in (ms(sm[meth][f"retention_pct ({n})"], 2, " %"),
                                                        ms(sm[meth][f"fit_b ({n})"]))] for meth in sm]
        best = {n: min(sm, key=lambda meth: sm[meth][f"retention_pct ({n})"]["mean"]) for n in remedies}
        remedy_text = [
            "",
            "Forgetting remedies, B's phase only (A's phase and learning rate as above): *replay* mixes A's own "
            f"{st['n_train']} training clips into B's training set (prior preservation with the concept's data; the "
            f"same {st['steps']} steps, so half of each batch is A in expectation); *lr/3* trains B at a third of the "
            "learning rate. "
            "Retention is A's held-out loss change after B, as above; lower is better.",
            "",
            common.md_table(["method", "retention (B as above)", "fit B (as above)"]
                            + [h for n in remedies for h in (f"retention ({n})", f"fit B ({n})")], remedy_rows),
            "",
            "Least forgetting: " + "; ".join(
                f"with {n}, {best[n]} ({sm[best[n]][f'retention_pct ({n})']['mean']:+.2f} %)" for n in remedies)
            + ". Slice: " + ", ".join(f"{s[f'retention_pct ({n})']['mean']:+.2f} % with {n}" for n in remedies)
            + f", against {s['retention_pct']['mean']:+.2f} % without.",
        ]
    text = [
        "## Quality study",
        "",
        f"A small Wan: {m['num_layers']} blocks, width {m['num_attention_heads'] * m['attention_head_dim']} "
        f"({m['num_attention_heads']} heads × {m['attention_head_dim']}), ffn {m['ffn_dim']}, text dim "
        f"{m['text_dim']}; latents {tuple(st['latent'])} (C, F, H, W). "
        + ("The width is the smallest the issue allows: the whole study has to fit a few minutes of 2 CPU cores."
           if m["num_attention_heads"] * m["attention_head_dim"] >= 256 else
           "Smaller than the issue's width of 256–512 (smoke sizes)."),
        "",
        "**Data, in latent space** (no VAE, no text encoder): each family is a parametric space-time pattern on its "
        "own fixed pair of channel directions, plus a per-clip background level and a little noise; its caption is "
        f"{data.get('text_len', 4)} token embeddings — the trigger (concepts) or family word (base corpus) and two "
        "attribute words the pattern's parameters decide — each a fixed random vector. Base corpus: checker, "
        "gradient, rings, corner. Concept A: a drifting Gaussian blob, trigger `sks_a`. Concept B: scrolling "
        "stripes, trigger `sks_b`. Unrelated family for drift: checker (in the base corpus, never fine-tuned on).",
        "",
        f"**Protocol.** Pretrain all weights {st['pretrain_steps']} steps (AdamW lr {st['pretrain_lr']:g}, batch "
        f"{st['batch']}, {st['pretrain_per_family']} clips per family); the same base for every seed. Each "
        f"fine-tune: {st['steps']} steps, batch {st['batch']}, {st['n_train']} training clips, AdamW, gradient "
        "clipping 1.0, uniform sigmas. *slice*: `SliceConfig(fraction="
        f"{st['fraction']:g})` over every block parameter, slice id 1 for A and id 2 for B (the two share "
        f"{data.get('slice_overlap', 0)} weights); *lora*: rank {data['rank']} (alpha = rank) on the block Linears, "
        "the same trainable count up to rounding; *full*: every block parameter. A's learning rate "
        f"per method is chosen on seed {st['seeds'][0]} by A's validation loss ({st['n_val']} clips); B is trained "
        "with the same rate on the A-merged model (slice: `merge_adapters`, then a new slice; LoRA: merged, then a "
        "new LoRA; full: further full fine-tuning). Losses are held-out flow-matching losses on "
        f"{st['n_test']} test clips per family with fixed noise and stratified sigmas, the same for every seed; "
        f"seeds {', '.join(map(str, st['seeds']))} vary the training clips, noise and initialisation. Mean ± std "
        "over seeds.",
        "",
        f"Base model losses: A {base['A']:.4f}, B {base['B']:.4f}, unrelated {base['U']:.4f}.",
        "",
        common.md_table(["method", "trainable weights", "lr", "fit: A loss after A", "fit: B loss after B",
                         "retention: A loss change after B", "share of A's gain lost", "drift: unrelated after A",
                         "drift: unrelated after A + B"], rows),
        "",
        verdict,
        *remedy_text,
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
        if plotted:
            plot_train_step(results["train_step"], plots_dir / TRAIN_PLOT)
        text, s = section_train_step(results["train_step"], plots_rel if plotted else None)
        sections.append(text)
        summary += s
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
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
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
