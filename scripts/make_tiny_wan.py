#!/usr/bin/env python
"""Write a tiny, randomly initialised Wan 2.1 text-to-video diffusers pipeline folder (offline, for tests/demos)."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a tiny WanPipeline folder loadable offline with WanPipeline.from_pretrained(DIR)."
    )
    parser.add_argument("dir", metavar="DIR", help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed (default: 0)")
    args = parser.parse_args(argv)

    from slice_ft.tiny import save_tiny_pipeline

    try:
        path = save_tiny_pipeline(args.dir, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
