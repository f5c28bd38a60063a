#!/usr/bin/env python
"""Plan a slice before training: trainable parameters, their spread over the blocks, and the memory the slice's
values, gradients and Adam moments take (fp32 and bf16), computed on a meta-device model (no weights loaded).

Example:
  python scripts/plan_slices.py --model wan2.2-t2v-a14b --ff 0.001 --ffid 1
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MODELS = "wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.1-i2v-14b, wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"A published Wan model ({MODELS}) or a path: a transformer config.json, a diffusers "
                        "transformer folder, or a .safetensors checkpoint (either key format).")
    p.add_argument("--fraction", "--ff", dest="fraction", type=float, required=True,
                   help="Share of the targeted weights the slice trains, in (0, 1] (--ff).")
    p.add_argument("--slice_id", "--ffid", dest="slice_id", type=int, default=0,
                   help="Which disjoint slice, in [0, floor(1/fraction)) (--ffid). Default 0.")
    p.add_argument("--seed", type=int, default=0, help="Selection seed. Default 0.")
    p.add_argument("--target_modules", nargs="+", default=None,
                   help="Modules or parameters to slice (suffix match). Default: every transformer block parameter.")
    p.add_argument("--exclude_modules", nargs="+", default=None, help="Modules or parameters to leave out.")
    p.add_argument("--json", action="store_true", help="Print one JSON object and nothing else.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from slice_adapter.report import format_bytes, plan_report

        report = plan_report(args.model, args.fraction, args.slice_id, args.seed, args.target_modules,
                             args.exclude_modules)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
        return 0
    r = report
    print(f"model {r['model']}: {r['total_params']:,} parameters ({format_bytes(r['model_bytes_bf16'])} in bf16)")
    print(f"slice fraction {r['fraction']} id {r['slice_id']} seed {r['seed']} (of {r['num_slices']} disjoint slices)")
    print(f"trainable {r['trainable_params']:,} = {r['percent_of_model']:.4f}% of the model, "
          f"{r['percent_of_targeted']:.4f}% of {r['targeted_params']:,} targeted")
    b = r["per_block"]
    print(f"per block ({b['blocks']} blocks): min {b['min']:,} mean {b['mean']:,.1f} max {b['max']:,}")
    print(f"{'':10}{'values':>12}{'gradients':>12}{'Adam (2)':>12}{'index':>12}{'VRAM est.':>12}")
    for scheme, m in r["bytes"].items():
        print(f"{scheme:10}" + "".join(f"{format_bytes(m[k]):>12}" for k in
                                      ("values", "gradients", "adam_states", "index", "vram_estimate")))
    print(r["note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
