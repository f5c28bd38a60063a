"""Streaming merge: `scripts/merge_slices.py` on a multi-GB synthetic checkpoint vs a plain file copy of it.

The checkpoint has the Wan 2.1 T2V 1.3B layout (all 30 blocks, diffusers keys) in bf16: 2.8 GB, the size of the
bf16 repackaging users merge into. Two slices (fraction 1e-3, ids 0 and 1, random values) are merged into it. The merge
copies the whole data region in the kernel in a background thread while it computes the patches (~14 MB), which
that thread writes behind its copy, starting the disk's writeback of each finished part as it goes; it ends with one
fsync, like the copies it is compared with (`cp` then `sync`).

    python benchmarks/bench_merge.py --output /tmp/merge.json [--workdir /tmp/slice_ft_bench_merge]
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL = dict(model="wan2.1-t2v-1.3b", overrides={}, fraction=1e-3, slices=(0, 1), repeats=5)  # disk writes vary run to run
SMOKE = dict(model="wan2.1-t2v-1.3b", fraction=1e-2, slices=(0, 1), repeats=1,
             overrides=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32,
                            freq_dim=32))

# Runs the CLI in a child that imports its modules first, so the merge's own time and peak are seen apart from the
# interpreter's start-up. Peaks are the child's own VmHWM: its ru_maxrss would start at the parent's high-water mark.
_CHILD = r"""
import json, runpy, sys, time
sys.path.insert(0, {bench!r})
import common
t0 = time.perf_counter()
import slice_adapter.merge  # what the CLI imports
t_import = time.perf_counter() - t0
loaded = [m for m in ("torch", "numpy", "safetensors", "peft", "diffusers", "transformers") if m in sys.modules]
import_peak = common.peak_rss_mb()
common.reset_peak_rss()
sys.argv = {argv!r}
t0 = time.perf_counter()
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
t_merge = time.perf_counter() - t0
print("BENCH " + json.dumps(dict(import_s=t_import, import_peak_mb=import_peak, merge_s=t_merge, modules=loaded,
                                 merge_peak_mb=common.peak_rss_mb())))
"""


_PYCOPY = r"""
import os, sys
with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    buf = memoryview(bytearray(1 << 20))
    while n := src.readinto(buf):
        dst.write(buf[:n])
    dst.flush()
    os.fsync(dst.fileno())
