#!/usr/bin/env python
"""Export a slice adapter as a LoRA file that ComfyUI, Wan2GP, musubi-tuner or diffusers applies exactly.

A slice on nn.Linear weights is exactly a low-rank update (up = one-hot selector of the touched rows, down = their
values, alpha = rank); norm, bias and convolution deltas become .diff/.diff_b keys where the program reads them.
What each program applies:
  comfy      ComfyUI: LoRA pairs, .diff, .diff_b on leaf modules; not the blocks' modulation (scale_shift_table)
  wan2gp     Wan2GP (mmgp): the same keys; its Wan LoRA preprocessing deletes every modulation .diff
  musubi     musubi-tuner: lora_unet_* lora_down/lora_up/alpha pairs of the blocks' Linear weights only
  diffusers  WanPipeline.load_lora_weights: LoRA pairs and Linear bias deltas; no norm, modulation or conv deltas
A slice with deltas the program would not apply is refused with their names, count and largest value: merge instead
(scripts/merge_slices.py: every program loads the merged file exactly), train with --lossless_for FORMAT, or pass
--allow_lossy (the file's metadata then records what was left out).
The file holds about rank x (in + out) numbers per module, usually much more than the slice: merge when size matters.

Example:
  python scripts/export_lora.py --slice out/character1 --output character1_lora.safetensors --format comfy
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slice_adapter.export import LORA_FORMATS, export_lora  # noqa: E402
from slice_ft.errors import input_error_message  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", required=True, metavar="DIR", help="The slice adapter folder to export.")
    p.add_argument("--output", required=True, help="LoRA .safetensors file to write.")
    p.add_argument("--format", choices=list(LORA_FORMATS), default="comfy",
                   help="The program that loads the file. comfy/wan2gp: diffusion_model.<original Wan name>."
                        "lora_A/lora_B/alpha + .diff/.diff_b; musubi: lora_unet_<name>.lora_down/lora_up/alpha; "
                        "diffusers: the keys WanPipeline.save_lora_weights writes.")
    p.add_argument("--allow_lossy", "--allow-lossy", dest="allow_lossy", action="store_true",
                   help="Write the file even if the program would not apply some of the slice's deltas; they are "
                        "left out and listed in the file's slice_ft.dropped metadata.")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="Storage dtype (fp32 is lossless; alpha is always fp32).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = export_lora(args.slice, args.output, args.format, dtype=args.dtype, overwrite=args.overwrite,
                             allow_lossy=args.allow_lossy)
    except (ValueError, OSError) as err:  # bad input, or a full disk: one line, exit status 2
        message = input_error_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {result['output']} ({result['format']}, {result['dtype']}, {result['bytes']} bytes): "
          f"{result['lora_modules']} LoRA modules, ranks {result['ranks']['min']}-{result['ranks']['max']}, "
          f"{result['diff_keys']} diff keys")
    if result["dropped"]:
        print(f"warning: left out {len(result['dropped'])} deltas the program does not apply (largest "
              f"{result['max_dropped_delta']:.4g}), e.g. {result['dropped'][0]}", file=sys.stderr)
    if args.format in ("comfy", "wan2gp") and result["ignored_by_diffusers"]:
        print(f"note: diffusers ignores {len(result['ignored_by_diffusers'])} norm/conv diff keys of this file; "
              "ComfyUI and Wan2GP apply them", file=sys.stderr)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
