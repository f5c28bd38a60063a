"""FSDP2 vs DDP: per-rank peak memory of slice training, on the tiny Wan and the Wan 2.1 1.3B layout (random weights).

    python benchmarks/gpu_fsdp.py              # CUDA: 4 rows, each in its own process group; about 2 minutes
    python benchmarks/gpu_fsdp.py --dry-run    # any machine: the same code on the CPU (gloo), small sizes, seconds

It writes benchmarks/results/gpu_fsdp.json and gpu_fsdp.md (the table run_all.py puts in BENCHMARKS.md; a dry run
writes *_dry_run.* instead, so it never replaces a GPU measurement). Exit status 0 when every row ran and, per
model, the FSDP2 and DDP losses agree; 1 otherwise.

Each row spawns --nproc processes (default 1: the check machine has one GPU; nccl on CUDA, gloo on the CPU), builds
the transformer in CPU memory (random float32 init, then cast like `from_pretrained(torch_dtype=bf16)`), adds the
slice (--ff), and then either
- DDP: moves the whole model to the device and wraps it in torch's DistributedDataParallel (what accelerate's
  `prepare` does for the DDP config), or
- FSDP2: `slice_ft.distributed.shard_model`, the trainer's own function (configs/accelerate/fsdp.yaml),
then runs --steps training steps: bf16 autocast, gradient checkpointing, the trainer's flow-matching loss, AdamW on
the slice values, gradients synchronized and clipped as the trainer does. Per rank it records the peak device memory
while loading/sharding and while training (torch.cuda.max_memory_allocated; none on the CPU), the frozen-base bytes
the rank holds, the largest block's bytes, and the losses.
With 1 process FSDP2 holds the whole base too: the row shows its overhead against DDP and that the base goes to the
GPU one block at a time (load peak about the base plus one block, not more); with N GPUs (--nproc N) the base per
rank is about 1/N.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the packages live at the repo root
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import torch  # noqa: E402

from common import md_table, wan_layout, write_result  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "gpu_fsdp"
NOT_MEASURED = "not yet measured"
# name: (layout, latents (B, C, F, H, W), text tokens, slice fraction)
MODELS = {
    "tiny": (dict(wan_layout("wan2.1-t2v-1.3b"), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32),
             (1, 4, 3, 16, 16), 8, 0.25),
    "wan2.1-1.3b-layout": (wan_layout("wan2.1-t2v-1.3b"), (1, 16, 5, 32, 32), 64, 1e-3),
}
DRY_RUN_MODELS = {  # the 1.3B row at a width a CPU runs in seconds: the code path, not the sizes
    "tiny": MODELS["tiny"],
    "wan2.1-1.3b-layout (2 layers, width 128)": (
        dict(wan_layout("wan2.1-t2v-1.3b"), num_attention_heads=2, attention_head_dim=64, ffn_dim=256, text_dim=64,
             num_layers=2), (1, 16, 3, 16, 16), 16, 1e-3),
}
ENGINES = ("ddp", "fsdp2")


def _worker(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    cuda = torch.cuda.is_available() and not spec["cpu"]
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        result = run_row(spec, device, rank, world)
    finally:
        torch.distributed.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _peak(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_row(spec: dict, device: torch.device, rank: int, world: int) -> dict:
    from slice_adapter import SliceConfig
    from slice_ft import distributed
    from slice_ft.components import _cast_like_from_pretrained
    from slice_ft.training import flow_matching_step, trainable_parameters

    from common import build_wan

    layout, latents_shape, text_len, fraction = spec["layout"], spec["latents"], spec["text_len"], spec["fraction"]
    model = build_wan(layout)  # CPU memory, float32
    _cast_like_from_pretrained(model, torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(SliceConfig(fraction=fraction, slice_id=0))
    model.enable_gradient_checkpointing()
    model.train()
    blocks = [m for m in model.modules() if type(m).__name__ == distributed.BLOCK_CLASS]
    block_bytes = max(sum(p.numel() * p.element_size() for n, p in b.named_parameters() if ".slice_values." not in n)
                      for b in blocks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    params = trainable_parameters(model)
    if spec["engine"] == "fsdp2":
        engine = distributed.Engine(distributed.FSDP, world_size=world)
        model = distributed.shard_model(model, engine, device)
    else:
        engine = distributed.Engine(distributed.DDP if world > 1 else distributed.SINGLE, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    load_s = time.perf_counter() - start
    load_peak = _peak(device)
    local_base, total_base = distributed.local_base_bytes(getattr(model, "module", model))
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    g = torch.Generator().manual_seed(rank)
    latents = torch.randn(*latents_shape, generator=g).to(device)
    text = torch.randn(latents_shape[0], text_len, layout["text_dim"], generator=g).to(device)
    noise = torch.randn(*latents_shape, generator=g).to(device)
    sigmas = torch.full((latents_shape[0],), 0.5, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, step_s = [], []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = flow_matching_step(model, latents, text, noise, sigmas)
        loss.backward()
        distributed.sync_slice_gradients(engine, params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s.append(time.perf_counter() - t0)
    return {"rank": rank, "load_peak": load_peak, "train_peak": _peak(device), "local_base": local_base,
            "total_base": total_base, "block_bytes": block_bytes, "losses": losses, "load_s": load_s,
            "step_s": sorted(step_s)[len(step_s) // 2]}


def measure(spec: dict, nproc: int) -> list[dict]:
    """One row: `nproc` spawned processes; every rank's record."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(nproc, port, spec, tmp), nprocs=nproc, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)]


