"""Inference (one transformer forward, no gradients) on CPU: base model vs an unmerged slice vs a merged slice.

    python benchmarks/bench_inference.py --output /tmp/inference.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL = dict(blocks=2, latent=(1, 16, 3, 16, 16), text_len=64, repeats=6, calls=2, warmup=2, fractions=(1e-3, 1e-2))
SMOKE = dict(blocks=1, latent=(1, 16, 1, 4, 4), text_len=4, repeats=2, calls=1, warmup=1, fractions=(1e-3,),
             layout=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32))


def setup(spec: dict):
    """Worker side: the model as the row describes it and one no-grad forward as a closure."""
    import torch

    import slice_adapter
    from slice_adapter import SliceConfig

    model = common.build_wan(spec["config"]).eval()
    if spec["mode"] != "base":
        # random (non-zero) deltas: a zero slice could be skipped by a clever layer, a trained one cannot
        model.add_adapter(SliceConfig(fraction=spec["fraction"], init_weights=False))
        if spec["mode"] == "merged":
            slice_adapter.merge_adapters(model)
    model.requires_grad_(False)
    inputs = common.wan_inputs(spec["config"], spec["latent"], spec["text_len"])

    def step():
        with torch.inference_mode():
            model(**inputs, return_dict=False)

    return step, {}


def main(argv=None):
    parser = common.base_arg_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    common.quiet_warnings()
    size = SMOKE if args.smoke else FULL
    config = common.wan_layout(num_layers=size["blocks"], **size.get("layout", {}))
    base = dict(config=config, latent=size["latent"], text_len=size["text_len"])
    specs = {"base": dict(base, mode="base")}
    for fraction in size["fractions"]:
        specs[f"unmerged slice {fraction:g}"] = dict(base, mode="unmerged", fraction=fraction)
    specs[f"merged slice {size['fractions'][0]:g}"] = dict(base, mode="merged", fraction=size["fractions"][0])
    specs = common.select_rows(specs, args.only, ("base",), parser)
    repeats = args.repeats or size["repeats"]
    print(f"inference: {len(specs)} configurations, {repeats} interleaved repeats", flush=True)
    # the unmerged slice at 1e-3 is profiled against the base: which ops its extra time goes to
    profiled = [n for n in ("base", "unmerged slice 0.001") if n in specs]
    results = common.run_interleaved(setup, specs, repeats=repeats, calls=size["calls"], warmup=size["warmup"],
                                     threads=args.threads, inline=args.smoke, profile=profiled)
    rows = []
    for name, spec in specs.items():
        ratio = common.ratio_summary(results, name, "base", "wall")
        row = {
            "name": name,
            "mode": spec["mode"],
            "wall_s": results[name].summary("wall").as_dict(),
            "x_base_wall": ratio.as_dict(),
            "x_base_cpu": common.ratio_summary(results, name, "base", "cpu").as_dict(),
            "peak_rss_mb": results[name].memory["peak_rss_mb"],
            "targets": [],
        }
        if spec["mode"] == "unmerged":
            row["targets"].append(("unmerged ≤ 1.03× base", ratio.median <= 1.03, f"{ratio.median:.3f}×"))
        rows.append(row)
    common.write_result(
        args.output, "inference", args.smoke,
        setup={"layout": {k: config[k] for k in common.LAYOUT_KEYS},
               "latent": list(size["latent"]), "text_len": size["text_len"], "repeats": repeats,
               "threads": args.threads, "calls": size["calls"], "warmup": size["warmup"]},
        rows=rows,
        profile=common.profile_summary(results, "unmerged slice 0.001", "base") if len(profiled) == 2 else None,
    )


if __name__ == "__main__":
    main()
