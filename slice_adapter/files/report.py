"""Numbers about slices: what a slice would cost before training (`plan_report`) and what a saved one holds
(`inspect_report`).

`plan_report` counts from the selection windows alone (no permutation is evaluated), so it takes seconds on the 14B
model at any fraction. Memory figures cover the slice only: the frozen model (kept in CPU RAM with block swapping),
activations and the CUDA context come on top (the original write-up budgets ~1.5 GB for the latter two).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from typing import Union

import numpy as np

from .deltas import layouts_from_shapes, parameter_kind, read_slice
from ..selection import (
    ParamLayout,
    _offset,
    block_index,
    layout_fingerprint,
    num_slices_for,
    overlap_count,
    parse_fraction,
    rank_window,
    validate_slice_id,
)

# Bytes per trainable weight. "fp32": what this adapter keeps (float32 values, gradients, Adam moments);
# "bf16": everything in bfloat16, the original write-up's assumption.
BYTES_PER_WEIGHT = {
    "fp32": {"values": 4, "gradients": 4, "adam_states": 8},
    "bf16": {"values": 2, "gradients": 2, "adam_states": 4},
}
INDEX_BYTES_PER_ROW_TILE = 32  # ~4 int64 per tile (row, segment, slot, padded row): the layer's gather/scatter indices
INDEX_BYTES_PER_ELEMENT = 8  # one int64 per selected element of a norm/bias/modulation


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the tables and logs print sizes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _load_model_source(model: Union[str, dict, Path]):
    """(label, ("config", dict) or ("checkpoint", path)) for a model name, a config, or a path."""
    from ..wan_configs import WAN_CONFIGS, wan_config

    if isinstance(model, dict):
        return "config", ("config", dict(model))
    text = str(model)
    if text.lower() in WAN_CONFIGS:
        return text.lower(), ("config", wan_config(text))
    path = Path(text)
    if not path.exists():
        raise ValueError(f"model {text!r} is neither a known Wan model ({', '.join(WAN_CONFIGS)}) nor an existing "
                         "path (a config.json, a transformer folder, or a .safetensors checkpoint)")
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.suffix == ".json" and config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(config_file)!r} is not a readable JSON config ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{str(config_file)!r} is not a WanTransformer3DModel config (not a JSON object)")
        return str(path), ("config", {k: v for k, v in raw.items() if not k.startswith("_")})
    return str(path), ("checkpoint", path)


def _model_layouts(source, target_modules, exclude_modules):
    """(total parameters, targeted layouts) from a config (meta model) or a checkpoint's header."""
    kind, value = source
    if kind == "config":
        from ..selection import model_layouts
        from ..wan_configs import build_meta_transformer

        try:
            model = build_meta_transformer(value)
        except TypeError as err:
            raise ValueError(f"the config does not build a WanTransformer3DModel ({err}): pass a transformer "
                             "config.json") from None
        total = sum(p.numel() for p in model.parameters())
        return total, model_layouts(model, target_modules, exclude_modules)
    from .safetensors_stream import open_checkpoint
    from .keys import detect_key_format, wan_to_diffusers

    ckpt = open_checkpoint(value)
    fmt, prefix = detect_key_format(ckpt.entries)
    to_d = (lambda n: n) if fmt == "diffusers" else wan_to_diffusers
    shapes = {to_d(k[len(prefix):]): e.shape for k, e in ckpt.entries.items()}
    total = sum(math.prod(s) for s in shapes.values())
    return total, layouts_from_shapes(shapes, target_modules, exclude_modules)


def selected_count(layout: ParamLayout, fraction, slice_id: int, seed: int) -> int:
    """Weights of `layout` the slice selects: the width of its rank window times the tile width."""
    lo, hi = rank_window(layout.num_tiles, parse_fraction(fraction), slice_id, _offset(layout.name, seed))
    return max(0, hi - lo) * layout.tile_width


def _stats(values: list[int]) -> dict:
    if not values:
        return {"blocks": 0, "min": 0, "mean": 0.0, "max": 0}
    return {"blocks": len(values), "min": min(values), "mean": mean(values), "max": max(values)}


