"""The concept ledger: which concept each slice holds, in its folder and in every file it is merged into.

A slice folder holds `concept.json` next to PEFT's two files: the concept's prompts (the user's `--concept_prompts`,
or a sample of its training captions) with the slice's fraction, id and seed. A merged checkpoint's header metadata
`slice_ft.merged_slices` lists one record per slice baked into it (its config, layout fingerprint and concept), the
records of its base's own list first, so a file stacked several times carries every concept in it. The trainer reads
this list for `--preserve_previous` (the concepts to keep) and `--ffid auto` (the ids still free).

Reading needs only json, numpy and safetensors headers (no PEFT, no diffusers), like `formats`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

LEDGER_KEY = "slice_ft.merged_slices"  # the merged file's header metadata entry (a JSON list of records)
CONCEPT_FILE = "concept.json"  # in a slice folder
CONCEPT_SOURCES = ("concept_prompts", "training_captions")
MAX_CAPTION_PROMPTS = 32  # a concept without --concept_prompts records up to this many of its training captions


def concept_record(prompts, source: str) -> dict:
    """The concept part of a ledger record: its prompts and where they came from."""
    if source not in CONCEPT_SOURCES:
        raise ValueError(f"concept source must be one of {CONCEPT_SOURCES}, got {source!r}")
    prompts = [str(p).strip() for p in (prompts or [])]
    if not prompts or not all(prompts):
        raise ValueError(f"a concept needs at least one non-empty prompt, got {prompts!r}")
    return {"prompts": prompts, "source": source}


def write_concept(slice_dir, concept: dict, *, fraction, slice_id: int, seed: int) -> Path:
    """Write `slice_dir/concept.json` (temp file renamed into place); returns its path."""
    path = Path(slice_dir) / CONCEPT_FILE
    record = {"fraction": fraction, "slice_id": slice_id, "seed": seed, "concept": concept}
    fd, tmp = tempfile.mkstemp(prefix=f".{CONCEPT_FILE}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_concept(slice_dir) -> Optional[dict]:
    """The concept recorded in a slice folder ({"prompts", "source"}), or None for a folder written without one."""
    path = Path(slice_dir) / CONCEPT_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        concept = raw["concept"]
        return concept_record(concept["prompts"], concept["source"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a readable concept record ({err}): delete it or re-save the "
                         "slice") from None


def slice_record(slice_deltas) -> dict:
    """What a merged file records about one slice (`deltas.SliceDeltas`): config, fingerprint and concept."""
    return {**slice_deltas.provenance(), "concept": read_concept(slice_deltas.path)}


def ledger_tile_order(records: list[dict]) -> str:
    """The tile order a new slice on a base with these records should use: theirs when they all share one (only
    slices of one order and fraction are disjoint by id), else the default."""
    from ..selection import TILE_ORDER, recorded_tile_order

    orders = {recorded_tile_order(r) for r in records}
    return orders.pop() if len(orders) == 1 else TILE_ORDER


def metadata_records(metadata: Optional[dict]) -> list[dict]:
    """The ledger records in a checkpoint's header metadata ([] when it has none or they are unreadable)."""
    raw = (metadata or {}).get(LEDGER_KEY)
    if not raw:
        return []
    try:
        records = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def merged_records(base_metadata: Optional[dict], slice_dirs) -> list[dict]:
    """The ledger a merge of `slice_dirs` into a base with `base_metadata` writes: the base's records, then each
    slice's."""
    from .deltas import read_slice

    return metadata_records(base_metadata) + [slice_record(read_slice(p)) for p in slice_dirs]


def encode_records(records: list[dict]) -> str:
    """The metadata value of LEDGER_KEY."""
    return json.dumps(records, sort_keys=True)


