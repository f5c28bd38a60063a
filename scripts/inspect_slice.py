#!/usr/bin/env python
"""Inspect a saved slice: its config, how many weights it holds and where, delta norms per parameter kind, its
concept ledger, and (with --overlap) the exact number of weights it shares with another slice. Given a merged
.safetensors file (or a diffusers transformer folder), print its ledger: every slice and concept merged into it.

Examples:
  python scripts/inspect_slice.py out/character1 --overlap out/character2
  python scripts/inspect_slice.py outputs/char2/merged/wan_char1_char2.safetensors --json
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slice_adapter.files.ledger import format_ledger, is_slice_folder, read_ledger  # noqa: E402
from slice_adapter.report import inspect_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("slice", metavar="PATH", help="The slice adapter folder, or a merged .safetensors file (its ledger).")
    p.add_argument("--overlap", metavar="DIR2", default=None, help="Another slice folder to count shared weights with.")
    p.add_argument("--json", action="store_true", help="Print one JSON object and nothing else.")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not is_slice_folder(args.slice):
            if args.overlap:
                raise ValueError(f"--overlap compares two slice folders; {args.slice!r} is not one (a merged file "
                                 "shows its ledger only)")
            return _print_ledger(args.slice, read_ledger(args.slice), args.json)
        r = inspect_report(args.slice, overlap_with=args.overlap)
        r["ledger"] = read_ledger(args.slice)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
        return 0
    c = r["config"]
    print(f"slice {r['path']}: fraction {c['fraction']} id {c['slice_id']} seed {c['seed']} "
          f"(of {c['num_slices']}), {c['tile_order']} tiles, layout {c['fingerprint']}")
    print(f"targets {c['target_modules'] or 'all block parameters'}"
          f"{', excluding ' + str(c['exclude_modules']) if c['exclude_modules'] else ''}")
    print(f"{r['selected_weights']:,} of {r['targeted_weights']:,} targeted weights ({r['percent_of_targeted']:.4f}%) "
          f"in {r['touched_parameters']} of {r['targeted_parameters']} parameters; {r['nonzero_deltas']:,} nonzero; "
          f"delta L2 {r['delta_l2']:.6g}")
    b = r["per_block"]
    print(f"per block ({b['blocks']} blocks): min {b['min']:,} mean {b['mean']:,.1f} max {b['max']:,}")
    print(f"{'kind':48}{'params':>8}{'weights':>12}{'L2':>14}{'max |d|':>14}")
    for kind, k in r["kinds"].items():
        print(f"{kind:48}{k['parameters']:>8}{k['weights']:>12,}{k['l2']:>14.6g}{k['max_abs']:>14.6g}")
    if "overlap" in r:
        o = r["overlap"]
        print(f"shares {o['shared_weights']:,} weights with {o['other']} ({o['percent_of_this_slice']:.4f}% of this "
              f"slice){'' if o['same_layout'] else '; the layouts differ (another model?): compared by name'}")
    print("\n".join(format_ledger(r["ledger"], "concept ledger")))
    return 0


def _print_ledger(path: str, records: list, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"path": path, "ledger": records}))
    else:
        print("\n".join(format_ledger(records, path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
