"""Planning a slice of the Wan 14B layout on the meta device (no weights): build, plan, inject.

    python benchmarks/bench_plan.py --output /tmp/plan.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL = dict(model="wan2.1-t2v-14b", overrides={}, fractions=(1e-3, 1e-2), repeats=4, calls=1, warmup=1)
SMOKE = dict(model="wan2.1-t2v-1.3b", overrides=dict(num_layers=2), fractions=(1e-3,), repeats=2, calls=1, warmup=0)


def setup(spec: dict):
    """Worker side: the row's operation on a meta-device model as a closure."""
    import slice_adapter
    from slice_adapter import SliceConfig
    from slice_adapter.wan_configs import build_meta_transformer

    config = common.wan_layout(spec["model"], **spec["overrides"])
    meta = build_meta_transformer(config)
    info = {"weights": sum(p.numel() for p in meta.parameters())}
    if spec["op"] == "build":
        return (lambda: build_meta_transformer(config)), info
    cfg = SliceConfig(fraction=spec["fraction"])
    info["selected"] = slice_adapter.plan(meta, cfg).selected
    if spec["op"] == "plan":
        return (lambda: slice_adapter.plan(meta, cfg)), info

    def inject():  # a fresh model each time: an adapter can be added once
        build_meta_transformer(config).add_adapter(SliceConfig(fraction=spec["fraction"]))

    return inject, info


def main(argv=None):
    parser = common.base_arg_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    common.quiet_warnings()
    size = SMOKE if args.smoke else FULL
    base = dict(model=size["model"], overrides=size["overrides"])
    specs = {"build meta model": dict(base, op="build")}
    for fraction in size["fractions"]:
        specs[f"plan {fraction:g}"] = dict(base, op="plan", fraction=fraction)
    specs[f"build + add_adapter {size['fractions'][0]:g}"] = dict(base, op="inject", fraction=size["fractions"][0])
    specs = common.select_rows(specs, args.only, ("build meta model",), parser)
    repeats = args.repeats or size["repeats"]
    print(f"plan: {len(specs)} configurations, {repeats} interleaved repeats", flush=True)
    results = common.run_interleaved(setup, specs, repeats=repeats, calls=size["calls"], warmup=size["warmup"],
                                     threads=args.threads, inline=args.smoke)
    rows = []
    for name, spec in specs.items():
        res = results[name]
        rows.append({
            "name": name,
            "op": spec["op"],
            "weights": res.info["weights"],
            "selected": res.info.get("selected"),
            "wall_s": res.summary("wall").as_dict(),
            "x_build_wall": common.ratio_summary(results, name, "build meta model", "wall").as_dict(),
            "peak_rss_mb": res.memory["peak_rss_mb"],
            "targets": [],
        })
    common.write_result(
        args.output, "plan", args.smoke,
        setup={"model": size["model"], "overrides": size["overrides"], "repeats": repeats,
               "threads": args.threads, "calls": size["calls"]},
        rows=rows,
    )


if __name__ == "__main__":
    main()
