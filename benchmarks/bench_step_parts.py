"""What the Linear-only slice's training step pays that LoRA's does not, part by part, at short clips.

The step whole, then with one part left out at a time, each against LoRA of equal trainable weights in the same
rounds, at the clip sizes where the sweep's "step ≤ LoRA's" verdict is missed.

Timing only: a row with a part left out computes something else (the matmuls on the base weight without the tiles,
zero gradients for the slice), so it is never a configuration to train with. "inputs kept" is one (it keeps each
sliced Linear's input as LoRA does, instead of making it again from the norm's or gelu's input: LoRA's activation
memory, see the sweep's activation column).

    python benchmarks/bench_step_parts.py --output /tmp/step_parts.json
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train_step  # noqa: E402
import common  # noqa: E402

FULL = dict(tokens=(192, 768), repeats={192: 45, 768: 15}, warmup=2, size=bench_train_step.FULL)
SMOKE = dict(tokens=(16,), repeats={16: 2}, warmup=1, size=bench_train_step.SMOKE)
# row name -> (parts left out, what leaving them out removes from the step)
PARTS = {
    "slice Linear-only": ((), "nothing: the configuration the sweep measures"),
    "inputs kept": (("recompute",), "backward's recompute of the inputs a norm or gelu made (each sliced Linear's "
                                    "input is kept instead, as LoRA keeps it)"),
    "no patching": (("patch",), "writing the tiles into the weight and back, in forward and for the input gradient"),
    "no slice gradient": (("gradient",), "the tiles' and bias elements' gradient (the recompute with it)"),
    "neither": (("patch", "gradient"), "both: the matmuls of the frozen base, in the slice's autograd function"),
}


@contextlib.contextmanager
def left_out(parts: tuple):
    """The slice's code with `parts` replaced by stand-ins, for one step (smoke runs share one process)."""
    import torch

    from slice_adapter import layer, patched_weight

    saved = []

    def swap(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    if "recompute" in parts:
        swap(layer, "gelu_input", lambda x: None)
        swap(layer, "norm_input", lambda x, site, checked: None)
    if "patch" in parts:
        swap(patched_weight, "merged_weight", lambda source, w, owned, slices, values: (w, None))
        swap(patched_weight, "patched_bias", lambda bias, dtype, slices, values: bias.to(dtype))
    if "gradient" in parts:
        backward = layer.linear_backward

        def no_slice_gradient(grad_out, weight, x_src, merged, input_columns, need_x, need_values, *rest):
            grad_x, _ = backward(grad_out, weight, x_src, merged, input_columns, need_x, [False] * len(need_values),
                                 *rest)
            values = rest[-2]
            return grad_x, [torch.zeros_like(v) if n else None for v, n in zip(values, need_values)]

        swap(layer, "linear_backward", no_slice_gradient)
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def setup(spec: dict):
    """Worker side: the sweep's step (`bench_train_step.setup`) with the spec's parts left out during each call."""
    parts = tuple(spec.get("left_out", ()))
    step, info = bench_train_step.setup({k: v for k, v in spec.items() if k != "left_out"})

    def run():
        with left_out(parts):
            step()

    return run, info


def measure(args, tokens: list[int]) -> dict:
    plan = SMOKE if args.smoke else FULL
    rows = []
    for t in tokens:
        config, specs = bench_train_step.sweep_specs(plan["size"], t, False)
        group = {"lora": specs["lora"]}
        for name, (parts, _) in PARTS.items():
            group[name] = dict(specs["slice Linear-only"], left_out=list(parts))
        repeats = args.repeats or plan["repeats"].get(t, 15)
        print(f"step parts: {t} tokens, {len(group)} configurations, {repeats} rounds", flush=True)
        results = common.run_interleaved(setup, group, repeats=repeats, calls=1, warmup=plan["warmup"],
                                         threads=args.threads, inline=args.smoke)
        lora_s = results["lora"].per_repeat()
        whole_s = results["slice Linear-only"].per_repeat()
        for name in group:
            x_lora = common.ratio_summary(results, name, "lora")
            # per round, in the same round's LoRA step: what leaving the part out saved
            saved = [(w - r) / l for w, r, l in zip(whole_s, results[name].per_repeat(), lora_s)]
            rows.append({"tokens": t, "name": name, "left_out": group[name].get("left_out", []),
                         "removes": PARTS[name][1] if name in PARTS else None,
                         "wall_s": results[name].summary("wall").as_dict(), "x_lora_wall": x_lora.as_dict(),
                         "x_lora_cpu": common.ratio_summary(results, name, "lora", "cpu").as_dict(),
                         "saves_x_lora": None if name == "lora" else statistics.median(saved),
                         "saves_ci95": None if name in ("lora", "slice Linear-only") else common.median_ci(saved),
                         "repeats": repeats})
        layout = {k: config[k] for k in common.LAYOUT_KEYS}
    return {"layout": layout, "fraction": bench_train_step.SWEEP_FRACTION, "threads": args.threads,
            "text_len": plan["size"]["text_len"], "warmup": plan["warmup"], "rows": rows}


def main(argv=None):
    parser = common.base_arg_parser(__doc__.splitlines()[0], rows=False)
    parser.add_argument("--tokens", default=None,
                        help="Comma-separated token counts (default 192,768; of "
                             f"{sorted(bench_train_step.LATENT_FOR_TOKENS)}).")
    args = parser.parse_args(argv)
    try:
        tokens = bench_train_step.token_counts(args.tokens, (SMOKE if args.smoke else FULL)["tokens"])
    except ValueError as e:
        parser.error(str(e))
    common.quiet_warnings()
    common.write_result(args.output, "step_parts", args.smoke, parts=measure(args, tokens))


if __name__ == "__main__":
    main()
