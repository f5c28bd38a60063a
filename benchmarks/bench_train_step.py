"""Training step on CPU: frozen base (input gradients only), slices, PEFT LoRA and SHiRA of equal trainable
weights, and full fine-tuning of the blocks. Step time and peak memory, each as a ratio to the frozen base.
Then a sweep over token counts (clip sizes): the same step for frozen, slice (default and Linear-only), LoRA and
SHiRA, eager and torch.compile'd blocks, and unmerged-slice inference against the base, ratios per token count.

    python benchmarks/bench_train_step.py --output /tmp/train_step.json
    python benchmarks/bench_train_step.py --output /tmp/train_step.json --sweep-only --tokens 192,768,3072
    python benchmarks/bench_train_step.py --output /tmp/train_step_gpu.json --sweep-only --gpu   # a GPU lent
    python benchmarks/bench_train_step.py --output /tmp/train_depth.json --depth   # 2 vs 8 blocks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL = dict(blocks=2, latent=(1, 16, 3, 16, 16), text_len=64, repeats=5, calls=1, warmup=2, fractions=(1e-3, 1e-2),
            sweep=dict(tokens=(192, 768, 3072), compiled_tokens=(3072,), repeats=3, warmup=1))
# Smoke: the real code paths on a toy layout, so the script cannot rot; the numbers mean nothing.
SMOKE = dict(blocks=1, latent=(1, 16, 1, 4, 4), text_len=4, repeats=2, calls=1, warmup=1, fractions=(1e-3, 1e-2),
             layout=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32),
             # compiled rows are left out of the smoke run: kernel builds take minutes on a CPU
             sweep=dict(tokens=(16,), compiled_tokens=(), repeats=2, warmup=1))
# A GPU lent: Wan 14B width, one block, up to a 480x832x81 clip (21 x 30 x 52 = 32,760 tokens), bf16 autocast.
GPU = dict(blocks=1, text_len=512, layout_name="wan2.1-t2v-14b",
           sweep=dict(tokens=(3072, 8190, 16380, 32760), compiled_tokens=(3072, 8190, 16380, 32760), repeats=5,
                      warmup=2))
# Depth: the default slice's extra over the Linear-only slice and LoRA, at 2 and 8 blocks: a cost of the first block
# alone would weigh less as blocks are added (Wan 1.3B has 30 blocks, 14B 40), a cost of every block would not.
# Compiled at 768 tokens too, for the tensor peak: what a compiled block keeps is the frozen base's; what the default
# slice keeps more there (its norm and modulation products whole) grows with depth, a transient's share falls.
DEPTH = dict(blocks=(2, 8), sweep=dict(tokens=(192, 768), compiled_tokens=(768,), repeats=2, warmup=1))
SMOKE_DEPTH = dict(blocks=(1, 2), sweep=dict(tokens=(16,), compiled_tokens=(), repeats=2, warmup=1))
SWEEP_FRACTION = 1e-3
# latent (frames, height, width) per token count (tokens = frames * height/2 * width/2, Wan's 1x2x2 patches)
LATENT_FOR_TOKENS = {4: (1, 4, 4), 16: (1, 8, 8), 192: (3, 16, 16), 768: (3, 32, 32), 3072: (3, 64, 64),
                     8190: (21, 30, 52), 16380: (21, 60, 52), 32760: (21, 60, 104)}


def setup(spec: dict):
    """Worker side: the model, its trainable parameters and one optimizer step (or one no-grad forward) as a
    closure. Compiled rows build their kernels here (the workers compile in parallel, before any timing)."""
    import contextlib

    import torch

    from slice_ft.flow_matching import flow_matching_loss

    device = torch.device(spec.get("device", "cpu"))
    model = common.build_wan(spec["config"]).to(device)
    model.train(spec.get("mode", "train") == "train")
    params = common.apply_method(model, spec["method"], fraction=spec.get("fraction", 1e-3), rank=spec.get("rank", 1),
                                 target_modules=spec.get("target_modules"))
    if spec.get("init_random"):  # inference: random deltas, so a layer cannot skip a zero slice
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.02)
        model.requires_grad_(False)
    if spec.get("compiled"):
        from slice_ft.compile import compile_blocks

        compile_blocks(model)
    inputs = {k: v.to(device) for k, v in common.wan_inputs(spec["config"], spec["latent"], spec["text_len"]).items()}
    target = torch.randn_like(inputs["hidden_states"])
    frozen = spec["method"] == "frozen"
    latents = inputs["hidden_states"].requires_grad_(frozen and spec.get("mode", "train") == "train")
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params and spec.get("mode", "train") == "train" else None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec.get("autocast")
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with autocast:
            pred = model(latents, inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)[0]
        flow_matching_loss(pred.float(), target).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            latents.grad = None
        sync()

    def infer():
        with torch.inference_mode(), autocast:
            model(latents, inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)
        sync()

    run = infer if spec.get("mode") == "infer" else step
    if spec.get("compiled"):
        run()  # kernel build
    trainable = sum(p.numel() for p in params) if spec.get("mode", "train") == "train" else 0
    return run, {"trainable": trainable}


def configurations(size: dict) -> tuple[dict, dict]:
    """(layout, specs by row name): "lora 0.001" is the LoRA whose rank matches the trainable weights of "slice 0.001"."""
    import slice_adapter
    from slice_adapter import SliceConfig
    from slice_adapter.wan_configs import build_meta_transformer

    config = common.wan_layout(num_layers=size["blocks"], **size.get("layout", {}))
    meta = build_meta_transformer(config)
    base = dict(config=config, latent=size["latent"], text_len=size["text_len"])
    specs = {"frozen": dict(base, method="frozen")}
    for fraction in size["fractions"]:
        selected = slice_adapter.plan(meta, SliceConfig(fraction=fraction)).selected
        rank = common.equal_rank(meta, selected)
        tag = f"{fraction:g}"
        specs[f"slice {tag}"] = dict(base, method="slice", fraction=fraction, equal_to=tag)
        specs[f"lora {tag}"] = dict(base, method="lora", rank=rank, equal_to=tag)
        specs[f"shira {tag}"] = dict(base, method="shira", rank=rank, equal_to=tag)
    specs["full"] = dict(base, method="full")
    return config, specs


def evaluate(results: dict, specs: dict) -> list[dict]:
    """Rows with ratios to the frozen base and the issue's targets checked on the slice rows."""
    rows = []
    frozen_peak = results["frozen"].memory["peak_rss_mb"]
    for name, spec in specs.items():
        res = results[name]
        row = {
            "name": name,
            "method": spec["method"],
            "rank": spec.get("rank"),
            "trainable": res.info["trainable"],
            "wall_s": res.summary("wall").as_dict(),
            "cpu_s": res.summary("cpu").as_dict(),
            "x_frozen_wall": common.ratio_summary(results, name, "frozen", "wall").as_dict(),
            "x_frozen_cpu": common.ratio_summary(results, name, "frozen", "cpu").as_dict(),
            "peak_rss_mb": res.memory["peak_rss_mb"],
            "loaded_rss_mb": res.info["rss_ready_mb"],
            "peak_x_frozen": res.memory["peak_rss_mb"] / frozen_peak,
            "targets": [],
        }
        if spec["method"] == "slice":
            lora = next(n for n, s in specs.items() if s["method"] == "lora" and s["equal_to"] == spec["equal_to"])
            vs_lora = common.ratio_summary(results, name, lora, "wall")
            lora_peak = results[lora].memory["peak_rss_mb"]
            row["x_lora_wall"] = vs_lora.as_dict()
            row["x_lora_cpu"] = common.ratio_summary(results, name, lora, "cpu").as_dict()
            if spec["fraction"] == 1e-3:
                r = row["x_frozen_wall"]["median"]
                row["targets"].append(("step ≤ 1.05× frozen", r <= 1.05, f"{r:.3f}×"))
            row["targets"].append(("step ≤ LoRA's", vs_lora.median <= 1.0, f"{vs_lora.median:.3f}× {lora}"))
            mr = row["peak_rss_mb"] / lora_peak
            row["targets"].append(("peak memory ≤ LoRA's", mr <= 1.0, f"{mr:.3f}× {lora}"))
        rows.append(row)
    return rows


