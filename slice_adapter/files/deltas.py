"""A saved slice as sparse deltas, read from its folder alone (no model): {parameter: (flat indices, values)}.

The folder's config records the targeted parameters' names, shapes and tilings, so the indices are regenerated with
`plan_layouts`; the values file is only checked from its header until a parameter's values are asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from . import dtypes
from .safetensors_stream import TensorEntry, read_header, read_stored
from .adapter_folder import WEIGHTS_NAME, SliceSettings, param_name_for_key, read_adapter_settings, recorded_layouts
from ..selection import ParamLayout, SlicePlan, is_targeted, layout_fingerprint, plan_layouts, recorded_tile_order

_BLOCK_NUM = re.compile(r"(^|\.)blocks\.\d+\.")


def parameter_kind(name: str) -> str:
    """The parameter with its block index as `*`: `blocks.3.attn1.to_q.weight` -> `blocks.*.attn1.to_q.weight`."""
    return _BLOCK_NUM.sub(r"\1blocks.*.", name)


def layouts_from_shapes(shapes: dict, target_modules=None, exclude_modules=None) -> list[ParamLayout]:
    """The targeted parameters of a checkpoint given its diffusers names and shapes (no model needed).

    Same rules as `selection.model_layouts` for Wan transformers: a 2-D `.weight` is an `nn.Linear` weight (row
    tiles); the module of `X.weight`/`X.bias`/`X.scale_shift_table` is `X`.
    """
    layouts = []
    for name, shape in shapes.items():
        if not is_targeted(name.rpartition(".")[0], name, target_modules, exclude_modules):
            continue
        layouts.append(ParamLayout(name, tuple(shape), name.endswith(".weight") and len(shape) == 2))
    return layouts


@dataclass
class SliceDeltas:
    """One saved slice: its config, recorded layouts, plan and the values file's tensors (not yet read)."""

    path: Path
    config: SliceSettings
    layouts: dict[str, ParamLayout]
    plan: SlicePlan
    values_file: Path
    entries: dict[str, TensorEntry]  # parameter name -> its values' entry in the values file

    @property
    def fingerprint(self) -> str:
        return self.config.layout["fingerprint"]

    @property
    def label(self) -> str:
        cfg = self.config
        return f"{str(self.path)!r} (fraction {cfg.fraction}, slice_id {cfg.slice_id}, seed {cfg.seed})"

    def indices(self, name: str) -> np.ndarray:
        """Flat row-major indices of parameter `name`'s selected weights, in value order."""
        return self.plan.flat_indices(name)

    def values(self, name: str, f=None) -> np.ndarray:
        """Parameter `name`'s delta values as a float32 1-D numpy array (read now; pass `open_values()` to reuse the
        open file)."""
        if f is None:
            with self.open_values() as fh:
                return self.values(name, fh)
        entry = self.entries[name]
        return dtypes.to_float(read_stored(f, entry), entry.dtype).reshape(-1).astype(np.float32, copy=False)

    def open_values(self):
        """The values file, open for `values` (a context manager). Read as bytes and converted by `dtypes`, without
        torch: safetensors' numpy reader refuses bf16 values."""
        return open(self.values_file, "rb")

    def load_all(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{parameter: (flat indices int64, values float32)} for every parameter the slice touches."""
        out = {}
        with self.open_values() as f:
            for name in self.plan.tiles:
                out[name] = (self.indices(name), self.values(name, f))
        return out

    def provenance(self) -> dict:
        """What a merged checkpoint records about this slice."""
        cfg = self.config
        return {
            "path": str(self.path.resolve()),
            "fraction": cfg.fraction,
            "slice_id": cfg.slice_id,
            "seed": cfg.seed,
            "tile_order": cfg.tile_order,
            "target_modules": cfg.target_modules,
            "exclude_modules": cfg.exclude_modules,
            "fingerprint": self.fingerprint,
            "selected": self.plan.selected,
        }


def read_slice(path) -> SliceDeltas:
    """Open a slice adapter folder and check it is whole: config, layout record, values keys and shapes."""
    path = Path(path)
    config = read_adapter_settings(path)
    layouts = recorded_layouts(config)
    recorded = (config.layout or {}).get("fingerprint")
    actual = layout_fingerprint(layouts)
    if recorded != actual:
        raise ValueError(f"{str(path)!r}: the config's layout fingerprint {recorded!r} does not match its recorded "
                         f"parameters ({actual!r}): adapter_config.json was edited or damaged; re-save the slice")
    values_file = path / WEIGHTS_NAME
    if not values_file.is_file():
        raise ValueError(f"{str(path)!r} has no {WEIGHTS_NAME}: the adapter folder is incomplete")
    header, _ = read_header(values_file)  # checked as every base is: truncation, damage, safetensors' own parser
    plan = plan_layouts(layouts, config.fraction, config.slice_id, config.seed, config.tile_order)
    by_param: dict[str, TensorEntry] = {}
    for key, entry in header.items():
        try:
            name = param_name_for_key(key)
        except ValueError as err:
            raise ValueError(f"{str(values_file)!r}: {err}; the values file is not a slice's") from None
        by_param[name] = entry
    missing = [n for n in plan.tiles if n not in by_param]
    unexpected = [n for n in by_param if n not in plan.tiles]
    if missing or unexpected:
        what = f"missing values for {missing[0]!r}" if missing else f"unexpected values for {unexpected[0]!r}"
        raise ValueError(f"{str(values_file)!r} does not match the slice its config defines ({what}; {len(missing)} "
                         f"missing, {len(unexpected)} unexpected): the values file is damaged or belongs to another "
                         "slice")
    for name, tiles in plan.tiles.items():
        lay = plan.layouts[name]
        want = (len(tiles), lay.tile_width) if lay.tiled_rows else (len(tiles),)
        entry = by_param[name]
        if entry.shape != want:
            raise ValueError(f"{str(values_file)!r}: values of {name!r} have shape {list(entry.shape)}, the slice "
                             f"needs {list(want)}: the values file belongs to another slice")
        if not entry.is_floating_point:
            raise ValueError(f"{str(values_file)!r}: values of {name!r} are {entry.dtype}, not floating point")
    return SliceDeltas(path, config, dict(plan.layouts), plan, values_file, {n: by_param[n] for n in plan.tiles})


def slice_deltas(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{diffusers parameter name: (flat indices np.int64, values np.float32 1-D)} of a slice folder, no model needed."""
    return read_slice(path).load_all()


def check_layout_matches(slice_: SliceDeltas, shapes: dict, what: str = "BASE",
                         display_name=None) -> None:
    """Raise a ValueError naming the first parameter where the slice's recorded layout and `shapes` disagree.

    `shapes` maps diffusers names to shapes. Checks both ways: every recorded parameter exists with its shape, and
    the slice's targeting rules applied to `shapes` select exactly the recorded parameters (so a slice trained on
    another model, e.g. one with fewer blocks, is refused).
    """
    def named(n: str) -> str:  # the name as BASE spells it, with the diffusers name when they differ
        shown = display_name(n) if display_name else n
        return repr(n) if shown == n else f"{shown!r} ({n!r})"

    for name, lay in slice_.layouts.items():
        if name not in shapes:
            raise ValueError(f"slice {slice_.label} was trained on a model with parameter {named(name)} (shape "
                             f"{list(lay.shape)}), which {what} lacks: the slice belongs to another model")
        if tuple(shapes[name]) != tuple(lay.shape):
            raise ValueError(f"slice {slice_.label} expects {named(name)} with shape {list(lay.shape)}, {what} has "
                             f"{list(shapes[name])}: the slice belongs to another model size")
    cfg = slice_.config
    for lay in layouts_from_shapes(shapes, cfg.target_modules, cfg.exclude_modules):
        if lay.name not in slice_.layouts:
            raise ValueError(f"{what} has parameter {named(lay.name)} (shape {list(lay.shape)}) that the slice's "
                             f"targeting covers but the model slice {slice_.label} was trained on did not have: the "
                             "slice belongs to another model")
        if lay.tiled_rows != slice_.layouts[lay.name].tiled_rows:
            raise ValueError(f"{what} parameter {named(lay.name)} is tiled differently from the slice's record: the "
                             "slice belongs to another model")


def planned_overlap(a: SliceDeltas, b: SliceDeltas) -> int:
    """Exact number of weights two slices both own (by parameter name)."""
    from ..selection import overlap_count

    return overlap_count(a.plan, b.plan)


def iter_touched(slices: Iterable[SliceDeltas]) -> dict[str, list[SliceDeltas]]:
    """Parameter name -> the slices that change it, in the given order."""
    out: dict[str, list[SliceDeltas]] = {}
    for s in slices:
        for name in s.plan.tiles:
            out.setdefault(name, []).append(s)
    return out


def prior_plan(slice_: SliceDeltas, record: dict) -> Optional[SlicePlan]:
    """The plan of a slice recorded in a checkpoint's provenance, if it was made on the same layout as `slice_`."""
    if record.get("fingerprint") != slice_.fingerprint:
        return None
    return plan_layouts(slice_.layouts.values(), record["fraction"], record["slice_id"], record.get("seed", 0),
                        recorded_tile_order(record))
