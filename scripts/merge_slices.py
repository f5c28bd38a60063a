#!/usr/bin/env python
"""Merge slice adapters into a full Wan transformer checkpoint, streaming one tensor at a time.

Example:
  python scripts/merge_slices.py --base wan2.2_t2v_low_noise_14B_fp16.safetensors \
      --slice out/character1 --slice out/character2 --output wan22_low_characters_fp16.safetensors \
      --wan2gp_json finetunes/t2v_2_2_characters.json --wan2gp_architecture t2v_2_2 --wan2gp_phase low
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slice_adapter.merge import merge_slices  # noqa: E402
from slice_ft.errors import input_error_message  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True,
                   help="BASE checkpoint: one .safetensors file (original Wan / ComfyUI keys, with or without the "
                        "'model.diffusion_model.' prefix, or diffusers keys) or a diffusers transformer folder "
                        "(sharded with diffusion_pytorch_model.safetensors.index.json). OUT keeps its key format; a "
                        "folder gives one file with diffusers keys.")
    p.add_argument("--slice", dest="slices", action="append", required=True, metavar="DIR",
                   help="A slice adapter folder (adapter_config.json + adapter_model.safetensors). Repeat for several "
                        "slices; they must not share weights unless --allow-overlap.")
    p.add_argument("--output", required=True, help="OUT .safetensors file (written to a temp file, then renamed).")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="Cast every floating tensor to this dtype. Default: keep BASE's own dtypes (untouched "
                        "tensors then stay bit-identical).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing OUT (and Wan2GP JSON).")
    p.add_argument("--allow-overlap", "--allow_overlap", dest="allow_overlap", action="store_true",
                   help="Merge slices that share weights (their deltas are summed). Refused by default.")
    p.add_argument("--wan2gp_json", default=None, metavar="PATH",
                   help="Also write a Wan2GP finetune definition (.json) pointing at OUT; put it in Wan2GP's "
                        "finetunes/ folder. OUT's name must contain lowercase bf16 or fp16.")
    p.add_argument("--wan2gp_architecture", default=None,
                   help="Wan2GP architecture id (t2v, t2v_1.3B, i2v, t2v_2_2, i2v_2_2, ti2v_2_2), or the model id "
                        "i2v_720p (written as architecture i2v with Wan2GP's 720p defaults). Inferred where the "
                        "shapes decide it; required for Wan 2.1 T2V-14B vs a Wan 2.2 A14B expert (same shapes).")
    p.add_argument("--wan2gp_phase", choices=["high", "low"], default=None,
                   help="For two-expert Wan 2.2 A14B models: which expert OUT replaces (low: OUT goes in URLs2 "
                        "behind the built-in high-noise expert).")
    p.add_argument("--wan2gp_name", default=None, help="Name shown in Wan2GP (default: OUT's file stem).")
    p.add_argument("--wan2gp_description", default=None, help="Description shown in Wan2GP.")
    p.add_argument("--wan2gp_url", default=None,
                   help="URL to put in the definition instead of OUT's local path (e.g. after uploading OUT).")
    p.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = merge_slices(
            args.base, args.slices, args.output, dtype=args.dtype, overwrite=args.overwrite,
            allow_overlap=args.allow_overlap, wan2gp_json=args.wan2gp_json,
            wan2gp_architecture=args.wan2gp_architecture, wan2gp_phase=args.wan2gp_phase,
            wan2gp_name=args.wan2gp_name, wan2gp_description=args.wan2gp_description, wan2gp_url=args.wan2gp_url,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:  # bad input, or a full disk: one line, exit status 2
        message = input_error_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {result.output}: {result.tensors} tensors ({result.touched_tensors} changed, "
          f"{result.changed_weights} weights), {result.key_format} keys"
          f"{' with prefix ' + repr(result.key_prefix) if result.key_prefix else ''}, {result.dtype}")
    if result.wan2gp_json:
        print(f"wrote Wan2GP definition {result.wan2gp_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