def sweep_specs(size: dict, tokens: int, compiled: bool, device: str = "cpu") -> tuple[dict, dict]:
    """(layout, specs) of one token count: training rows (and, eager, the two inference rows)."""
    import slice_adapter
    from slice_adapter import SliceConfig
    from slice_adapter.wan_configs import build_meta_transformer

    config = common.wan_layout(size.get("layout_name", "wan2.1-t2v-1.3b"), num_layers=size["blocks"],
                               **size.get("layout", {}))
    meta = build_meta_transformer(config)
    rank = common.equal_rank(meta, slice_adapter.plan(meta, SliceConfig(fraction=SWEEP_FRACTION)).selected)
    frames, height, width = LATENT_FOR_TOKENS[tokens]
    base = dict(config=config, latent=(1, config["in_channels"], frames, height, width), text_len=size["text_len"],
                compiled=compiled, device=device, autocast=device != "cpu", tokens=tokens)
    specs = {
        "frozen": dict(base, method="frozen"),
        "slice": dict(base, method="slice", fraction=SWEEP_FRACTION),
        "slice Linear-only": dict(base, method="slice", fraction=SWEEP_FRACTION, target_modules=common.BLOCK_LINEARS),
        "lora": dict(base, method="lora", rank=rank),
    }
    if not compiled:  # SHiRA builds a dense weight per forward whatever the compiler does: eager only
        specs["shira"] = dict(base, method="shira", rank=rank)
        specs["infer base"] = dict(base, method="frozen", mode="infer")
        specs["infer slice"] = dict(base, method="slice", fraction=SWEEP_FRACTION, mode="infer", init_random=True)
    return config, specs


