"""Training step on CPU: frozen base (input gradients only), slices, PEFT LoRA and SHiRA of equal trainable
weights, and full fine-tuning of the blocks. Step time and peak memory, each as a ratio to the frozen base.

    python benchmarks/bench_train_step.py --output /tmp/train_step.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL = dict(blocks=2, latent=(1, 16, 3, 16, 16), text_len=64, repeats=5, calls=1, warmup=2, fractions=(1e-3, 1e-2))
# Smoke: the real code paths on a toy layout, so the script cannot rot; the numbers mean nothing.
SMOKE = dict(blocks=1, latent=(1, 16, 1, 4, 4), text_len=4, repeats=2, calls=1, warmup=1, fractions=(1e-3, 1e-2),
             layout=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32))


def setup(spec: dict):
    """Worker side: the model, its trainable parameters and one optimizer step as a closure."""
    import torch

    from slice_ft.flow_matching import flow_matching_loss

    model = common.build_wan(spec["config"])
    model.train()
    params = common.apply_method(model, spec["method"], fraction=spec.get("fraction", 1e-3), rank=spec.get("rank", 1))
    inputs = common.wan_inputs(spec["config"], spec["latent"], spec["text_len"])
    target = torch.randn_like(inputs["hidden_states"])
    frozen = spec["method"] == "frozen"
    latents = inputs["hidden_states"].requires_grad_(frozen)  # the floor: gradients reach the input, no weight
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None

    def step():
        pred = model(latents, inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)[0]
        flow_matching_loss(pred, target).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            latents.grad = None

    trainable = sum(p.numel() for p in params)
    return step, {"trainable": trainable}


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


def main(argv=None):
    parser = common.base_arg_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    common.quiet_warnings()
    size = SMOKE if args.smoke else FULL
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
    common.write_result(
        args.output, "train_step", args.smoke,
        setup={"layout": {k: config[k] for k in common.LAYOUT_KEYS},
               "latent": list(size["latent"]), "text_len": size["text_len"], "repeats": repeats,
               "threads": args.threads,
               "calls": size["calls"], "warmup": size["warmup"]},
        rows=evaluate(results, specs),
        profile=common.profile_summary(results, "slice 0.001", "frozen") if len(profiled) == 2 else None,
    )


if __name__ == "__main__":
    main()
