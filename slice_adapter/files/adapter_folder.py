"""The adapter folder's on-disk format, readable without PEFT.

PEFT's layout: `adapter_config.json` (the slice's fields, `peft_type` SLICE, and the layout record: fingerprint plus
the targeted parameters' names, shapes and tilings) and `adapter_model.safetensors` (float32 values under the keys
`PeftModel.save_pretrained` writes). `io` builds PEFT configs and models on top of this module; merge, export and
inspect need only this one, so those command-line tools start without importing PEFT or diffusers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..selection import (ADAPTER_CHILD, ParamLayout, check_slice_fields, layout_fingerprint, num_slices_for,
                         recorded_tile_order)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names
VALUES_INFIX = ".slice_values."


def values_key(module: str, pname: str) -> str:
    """The values-file key of parameter `pname` of slice layer `module`."""
    return f"{PEFT_KEY_PREFIX}{module}{VALUES_INFIX}{pname}"


def param_name_for_key(key: str) -> str:
    """`base_model.model.<M>.slice_values.<p>` -> `<M>.<p>`; raw parameters live under `<owner>.sliced_params`."""
    if not key.startswith(PEFT_KEY_PREFIX) or VALUES_INFIX not in key:
        raise ValueError(f"{key!r} is not a slice values key (expected "
                         f"'{PEFT_KEY_PREFIX}<module>{VALUES_INFIX}<param>')")
    module, _, pname = key[len(PEFT_KEY_PREFIX):].rpartition(VALUES_INFIX)
    if module == ADAPTER_CHILD:
        return pname
    module = module.removesuffix("." + ADAPTER_CHILD)
    return f"{module}.{pname}"


@dataclass(frozen=True)
class SliceSettings:
    """The fields of a saved slice config that decide its weights (what `SliceConfig` holds, without PEFT)."""

    fraction: float
    slice_id: int
    seed: int = 0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layout: Optional[dict] = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the whole adapter_config.json

    def __post_init__(self):
        check_slice_fields(self.fraction, self.slice_id, self.seed)

    @property
    def num_slices(self) -> int:
        return num_slices_for(self.fraction)

    @property
    def tile_order(self) -> str:
        return recorded_tile_order(self.layout)


def read_adapter_settings(path) -> SliceSettings:
    """The slice fields of an adapter folder's config, with clear errors for a missing or broken folder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"slice adapter folder {str(path)!r} does not exist: pass the folder save_adapter wrote")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise ValueError(f"{str(path)!r} has no {CONFIG_NAME}: not an adapter folder (or an incomplete copy)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(cfg_file)!r} is corrupted ({err}): re-save or re-download the adapter") from None
    if not isinstance(raw, dict) or str(raw.get("peft_type", "")).upper() != "SLICE":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{str(path)!r} holds a {kind!r} adapter, not a slice (peft_type SLICE)")
    return SliceSettings(
        fraction=raw.get("fraction", 0.001), slice_id=raw.get("slice_id", 0), seed=raw.get("seed", 0),
        target_modules=raw.get("target_modules"), exclude_modules=raw.get("exclude_modules"),
        layout=raw.get("layout"), raw=raw,
    )


def slice_files(path) -> list[Path]:
    """The folder and files of an adapter folder (what a command reading it must not overwrite)."""
    path = Path(path)
    return [path, path / CONFIG_NAME, path / WEIGHTS_NAME]


def layout_record(layouts: list[ParamLayout], tile_order: str) -> dict:
    """What a saved config records about the targeted parameters and how their tiles are ranked."""
    return {
        "fingerprint": layout_fingerprint(layouts),
        "tile_order": tile_order,
        "parameters": {lay.name: [list(lay.shape), lay.tiled_rows] for lay in layouts},
    }


def recorded_layouts(config) -> list[ParamLayout]:
    """The targeted parameters a saved config (`SliceSettings` or `SliceConfig`) records."""
    if not config.layout:
        raise ValueError("this slice config records no layout (it was not written by save_adapter): "
                         "re-save it with slice_adapter.save_adapter")
    return [ParamLayout(n, tuple(s), bool(r)) for n, (s, r) in config.layout["parameters"].items()]