def sweep_rows(results: dict, specs: dict, tokens: int, compiled: bool, on_gpu: bool) -> list[dict]:
    """One row per configuration with its ratios (same group, same rounds) and the issue's targets."""
    rows = []

    def act_mb(name):
        res = results[name]
        if on_gpu:
            return res.memory.get("cuda_peak_mb", float("nan")) - res.info.get("cuda_ready_mb", 0.0)
        return res.memory.get("tensor_peak_mb")  # the CPU's counterpart of the CUDA peak: tensors only

    def rss_rise_mb(name):
        # first call in a fresh process; a compiled row built its kernels before it, so its rise is not comparable
        return None if compiled or on_gpu else results[name].info.get("first_call_rss_rise_mb")

    frozen_act, frozen_rss = act_mb("frozen"), rss_rise_mb("frozen")
    for name, spec in specs.items():
        infer = spec.get("mode") == "infer"
        baseline = "infer base" if infer else "frozen"
        ratio = common.ratio_summary(results, name, baseline, "wall")
        row = {"tokens": tokens, "compiled": compiled, "name": name, "method": spec["method"],
               "mode": spec.get("mode", "train"), "rank": spec.get("rank"),
               "trainable": results[name].info["trainable"],
               "wall_s": results[name].summary("wall").as_dict(), "x_base_wall": ratio.as_dict(),
               "x_base_cpu": common.ratio_summary(results, name, baseline, "cpu").as_dict(), "targets": []}
        if not infer:
            act = act_mb(name)
            row["activation_mb"] = act
            row["activation_x_frozen"] = act / frozen_act if act is not None and frozen_act else None
            rss = rss_rise_mb(name)
            row["rss_rise_mb"] = rss
            row["rss_rise_x_frozen"] = rss / frozen_rss if rss is not None and frozen_rss else None
        if name.startswith("slice"):
            vs_lora = common.ratio_summary(results, name, "lora", "wall")
            row["x_lora_wall"] = vs_lora.as_dict()
            if tokens >= 3072:
                row["targets"].append(("step ≤ 1.05× frozen", ratio.median <= 1.05, f"{ratio.median:.3f}×"))
            row["targets"].append(("step ≤ LoRA's", vs_lora.median <= 1.0, f"{vs_lora.median:.3f}×"))
            if row.get("activation_x_frozen") is not None:
                ax = row["activation_x_frozen"]
                row["targets"].append(("activation memory ≤ 1.1× frozen", ax <= 1.1, f"{ax:.2f}×"))
        if infer and spec["method"] == "slice":
            row["targets"].append(("unmerged ≤ 1.03× base", ratio.median <= 1.03, f"{ratio.median:.3f}×"))
        rows.append(row)
    return rows


def token_counts(text, default) -> list[int]:
    """`--tokens` as token counts (`default` when not given); ValueError naming those without a latent shape."""
    if not text:
        return list(default)
    known = {str(t): t for t in LATENT_FOR_TOKENS}
    unknown = [t for t in text.split(",") if t.strip() not in known]
    if unknown:
        raise ValueError(f"--tokens {unknown} not supported; choose from {sorted(LATENT_FOR_TOKENS)}")
    return [known[t.strip()] for t in text.split(",")]