def is_slice_folder(path) -> bool:
    from .adapter_folder import CONFIG_NAME

    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def read_ledger(path) -> list[dict]:
    """Every ledger record of a slice folder (one) or a checkpoint (a safetensors file or diffusers folder)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist: pass a slice folder or a merged .safetensors file")
    if is_slice_folder(path):
        from .deltas import read_slice

        return [slice_record(read_slice(path))]
    from .safetensors_stream import open_checkpoint

    return metadata_records(open_checkpoint(path).metadata)


def ledger_prompts(records: list[dict]) -> list[str]:
    """Every concept prompt of the records, in record order, each once."""
    seen: dict[str, None] = {}
    for r in records:
        for p in (r.get("concept") or {}).get("prompts", []):
            seen.setdefault(p, None)
    return list(seen)


def format_ledger(records: list[dict], where: str) -> list[str]:
    """Human-readable lines: one header per slice, then its prompts."""
    from ..selection import recorded_tile_order

    if not records:
        return [f"{where}: no concept ledger (no slice-ft slice is recorded as merged into it)"]
    lines = [f"{where}: {len(records)} slice(s) in the ledger"]
    for i, r in enumerate(records, 1):
        concept = r.get("concept")
        lines.append(f"  [{i}] fraction {r.get('fraction')} slice_id {r.get('slice_id')} seed {r.get('seed', 0)} "
                     f"{recorded_tile_order(r)} tiles, layout {r.get('fingerprint')}: "
                     + (f"{len(concept['prompts'])} prompt(s) from {concept['source']}" if concept
                        else "no concept recorded (merged before the ledger existed)"))
        for p in (concept or {}).get("prompts", []):
            lines.append(f"      {p}")
    return lines


# --- free slice ids ---------------------------------------------------------------------------------------------


def _diffusers_shapes(ckpt) -> dict:
    from .keys import detect_key_format, wan_to_diffusers

    fmt, prefix = detect_key_format(ckpt.entries)
    to_d = (lambda n: n) if fmt == "diffusers" else wan_to_diffusers
    return {to_d(k[len(prefix):]): e.shape for k, e in ckpt.entries.items()}


def free_slice_id(base, fraction, seed: int = 0, target_modules=None, exclude_modules=None,
                  tile_order: Optional[str] = None) -> tuple[int, list[dict]]:
    """(the lowest slice id at `fraction`/`seed`/`tile_order` (default: `ledger_tile_order` of the base's records)
    sharing no weight with any slice the base's ledger records as merged, those records). Overlap is counted exactly
    on the base's layout (from its header; no model)."""
    from .safetensors_stream import open_checkpoint
    from .deltas import layouts_from_shapes
    from ..selection import (check_tile_order, layout_fingerprint, num_slices_for, overlap_count, plan_layouts,
                             recorded_tile_order)

    ckpt = open_checkpoint(base)
    records = metadata_records(ckpt.metadata)
    n = num_slices_for(fraction)
    if not records:
        return 0, records
    tile_order = check_tile_order(tile_order or ledger_tile_order(records))
    shapes = _diffusers_shapes(ckpt)
    layouts = layouts_from_shapes(shapes, target_modules, exclude_modules)
    same_rule = []  # records whose slices are disjoint from ours exactly when the ids differ
    baked = []
    for r in records:
        r_layouts = layouts_from_shapes(shapes, r.get("target_modules"), r.get("exclude_modules"))
        if r.get("fingerprint") != layout_fingerprint(r_layouts):
            raise ValueError(f"{str(base)!r} records a merged slice (fraction {r.get('fraction')}, slice_id "
                             f"{r.get('slice_id')}) made on another layout ({r.get('fingerprint')}, this file: "
                             f"{layout_fingerprint(r_layouts)}): its ledger does not belong to it; pass --ffid N")
        if (float(r["fraction"]) == float(fraction) and r.get("seed", 0) == seed
                and recorded_tile_order(r) == tile_order
                and r.get("target_modules") == target_modules and r.get("exclude_modules") == exclude_modules):
            same_rule.append(int(r["slice_id"]))
        else:
            baked.append(plan_layouts(r_layouts, r["fraction"], r["slice_id"], r.get("seed", 0),
                                      recorded_tile_order(r)))
    for slice_id in range(n):
        if slice_id in same_rule:
            continue
        if baked:
            plan = plan_layouts(layouts, fraction, slice_id, seed, tile_order)
            if any(overlap_count(plan, other) for other in baked):
                continue
        return slice_id, records
    taken = ", ".join(f"fraction {r['fraction']} id {r['slice_id']} seed {r.get('seed', 0)}" for r in records)
    raise ValueError(f"--ffid auto: every one of the {n} slice ids at fraction {fraction} (seed {seed}) overlaps a "
                     f"slice already merged into {str(base)!r} ({taken}); use a smaller --ff (more ids) or another "
                     "--slice_seed, or train on a base with fewer slices merged")