def plan_report(model, fraction, slice_id: int = 0, seed: int = 0, target_modules=None,
                exclude_modules=None) -> dict:
    """Planning figures for one slice of a model (a Wan model name, a config dict, or a path to a config.json,
    transformer folder or checkpoint): parameter counts, the per-block spread, and bytes of the slice's values,
    gradients and Adam moments in fp32 and bf16 with a VRAM estimate for the slice part."""
    frac = parse_fraction(fraction)
    validate_slice_id(slice_id, frac)
    label, source = _load_model_source(model)
    total, layouts = _model_layouts(source, target_modules, exclude_modules)
    if not layouts:
        raise ValueError(f"no parameter of {label} matches target_modules={target_modules!r} "
                         f"(exclude_modules={exclude_modules!r}): nothing to train")
    selected = 0
    row_tiles = 0
    elements = 0
    per_block: dict[int, int] = {}
    for lay in layouts:
        n = selected_count(lay, frac, slice_id, seed)
        selected += n
        if lay.tiled_rows:
            row_tiles += n // lay.tile_width
        else:
            elements += n
        idx = block_index(lay.name)
        if idx is not None:
            per_block[idx] = per_block.get(idx, 0) + n
    targeted = sum(lay.numel for lay in layouts)
    index_bytes = row_tiles * INDEX_BYTES_PER_ROW_TILE + elements * INDEX_BYTES_PER_ELEMENT
    memory = {}
    for scheme, per in BYTES_PER_WEIGHT.items():
        parts = {k: v * selected for k, v in per.items()}
        parts["index"] = index_bytes
        parts["vram_estimate"] = sum(parts.values())
        memory[scheme] = parts
    return {
        "model": label,
        "fraction": float(fraction),
        "slice_id": slice_id,
        "seed": seed,
        "num_slices": num_slices_for(frac),
        "target_modules": target_modules,
        "exclude_modules": exclude_modules,
        "fingerprint": layout_fingerprint(layouts),
        "total_params": total,
        "targeted_params": targeted,
        "trainable_params": selected,
        "percent_of_model": 100.0 * selected / total,
        "percent_of_targeted": 100.0 * selected / targeted,
        "per_block": _stats([per_block[k] for k in sorted(per_block)]),
        "model_bytes_bf16": 2 * total,
        "bytes": memory,
        "note": "slice part only: add the CUDA context and activations (~1.5 GB in the original write-up); the "
                "frozen model stays in CPU RAM with block swapping",
    }


def inspect_report(slice_dir, overlap_with=None) -> dict:
    """What a saved slice holds: config, counts, per-block spread, delta norms per parameter kind, and (with
    `overlap_with`) the exact number of weights it shares with another slice."""
    s = read_slice(slice_dir)
    cfg = s.config
    deltas = s.load_all()
    per_block: dict[int, int] = {}
    kinds: dict[str, dict] = {}
    total_sq = 0.0
    nonzero = 0
    for name, (idx, values) in deltas.items():
        b = block_index(name)
        if b is not None:
            per_block[b] = per_block.get(b, 0) + len(idx)
        v = values.astype(np.float64)
        sq = float(np.dot(v, v))
        total_sq += sq
        nz = int(np.count_nonzero(values))
        nonzero += nz
        k = kinds.setdefault(parameter_kind(name), {"parameters": 0, "weights": 0, "nonzero": 0, "_sq": 0.0,
                                                     "max_abs": 0.0})
        k["parameters"] += 1
        k["weights"] += len(idx)
        k["nonzero"] += nz
        k["_sq"] += sq
        k["max_abs"] = max(k["max_abs"], float(np.abs(values).max()) if len(values) else 0.0)
    for k in kinds.values():
        k["l2"] = math.sqrt(k.pop("_sq"))
    blocks = sorted({block_index(n) for n in s.layouts if block_index(n) is not None})
    report = {
        "path": str(s.path),
        "config": {
            "fraction": cfg.fraction,
            "slice_id": cfg.slice_id,
            "seed": cfg.seed,
            "tile_order": cfg.tile_order,
            "num_slices": cfg.num_slices,
            "target_modules": cfg.target_modules,
            "exclude_modules": cfg.exclude_modules,
            "fingerprint": s.fingerprint,
        },
        "targeted_parameters": len(s.layouts),
        "touched_parameters": len(s.plan.tiles),
        "targeted_weights": s.plan.targeted,
        "selected_weights": s.plan.selected,
        "percent_of_targeted": 100.0 * s.plan.selected / s.plan.targeted if s.plan.targeted else 0.0,
        "nonzero_deltas": nonzero,
        "delta_l2": math.sqrt(total_sq),
        "per_block": {**_stats([per_block.get(b, 0) for b in blocks]),
                      "selected": {str(b): per_block.get(b, 0) for b in blocks}},
        "kinds": dict(sorted(kinds.items())),
        "values_bytes": s.values_file.stat().st_size,
    }
    if overlap_with is not None:
        other = read_slice(overlap_with)
        shared = overlap_count(s.plan, other.plan)
        report["overlap"] = {
            "other": str(other.path),
            "other_config": {"fraction": other.config.fraction, "slice_id": other.config.slice_id,
                             "seed": other.config.seed, "tile_order": other.config.tile_order},
            "shared_weights": shared,
            "same_layout": other.fingerprint == s.fingerprint,
            "percent_of_this_slice": 100.0 * shared / s.plan.selected if s.plan.selected else 0.0,
        }
    return report