def run_sweep(size: dict, args, device: str, partial=None, profile: tuple = ()) -> dict:
    """Every token count eager, then the compiled groups; `partial(sweep)` is called after each group, so a run
    stopped early still leaves its finished groups in the result. `profile`: (configuration, baseline) profiled op
    by op after each group's timing; the summary goes in the group's rows as `profile`."""
    sw = size["sweep"]
    try:
        tokens = token_counts(args.tokens, sw["tokens"])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    rows = []
    groups = [(t, False) for t in tokens]
    groups += [(t, True) for t in tokens if not args.no_compile and t in sw["compiled_tokens"]]
    # a short step's ratio swings more from round to round, and its verdicts (LoRA parity, unmerged inference) turn
    # on a percent: rounds in inverse proportion to the step (up to 15x at 192), so each group takes about as long
    repeats_at = {t: args.repeats or sw["repeats"] * min(15, max(1, round(3072 / t))) for t in tokens}
    sweep = {"device": device, "fraction": SWEEP_FRACTION, "repeats": repeats_at, "warmup": sw["warmup"],
             "threads": args.threads, "text_len": size["text_len"], "rows": rows}
    for t, compiled in groups:
        config, specs = sweep_specs(size, t, compiled, device)
        if args.only:  # the named rows with the baselines they are compared to
            wanted = {n.strip() for n in args.only.split(",")} & set(specs)
            keep = wanted | {"frozen"} | ({"lora"} & set(specs) if any(n.startswith("slice") for n in wanted) else set())
            keep |= {"infer base"} if "infer slice" in wanted else set()
            specs = {n: spec for n, spec in specs.items() if n in keep}
        print(f"sweep: {t} tokens, {'compiled' if compiled else 'eager'}: {len(specs)} configurations", flush=True)
        training = tuple(n for n, spec in specs.items() if spec.get("mode", "train") == "train")
        results = common.run_interleaved(setup, specs, repeats=repeats_at[t], calls=1, warmup=sw["warmup"],
                                         threads=args.threads, inline=args.smoke, profile=profile,
                                         tensor_peak=training if device == "cpu" else ())
        group = sweep_rows(results, specs, t, compiled, device != "cpu")
        if profile:
            for row in group:
                row["profile"] = common.profile_summary(results, *profile)
        rows += group
        sweep["layout"] = {k: config[k] for k in common.LAYOUT_KEYS}
        if partial is not None:
            partial(sweep)
    return sweep


def loader_throughput(smoke: bool, workers=(0, 2), clips: int = 2) -> dict:
    """Clips per second the BucketedLoader delivers for a 480x832x81 clip (a Wan 14B sample: 32,760 tokens),
    decoding in this process and in DataLoader workers, with and without a mid-clip seek (--frame_stride)."""
    import tempfile
    import time

    import numpy as np

    from slice_ft.corpus import write_video
    from slice_ft.data import BucketConfig, BucketedLoader, build_dataset

    height, width, frames, total = (32, 48, 5, 9) if smoke else (480, 832, 81, 121)
    rows = []
    with tempfile.TemporaryDirectory(prefix="slice_ft_loader_") as folder:
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (1, height, width, 3), dtype=np.uint8)
        video = np.concatenate([np.roll(base, 4 * k, axis=2) for k in range(total)])  # moving texture
        lines = []
        for k in range(clips):
            write_video(Path(folder) / f"clip{k}.mp4", video, fps=16)
            lines.append(f'{{"file_name": "clip{k}.mp4", "text": "a moving texture"}}')
        (Path(folder) / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        buckets = BucketConfig([(width, height)], [frames])
        for stride in (None, 1):
            for n in workers if stride is None or not smoke else (0,):  # smoke: the worker path once
                loader = BucketedLoader(build_dataset(folder), buckets, batch_size=1, shuffle=False,
                                        num_workers=n, frame_stride=stride)
                t0 = time.perf_counter()
                got = sum(b["pixel_values"].shape[0] for b in loader)
                wall = time.perf_counter() - t0
                rows.append({"num_workers": n, "frame_stride": stride, "clips": got, "seconds": wall,
                             "clips_per_s": got / wall, "seek": True})
                print(f"loader: {n} workers, frame_stride {stride}: {got / wall:.2f} clips/s", flush=True)
        # the same mid-clip frames decoded from frame 0 (no seek), in this process: what the seek saves
        from slice_ft import data as data_mod

        seeking = data_mod._frames_from
        data_mod._frames_from = lambda container, stream, first: enumerate(container.decode(stream))
        try:
            loader = BucketedLoader(build_dataset(folder), buckets, batch_size=1, shuffle=False, frame_stride=1)
            t0 = time.perf_counter()
            got = sum(b["pixel_values"].shape[0] for b in loader)
            wall = time.perf_counter() - t0
        finally:
            data_mod._frames_from = seeking
        rows.append({"num_workers": 0, "frame_stride": 1, "clips": got, "seconds": wall, "clips_per_s": got / wall,
                     "seek": False})
        print(f"loader: 0 workers, frame_stride 1, no seek: {got / wall:.2f} clips/s", flush=True)
    return {"clip": [frames, height, width], "source_frames": total, "rows": rows}


def main(argv=None):
    parser = common.base_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=None, help="Comma-separated token counts of the sweep "
                        f"(of {sorted(LATENT_FOR_TOKENS)}; default CPU 192,768,3072).")
    parser.add_argument("--no-compile", action="store_true", help="Leave the compiled rows out of the sweep.")
    parser.add_argument("--sweep-only", action="store_true", help="Measure the token sweep only.")
    parser.add_argument("--no-sweep", action="store_true", help="Measure the fixed-size table only.")
    parser.add_argument("--no-loader", action="store_true", help="Leave out the input pipeline's clips per second.")
    parser.add_argument("--loader-only", action="store_true", help="Measure the input pipeline only.")
    parser.add_argument("--gpu", action="store_true",
                        help="Sweep on the GPU: Wan 14B width, one block, bf16 autocast, up to 32,760 tokens.")
    parser.add_argument("--depth", action="store_true",
                        help="Only the depth check: frozen, slice (default and Linear-only) and LoRA, eager at 192 "
                             "and 768 tokens and compiled at 768, with 2 and with 8 blocks.")
    args = parser.parse_args(argv)
    common.quiet_warnings()
    size = SMOKE if args.smoke else FULL
    if args.depth:
        common.write_result(args.output, "train_depth", args.smoke, depth=run_depth(size, args))
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device (torch.cuda.is_available() is False)")
        size, args.sweep_only = GPU, True
    fields = {}
    if args.loader_only:
        args.sweep_only, args.no_sweep = True, True
    if not args.sweep_only:
        fields = fixed_size_table(size, args, parser)
    if not args.no_loader and not args.gpu:
        fields["loader"] = loader_throughput(args.smoke)
    if not args.no_sweep:
        def partial(sweep):
            common.write_result(args.output, "train_step", args.smoke, **fields, sweep=sweep)

        fields["sweep"] = run_sweep(size, args, "cuda" if args.gpu else "cpu", partial)
    common.write_result(args.output, "train_step", args.smoke, **fields)


