"""Low-VRAM table: peak VRAM and s/step of slice training on Wan 14B with block swap / fp8 base vs a LoRA baseline.

One command runs the whole table on a CUDA GPU and writes it as markdown to stdout and to --output (by default
benchmarks/results/gpu/lowvram_14b.md, which run_all.py puts in BENCHMARKS.md):

    python benchmarks/gpu_lowvram.py

The model is the real Wan 2.1/2.2 14B transformer config with random bf16 weights (built on meta, then materialized
block by block; swapped blocks go straight to pinned CPU memory), 480x832, 81 frames (latents 1x16x21x60x104), text
1x512x4096, gradient checkpointing, bf16 autocast, AdamW on the trainable tensors. Peak VRAM is
torch.cuda.max_memory_allocated over the timed steps (weights included); s/step is the median after warm-up. On a GPU
each row runs in its own Python process (--no-isolate to keep one), so no row inherits another's allocator state,
pinned host memory or a sticky CUDA error; --rows N measures one row, --rows 3,1,2 measures in that order (the
table keeps its own). --budget_s caps the whole table (what the GPU check, benchmarks/gpu_check.py, gives it):
the table is rewritten after every row, and rows it did not reach say "not run".
Without CUDA it prints why, writes the table with "not yet measured" rows and exits 0 (--plan_only does that on
purpose, on any machine). --smoke runs the same code path on CPU with a tiny config in seconds (CI).
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the packages live at the repo root
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slice_adapter.wan_configs import wan_config  # noqa: E402

WAN_14B = wan_config("wan2.1-t2v-14b")
LATENTS_14B = (1, 16, 21, 60, 104)  # 81 frames at 480x832 through the Wan VAE (4x temporal, 8x spatial)
TEXT_14B = (1, 512, 4096)

TINY = dict(WAN_14B, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
            freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=64)
LATENTS_TINY = (1, 4, 3, 8, 8)
TEXT_TINY = (1, 8, 32)


@dataclass(frozen=True)
class Row:
    label: str
    adapter: str  # "slice" or "lora"
    base_dtype: str  # "bf16" or "fp8"
    swap: str  # "none", "half" or "max": 0, num_layers // 2, num_layers - 1 (0 / 20 / 39 on the 14B)
    offload_activations: bool = False  # --gradient_checkpointing_cpu_offload

    def blocks_to_swap(self, num_layers: int) -> int:
        return {"none": 0, "half": num_layers // 2, "max": num_layers - 1}[self.swap]


ROWS = (
    Row("slice", "slice", "bf16", "none"),
    Row("slice + block swap", "slice", "bf16", "half"),
    Row("slice + block swap (all) + activation offload", "slice", "bf16", "max", True),
    Row("slice + block swap (all), activations on the GPU", "slice", "bf16", "max"),
    Row("slice + fp8 base", "slice", "fp8", "none"),
    Row("LoRA baseline (equal trainable weights)", "lora", "bf16", "none"),
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
NOT_MEASURED = "not yet measured"
NOT_RUN = "not run"  # a GPU run's row it did not reach (time budget, or the run was killed)
RESULTS = REPO / "benchmarks" / "results" / "gpu" / "lowvram_14b.md"
SMOKE_RESULTS = REPO / "benchmarks" / "results" / "lowvram_smoke.md"


def _versions() -> str:
    import accelerate
    import diffusers
    import peft

    cuda = torch.version.cuda or "none"
    return (
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {cuda}), diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}, accelerate {accelerate.__version__}"
    )


def _init_(t: torch.Tensor, module_name: str, pname: str, gen: torch.Generator) -> None:
    # Scale like a trained model (unit-ish activations): fan-in init for matrices, ones for norm weights.
    if pname == "scale_shift_table":
        t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=gen)
    elif t.dim() >= 2:
        t.normal_(0.0, 1.0 / math.sqrt(math.prod(t.shape[1:])), generator=gen)
    elif "norm" in module_name.rsplit(".", 1)[-1] and pname == "weight":
        t.fill_(1.0)
    else:
        t.normal_(0.0, 0.02, generator=gen)


def build_transformer(cfg: dict, device: torch.device, dtype: torch.dtype, offload_blocks: set, seed: int = 0):
    """Random Wan transformer: parameters made on meta, then materialized one block at a time on `device`.

    Blocks in `offload_blocks` are moved to pinned CPU memory right after their init, so building a swapped model
    never needs more device memory than the resident part plus one block. Buffers (RoPE tables) are real from the
    start (init_empty_weights leaves buffers alone, float32 as from_pretrained keeps `rope`) and are placed by
    enable_block_swap.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        model = WanTransformer3DModel(**cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    pin = device.type == "cuda"
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for module_name, module in model.named_modules():  # definition order: one block after the other
        parts = module_name.split(".")
        block = int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 else None
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            # as from_pretrained(torch_dtype=bf16) does: modulation tables and fp32 norms stay float32
            pdtype = torch.float32 if any(k in full.split(".") for k in keep_fp32) else dtype
            t = torch.empty(p.shape, dtype=pdtype, device=device)
            _init_(t, module_name, pname, gen)
            if block in offload_blocks:
                cpu = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                cpu.copy_(t)
                t = cpu
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    return model.train()


def _count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def slice_trainable_count(cfg: dict, fraction: float) -> int:
    """Trainable weights of a slice adapter at `fraction` on this config (counted on a meta model)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from slice_adapter import SliceConfig

    with init_empty_weights():
        model = WanTransformer3DModel(**cfg)
    model.add_adapter(SliceConfig(fraction=fraction, slice_id=0))
    return _count_trainable(model)


def lora_params_per_rank(cfg: dict) -> int:
    """Trainable weights per unit of LoRA rank on LORA_TARGETS in every block: sum of (in + out) features."""
    d, ffn, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    return layers * (8 * (d + d) + (d + ffn) + (ffn + d))  # attn1 + attn2 (4 each, d x d), ffn up and down


def lora_rank_for(cfg: dict, trainable: int) -> int:
    """LoRA rank on every block Linear whose r * sum(in + out) is closest to `trainable`."""
    return max(1, round(trainable / lora_params_per_rank(cfg)))


def add_adapter(model, row: Row, fraction: float, lora_rank: int) -> None:
    if row.adapter == "slice":
        from slice_adapter import SliceConfig

        model.add_adapter(SliceConfig(fraction=fraction, slice_id=0))
    else:
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=LORA_TARGETS,
                                     init_lora_weights=True))


def run_row(row: Row, cfg: dict, latents: tuple, text: tuple, device: torch.device, dtype: torch.dtype,
            fraction: float, lora_rank: int, steps: int, warmup: int) -> dict:
    """Build, set up in the training script's order, train `warmup + steps` steps; peak VRAM and median s/step."""
    from contextlib import nullcontext

    from slice_ft.offload import enable_block_swap, offload_saved_activations, quantize_base_to_fp8

    n_swap = row.blocks_to_swap(cfg["num_layers"])
    cuda = device.type == "cuda"
    model = build_transformer(cfg, device, dtype, set(range(cfg["num_layers"] - n_swap, cfg["num_layers"])))
    # The training script's order: adapter -> fp8 -> checkpointing -> block swap -> optimizer (-> accelerate.prepare
    # with device_placement=False, which changes nothing on one device).
    add_adapter(model, row, fraction, lora_rank)
    if row.base_dtype == "fp8":
        quantize_base_to_fp8(model)
    model.enable_gradient_checkpointing()
    enable_block_swap(model, n_swap, device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5)

    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(latents, generator=gen, device=device, dtype=dtype)
    noise = torch.randn(latents, generator=gen, device=device, dtype=dtype)
    enc = torch.randn(text, generator=gen, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast, (offload_saved_activations() if row.offload_activations else nullcontext()):
            pred = model(x, t, enc, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), (noise - x).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()  # waits for the step (CUDA)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        del pred
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    del model, opt, params
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return dict(blocks_to_swap=n_swap, trainable=trainable, peak_gib=peak, s_per_step=statistics.median(times),
                loss=loss)


def measure_row(row: Row, cfg: dict, latents: tuple, text: tuple, device, dtype, fraction: float, lora_rank: int,
                steps: int, warmup: int) -> dict:
    """run_row's result, or {"failure": (kind, message)} for an OOM ("OOM") or any other error ("error")."""
    try:
        return run_row(row, cfg, latents, text, device, dtype, fraction, lora_rank, steps, warmup)
    except torch.cuda.OutOfMemoryError as e:
        failure = ("OOM", str(e).split("\n")[0][:100])
    except Exception as e:  # reported in the row; the others still run and the exit code says it failed
        failure = ("error", f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    gc.collect()  # the traceback is gone here, so the failed run's tensors can be freed
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"failure": failure}


def measure_row_in_subprocess(index: int, passthrough: list, timeout: float) -> dict:
    """The same measurement in a fresh Python process (its own CUDA context, allocator and pinned memory), so one
    row's fragmentation, cached pinned blocks or a sticky CUDA error cannot change the next row."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rows", str(index), "--row_json", str(out),
               *passthrough]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"failure": ("timeout", f"no result within --row_timeout {timeout:g} s")}
        if out.exists():
            return json.loads(out.read_text())
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:100]
        return {"failure": ("error", f"exit status {proc.returncode}: {last}")}


def format_table(header: list, rows: list) -> str:
    lines = header + [
        "",
        "| run | adapter | base | blocks_to_swap | activation offload | trainable params | peak VRAM (GiB) | s/step "
        "| note | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None,
                        help=f"markdown table (default {RESULTS.relative_to(REPO)}, which run_all.py puts in "
                             f"BENCHMARKS.md; --smoke: {SMOKE_RESULTS.relative_to(REPO)})")
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU (same code path, seconds)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--fraction", type=float, default=1e-3,
                        help="slice fraction; the LoRA baseline's rank matches its trainable count")
    parser.add_argument("--rows", type=str, default=None,
                        help="comma-separated row numbers (1-based) to run; default all")
    parser.add_argument("--plan_only", action="store_true",
                        help="run nothing: write the rows and their commands with 'not yet measured' (what "
                             "run_all.py puts in BENCHMARKS.md until a GPU run has written --output)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="measure each row in its own Python process (default: on for GPU runs, off for --smoke)")
    parser.add_argument("--row_timeout", type=float, default=1800, help="seconds per isolated row before it is "
                        "reported as a timeout")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="seconds for the whole table: an isolated row gets at most what is left, and a row that "
                             "would start with less than --min_row_s left is reported as not run (the GPU check's "
                             "time box); the table is rewritten after every row, so a killed run keeps its rows")
    parser.add_argument("--min_row_s", type=float, default=30, help="with --budget_s: the least time a row starts with")
    parser.add_argument("--row_json", type=Path, default=None, help=argparse.SUPPRESS)  # an isolated row's result
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = SMOKE_RESULTS if args.smoke else RESULTS
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    selected = ROWS
    if args.rows:
        try:
            selected = tuple(ROWS[int(i) - 1] for i in args.rows.split(","))
        except (ValueError, IndexError):
            parser.error(f"--rows must list numbers in 1..{len(ROWS)}, got {args.rows!r}")

    cuda = torch.cuda.is_available() and not args.plan_only
    if args.smoke and args.plan_only:
        parser.error("--smoke runs the tiny config on CPU; --plan_only runs nothing: pass one of them")
    if args.row_json is not None and len(selected) != 1:
        parser.error("--row_json measures exactly one row: pass --rows N")
    # a child (--row_json) measures in its own process; rows are measured at all only on CUDA or with --smoke
    isolate = args.row_json is None and (args.isolate if args.isolate is not None else cuda and not args.smoke)
    if args.smoke:
        cfg, latents, text, device, dtype = TINY, LATENTS_TINY, TEXT_TINY, torch.device("cpu"), torch.float32
        gpu = "none (--smoke: tiny config on CPU, block swap emulated with a second CPU copy)"
    else:
        cfg, latents, text, dtype = WAN_14B, LATENTS_14B, TEXT_14B, torch.bfloat16
        device = torch.device("cuda") if cuda else None
        gpu = (torch.cuda.get_device_name(0) if cuda else
               "none: --plan_only" if args.plan_only else "none: CUDA is not available")
    model_desc = (
        f"Wan transformer dim {cfg['num_attention_heads'] * cfg['attention_head_dim']}, "
        f"{cfg['num_attention_heads']} heads x {cfg['attention_head_dim']}, ffn {cfg['ffn_dim']}, "
        f"{cfg['num_layers']} layers, random {'fp32' if dtype == torch.float32 else 'bf16'} weights; "
        f"latents {latents}, text {text}"
    )
    header = [
        f"# slice-ft low-VRAM training ({'smoke, tiny config' if args.smoke else 'Wan 14B, 480x832, 81 frames'})",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/gpu_lowvram.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- GPU: {gpu}",
        f"- versions: {_versions()}",
        f"- model: {model_desc}",
        f"- training: slice fraction {args.fraction:g}, gradient checkpointing, "
        f"{'bf16 autocast, ' if not args.smoke else ''}AdamW; s/step = median of {args.steps} steps after "
        f"{args.warmup} warm-up; peak VRAM = torch.cuda.max_memory_allocated over those steps (weights included)",
    ]

    trainable_slice = slice_trainable_count(cfg, args.fraction)
    rank = lora_rank_for(cfg, trainable_slice)
    status = 0
    if not args.smoke and not cuda and not args.plan_only:
        print("CUDA is not available: nothing measured; writing the table with 'not yet measured' rows "
              "(use --smoke for the CPU code path).", file=sys.stderr)
    def base_name(row: Row) -> str:
        return "fp8 e4m3" if row.base_dtype == "fp8" else {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]

    passthrough = ["--smoke"] if args.smoke else []
    for name in ("steps", "warmup", "fraction"):  # what a row's command must repeat to measure the same
        value = getattr(args, name)
        passthrough += [f"--{name}", f"{value:g}"] if value != parser.get_default(name) else []

    def settings_of(row: Row) -> list:
        return [row.label, row.adapter, base_name(row), row.blocks_to_swap(cfg["num_layers"]),
                "yes" if row.offload_activations else "no"]

    def command_of(row: Row) -> str:
        return "`" + shlex.join(["python", "benchmarks/gpu_lowvram.py", "--rows", str(ROWS.index(row) + 1),
                                 *passthrough]) + "`"

    def expected_trainable(row: Row) -> str:
        return (f"~{trainable_slice:,}" if row.adapter == "slice" else
                f"~{rank * lora_params_per_rank(cfg):,} (rank {rank})")

    # Rows are measured in the order --rows gives (most wanted first) and listed in the table's own order; the
    # table is rewritten after each row, with the rows still to come marked, so a run killed half-way keeps its rows.
    cells = {ROWS.index(row): settings_of(row) + [expected_trainable(row), NOT_RUN, NOT_RUN,
                                                   "not reached: the run ended before this row", command_of(row)]
             for row in selected}

    def write_table() -> str:
        table = format_table(header, [cells[i] for i in sorted(cells)])
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(table)
        tmp.replace(args.output)
        return table

    start = time.monotonic()
    if not args.smoke and not cuda:
        selected = ()  # nothing to measure: every row says so below
        for i in cells:
            cells[i][6:9] = [NOT_MEASURED, NOT_MEASURED,
                             "" if args.plan_only else "no CUDA GPU on the machine that ran this"]
    for row in selected:
        index = ROWS.index(row)
        note = f"LoRA rank {rank} on {', '.join(LORA_TARGETS)}" if row.adapter == "lora" else ""
        command, settings = command_of(row), settings_of(row)
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - start)
        if left is not None and left < args.min_row_s and args.row_json is None:
            cells[index][8] = f"skipped: the time budget (--budget_s {args.budget_s:g}) was spent"
            status = 1
            continue
        if args.row_json is not None:  # the child of an isolated run: measure, hand the result back, no table
            import json

            r = measure_row(row, cfg, latents, text, device, dtype, args.fraction, rank, args.steps, args.warmup)
            args.row_json.write_text(json.dumps(r))
            return 0
        if isolate:
            timeout = args.row_timeout if left is None else min(args.row_timeout, left)
            r = measure_row_in_subprocess(index + 1, passthrough, timeout)
        else:
            r = measure_row(row, cfg, latents, text, device, dtype, args.fraction, rank, args.steps, args.warmup)
        if "failure" in r:
            kind, message = r["failure"]
            status = status if kind == "OOM" else 1  # running out of memory is a result; anything else is a bug
            cells[index] = settings + ["", kind, kind, message, command]
        else:
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a (CPU)"
            if not math.isfinite(r["loss"]):
                note = (note + "; " if note else "") + f"non-finite loss {r['loss']}"
                status = 1
            cells[index] = settings + [f"{r['trainable']:,}", peak, f"{r['s_per_step']:.3f}", note, command]
        write_table()
    print(write_table())
    return status


if __name__ == "__main__":
    sys.exit(main())