def _mib(x) -> str:
    from slice_adapter.report import format_bytes

    return "n/a (CPU)" if x is None else format_bytes(x)


def table(rows: list[dict]) -> str:
    header = ["model", "engine", "processes", "frozen base per rank", "largest block", "load peak per rank",
              "train peak per rank", "train peak vs DDP", "median s/step", "losses"]
    ddp_peak = {r["model"]: r["ranks"][0]["train_peak"] for r in rows if r["engine"] == "ddp" and r.get("ranks")}
    lines = []
    for r in rows:
        if not r.get("ranks"):
            lines.append([r["model"], r["engine"], r["nproc"], *[NOT_MEASURED] * 7])
            continue
        worst = max(r["ranks"], key=lambda x: x["train_peak"] or 0)
        base = ddp_peak.get(r["model"])
        vs = f"{worst['train_peak'] / base:.2f}x" if base and worst["train_peak"] else "n/a"
        lines.append([r["model"], r["engine"], r["nproc"], _mib(worst["local_base"]), _mib(worst["block_bytes"]),
                      _mib(worst["load_peak"]), _mib(worst["train_peak"]), vs, f"{worst['step_s']:.3f}",
                      ", ".join(f"{x:.4f}" for x in r["ranks"][0]["losses"])])
    return md_table(header, lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="Run on the CPU (gloo) at small sizes, also where a GPU exists: checks the script.")
    parser.add_argument("--nproc", type=int, default=None,
                        help="Processes per row (default: 1 on CUDA, 2 in a dry run).")
    parser.add_argument("--steps", type=int, default=3, help="Training steps per row (the median step is reported).")
    parser.add_argument("--only", default=None, help="Comma-separated model names to run (default: all).")
    parser.add_argument("--output", default=None, help="Result path without suffix (default benchmarks/results/"
                                                       "gpu_fsdp, or gpu_fsdp_dry_run for a dry run).")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_fsdp: no CUDA device; nothing measured (use --dry-run to check the script on the CPU)")
        return 0
    nproc = args.nproc or (1 if cuda else 2)
    if cuda and nproc > torch.cuda.device_count():
        parser.error(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    output = Path(args.output) if args.output else RESULTS.with_name(RESULTS.name + ("" if cuda else "_dry_run"))
    models = MODELS if cuda else DRY_RUN_MODELS
    if args.only:
        unknown = set(args.only.split(",")) - set(models)
        if unknown:
            parser.error(f"--only {args.only}: unknown model(s) {sorted(unknown)}; the models are {list(models)}")
        models = {k: v for k, v in models.items() if k in args.only.split(",")}
    rows, ok = [], True
    for name, (layout, latents, text_len, fraction) in models.items():
        losses = {}
        for engine in ENGINES:
            spec = {"layout": layout, "latents": latents, "text_len": text_len, "fraction": fraction,
                    "engine": engine, "steps": args.steps, "cpu": not cuda}
            t0 = time.perf_counter()
            ranks = measure(spec, nproc)
            print(f"gpu_fsdp: {name} {engine} x{nproc}: {time.perf_counter() - t0:.1f} s, train peak "
                  f"{_mib(max(r['train_peak'] or 0 for r in ranks) if cuda else None)}, losses {ranks[0]['losses']}",
                  flush=True)
            rows.append({"model": name, "engine": engine, "nproc": nproc, "ranks": ranks})
            losses[engine] = ranks[0]["losses"]
        same = all(abs(a - b) <= 0.02 * max(abs(a), 1e-6) for a, b in zip(losses["ddp"], losses["fsdp2"]))
        if not same:
            print(f"gpu_fsdp: {name}: FSDP2 losses {losses['fsdp2']} differ from DDP's {losses['ddp']}", flush=True)
        ok &= same
    device = torch.cuda.get_device_name(0) if cuda else "none (dry run on the CPU)"
    md = "\n".join([f"- GPU: {device}", f"- Command: `python benchmarks/gpu_fsdp.py{' --dry-run' if not cuda else ''}`",
                    f"- FSDP2 and DDP losses agree: {'yes' if ok else 'NO'}", "", table(rows), ""])
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".md.tmp")
    tmp.write_text(md)
    os.replace(tmp, output.with_suffix(".md"))
    write_result(output.with_suffix(".json"), "gpu_fsdp", not cuda, rows=rows, losses_agree=ok)
    print(md)
    return 0 if ok else 1


def plan_table() -> str:
    """The table before any GPU run: every row, not yet measured."""
    return table([{"model": m, "engine": e, "nproc": 1} for m in MODELS for e in ENGINES])


if __name__ == "__main__":
    sys.exit(main())