def run_depth(size: dict, args) -> dict:
    """The sweep's training rows (no SHiRA, no inference; compiled at DEPTH's compiled token counts) at each depth
    of DEPTH, rows tagged with `blocks`."""
    depth = SMOKE_DEPTH if args.smoke else DEPTH
    args = argparse.Namespace(**{**vars(args), "only": "slice,slice Linear-only"})
    rows, out = [], {}
    for blocks in depth["blocks"]:
        # op totals are steadier than wall time: the slices' difference is a few % of a step
        sweep = run_sweep(dict(size, blocks=blocks, sweep=depth["sweep"]), args, "cpu",
                          profile=("slice", "slice Linear-only"))
        rows += [dict(r, blocks=blocks) for r in sweep["rows"]]
        out = {k: v for k, v in sweep.items() if k != "rows"}
    out["layout"].pop("num_layers", None)
    return dict(out, blocks=list(depth["blocks"]), rows=rows)


def fixed_size_table(size: dict, args, parser) -> dict:
    config, specs = configurations(size)
    # a slice row is judged against the LoRA of equal weights, so that LoRA comes along
    wanted = [n.strip() for n in (args.only or "").split(",") if n.strip()]
    paired = [f"lora {specs[n]['equal_to']}" for n in wanted if specs.get(n, {}).get("method") == "slice"]
    specs = common.select_rows(specs, args.only, ("frozen", *paired), parser)
    repeats = args.repeats or size["repeats"]
    print(f"train step: {len(specs)} configurations, {repeats} interleaved repeats", flush=True)
    # the slice at 1e-3 is profiled against the frozen base: which ops its extra time goes to
    profiled = [n for n in ("frozen", "slice 0.001") if n in specs]
    results = common.run_interleaved(setup, specs, repeats=repeats, calls=size["calls"], warmup=size["warmup"],
                                     threads=args.threads, inline=args.smoke, profile=profiled)
    return dict(
        setup={"layout": {k: config[k] for k in common.LAYOUT_KEYS},
               "latent": list(size["latent"]), "text_len": size["text_len"], "repeats": repeats,
               "threads": args.threads,
               "calls": size["calls"], "warmup": size["warmup"]},
        rows=evaluate(results, specs),
        profile=common.profile_summary(results, "slice 0.001", "frozen") if len(profiled) == 2 else None,
    )


if __name__ == "__main__":
    main()
