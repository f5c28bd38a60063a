#!/usr/bin/env python
"""Export a slice adapter as a lossless LoRA file for ComfyUI, Wan2GP or diffusers.

A slice on nn.Linear weights is exactly a low-rank update (up = one-hot selector of the touched rows, down = their
values, alpha = rank); other deltas become ComfyUI .diff/.diff_b keys. diffusers loads the LoRA pairs and Linear bias
deltas only: norm, modulation and convolution deltas are ComfyUI-only (--format diffusers leaves them out).
The file holds about rank x (in + out) numbers per module, usually much more than the slice: merge when size matters.

Example:
  python scripts/export_lora.py --slice out/character1 --output character1_lora.safetensors --format comfy
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slice_adapter.export import export_lora  # noqa: E402
from slice_ft.errors import input_error_message  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", required=True, metavar="DIR", help="The slice adapter folder to export.")
    p.add_argument("--output", required=True, help="LoRA .safetensors file to write.")
    p.add_argument("--format", choices=["comfy", "diffusers"], default="comfy",
                   help="comfy: diffusion_model.<original Wan name>.lora_A/lora_B/alpha + .diff/.diff_b (ComfyUI, "
                        "Wan2GP, and diffusers' converter); diffusers: the keys WanPipeline.save_lora_weights writes.")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="Storage dtype (fp32 is lossless; alpha is always fp32).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = export_lora(args.slice, args.output, args.format, dtype=args.dtype, overwrite=args.overwrite)
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
        print(f"left out (not expressible in diffusers' LoRA format): {len(result['dropped'])} deltas, e.g. "
              f"{result['dropped'][0]}", file=sys.stderr)
    if result["ignored_by_diffusers"]:
        print(f"note: diffusers ignores {len(result['ignored_by_diffusers'])} norm/modulation/conv diff keys of this "
              "file; ComfyUI applies them", file=sys.stderr)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