"""


def write_checkpoint(path: Path, model: str, overrides: dict, seed: int = 0) -> dict:
    """Stream a bf16 safetensors file of a Wan layout with random values; never more than one tensor in memory."""
    import torch

    from slice_adapter.wan_configs import build_meta_transformer

    meta = build_meta_transformer(common.wan_layout(model, **overrides))
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in shapes.items():
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            fh.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    largest = max(shapes.items(), key=lambda kv: torch.Size(kv[1]).numel())
    return {"bytes": path.stat().st_size, "tensors": len(shapes), "largest_tensor": largest[0],
            "largest_tensor_bytes": 2 * torch.Size(largest[1]).numel(), "layout": model, **overrides}


def write_slices(folder: Path, model: str, overrides: dict, fraction: float, slice_ids) -> list[Path]:
    """Slice adapter folders with random values, made on a meta-device model (no weights needed)."""
    import torch

    import slice_adapter
    from slice_adapter import SliceConfig
    from slice_adapter.layer import SliceLayer
    from slice_adapter.wan_configs import build_meta_transformer

    paths = []
    gen = torch.Generator().manual_seed(1)
    for sid in slice_ids:
        meta = build_meta_transformer(common.wan_layout(model, **overrides))
        meta.add_adapter(SliceConfig(fraction=fraction, slice_id=sid))
        for layer in meta.modules():  # on a meta model the values are meta too: give them real random data
            if isinstance(layer, SliceLayer):
                values = layer.slice_values["default"]
                for pname, v in values.items():
                    values[pname] = torch.nn.Parameter(torch.randn(v.shape, generator=gen) * 0.01)
        paths.append(slice_adapter.save_adapter(meta, folder / f"slice{sid}"))
    return paths


def main(argv=None):
    parser = common.base_arg_parser(__doc__.splitlines()[0], rows=False)
    parser.add_argument("--workdir", default=None,
                        help="Where the synthetic checkpoint and outputs go (default: a temp folder under /tmp); "
                             "needs 3× the checkpoint's size free. Removed afterwards unless --keep.")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (reuse its checkpoint next time).")
    parser.add_argument("--layout", default=FULL["model"],
                        help="Wan layout of the synthetic BASE (default %(default)s, 2.8 GB; wan2.1-t2v-14b is "
                             "28.6 GB and needs twice that free). Ignored with --smoke.")
    args = parser.parse_args(argv)
    common.quiet_warnings()
    size = SMOKE if args.smoke else dict(FULL, model=args.layout)
    repeats = args.repeats or size["repeats"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="slice_ft_bench_merge_", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = work / "base.safetensors"
        info_file = work / "base.json"
        if base.exists() and info_file.exists():
            ckpt = json.loads(info_file.read_text())
        else:
            print(f"merge: writing a synthetic {size['model']} checkpoint to {base}", flush=True)
            ckpt = write_checkpoint(base, size["model"], size["overrides"])
            info_file.write_text(json.dumps(ckpt))
        slices = write_slices(work, size["model"], size["overrides"], size["fraction"], size["slices"])
        out_merge, out_copy = work / "merged.safetensors", work / "copy.safetensors"
        cli = [str(common.REPO / "scripts" / "merge_slices.py"), "--base", str(base),
               *[a for s in slices for a in ("--slice", str(s))], "--output", str(out_merge), "--no_progress"]
        child = _CHILD.format(bench=str(Path(__file__).resolve().parent), argv=cli, script=cli[0])
        # the merge ends with one fsync (a finished merge is on disk): the copies end with one too
        copy_cmd = ["sh", "-c", 'cp --reflink=never "$0" "$1" && sync "$1"', str(base), str(out_copy)]
        # the floor of a merge that streamed every byte through user space (the merge copies the kept tensors in
        # the kernel, as cp's read/write loop copies in its own buffer; only the patches pass through Python)
        pycopy_cmd = [sys.executable, "-c", _PYCOPY, str(base), str(out_copy)]
        samples = {"copy": [], "pycopy": [], "merge_cli": [], "merge_call": [], "peak_mb": [], "merge_peak_mb": [],
                   "import_peak_mb": [], "import_s": []}
        for r in range(repeats):
            # alternate the order: whoever runs second finds the base in the page cache warmed by the first
            for which in (("copy", "pycopy", "merge") if r % 2 == 0 else ("merge", "pycopy", "copy")):
                if which != "merge":
                    wall, _ = common.run_timed(copy_cmd if which == "copy" else pycopy_cmd)
                    samples[which].append(wall)
                    out_copy.unlink()
                else:
                    wall, text = common.run_timed([sys.executable, "-c", child])
                    inner = json.loads(next(l for l in text.splitlines() if l.startswith("BENCH "))[6:])
                    samples["merge_cli"].append(wall)
                    samples["merge_call"].append(inner["merge_s"])
                    # the whole process: the larger of the import phase's peak and the merge phase's
                    samples["peak_mb"].append(max(inner["import_peak_mb"], inner["merge_peak_mb"]))
                    samples["merge_peak_mb"].append(inner["merge_peak_mb"])
                    samples["import_peak_mb"].append(inner["import_peak_mb"])
                    samples["import_s"].append(inner["import_s"])
                    modules = inner["modules"]
                    out_merge.unlink()
            print(f"  repeat {r + 1}/{repeats}: copy {samples['copy'][-1]:.2f} s (Python copy "
                  f"{samples['pycopy'][-1]:.2f} s), merge CLI "
                  f"{samples['merge_cli'][-1]:.2f} s (of which the merge {samples['merge_call'][-1]:.2f} s), "
                  f"peak {samples['peak_mb'][-1]:.0f} MB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    gb = ckpt["bytes"] / 1e9
    copy = common.Summary.of(samples["copy"])
    largest_mb = ckpt["largest_tensor_bytes"] / common.MB
    limit_mb = 3 * largest_mb + 300
    rows = []
    for name, key, what in (("merge CLI, end to end", "merge_cli", "process start, imports and merge"),
                            ("merge alone (CLI after its imports)", "merge_call", "the merge_slices call")):
        ratios = common.Summary.of([c / m for c, m in zip(samples["copy"], samples[key])])
        py = common.Summary.of([c / m for c, m in zip(samples["pycopy"], samples[key])])
        row = {"name": name, "what": what, "wall_s": common.Summary.of(samples[key]).as_dict(),
               "gb_per_s": gb / common.Summary.of(samples[key]).median, "x_copy_throughput": ratios.as_dict(),
               "x_pycopy_throughput": py.as_dict(), "targets": []}
        row["targets"].append(("≥ 0.7× copy throughput", ratios.median >= 0.7, f"{ratios.median:.2f}×"))
        rows.append(row)
    peak = common.Summary.of(samples["peak_mb"])
    merge_peak = common.Summary.of(samples["merge_peak_mb"])
    imports = common.Summary.of(samples["import_peak_mb"])
    rows[0]["peak_rss_mb"] = peak.as_dict()
    rows[0]["targets"].append((f"peak < 3× largest + 300 MB = {limit_mb:.0f} MB", peak.median < limit_mb,
                               f"{peak.median:.0f} MB"))
    rows[1]["peak_rss_mb"] = merge_peak.as_dict()
    rows[1]["above_imports_mb"] = merge_peak.median - imports.median
    # the 300 MB of the target is the interpreter's allowance: what the merge itself adds gets 3× the largest tensor
    rows[1]["targets"].append((f"peak above imports < 3× largest tensor = {3 * largest_mb:.0f} MB",
                               merge_peak.median - imports.median < 3 * largest_mb,
                               f"{merge_peak.median - imports.median:.0f} MB"))
    common.write_result(
        args.output, "merge", args.smoke,
        setup={"checkpoint": ckpt, "fraction": size["fraction"], "slice_ids": list(size["slices"]),
               "repeats": repeats, "copy_command": "cp --reflink=never BASE OUT && sync OUT",
               "merge_command": "python scripts/merge_slices.py --base BASE --slice S0 --slice S1 --output OUT "
                                "--no_progress"},
        copy={"wall_s": copy.as_dict(), "gb_per_s": gb / copy.median},
        pycopy={"wall_s": common.Summary.of(samples["pycopy"]).as_dict(),
                "gb_per_s": gb / common.Summary.of(samples["pycopy"]).median,
                "what": "Python readinto/write loop, 1 MiB buffer, then fsync"},
        imports={"peak_rss_mb": imports.as_dict(), "seconds": common.Summary.of(samples["import_s"]).as_dict(),
                 "modules": modules},
        largest_tensor_mb=largest_mb,
        rows=rows,
    )


if __name__ == "__main__":
    main()
