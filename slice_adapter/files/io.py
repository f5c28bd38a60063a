"""Saving and loading slice adapter folders on models (the PEFT side of `adapter_folder`): PEFT's layout
(`adapter_config.json` + `adapter_model.safetensors`) holding slice values only.

Indices are not stored: they are regenerated from the config, which records the layout fingerprint and the targeted
parameters' names, shapes and tilings (so a folder can be checked, merged or exported without the model).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .safetensors_stream import honour_umask, partial_path
from ..config import SLICE_PEFT_TYPE, SliceConfig
from .adapter_folder import CONFIG_NAME, PEFT_KEY_PREFIX, WEIGHTS_NAME, layout_record, read_adapter_settings
from ..layer import SliceLayer
from ..model import cast_slice_values
from ..selection import model_layouts


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model of a PeftModel, or the model itself."""
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "model") and hasattr(base, "peft_config"):
        return base.model
    return model


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's values with the keys PEFT's `save_pretrained` writes (adapter name removed), float32 on the CPU."""
    from peft import get_peft_model_state_dict

    # on a bare model PEFT omits the prefix; no embedding layer is ever part of a slice
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {(k if k.startswith(PEFT_KEY_PREFIX) else PEFT_KEY_PREFIX + k): v.detach().to("cpu", torch.float32)
            .contiguous() for k, v in state.items()}


@dataclass
class ValuesMismatch:
    """How a values file differs from the slice on a model: keys missing or unexpected, or a key of another shape."""

    missing: list[str]
    unexpected: list[str]
    shape: Optional[tuple[str, tuple, tuple]] = None  # (key, shape in the file, shape the slice needs)


def values_mismatch(model: nn.Module, adapter_name: str, values: dict[str, torch.Tensor]) -> Optional[ValuesMismatch]:
    """None when `values` (keys as PEFT writes them) are exactly `adapter_name`'s values on `model`."""
    want = adapter_state_dict(model, adapter_name)
    missing, unexpected = sorted(set(want) - set(values)), sorted(set(values) - set(want))
    if missing or unexpected:
        return ValuesMismatch(missing, unexpected)
    for key, value in want.items():
        if tuple(values[key].shape) != tuple(value.shape):
            return ValuesMismatch([], [], (key, tuple(values[key].shape), tuple(value.shape)))
    return None


def set_adapter_values(model: nn.Module, adapter_name: str, values: dict[str, torch.Tensor]) -> None:
    """Copy `values` (checked with `values_mismatch`) into `adapter_name`'s slice on `model` (PEFT's loader)."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, values, adapter_name=adapter_name)


def _write_folder_atomically(path: Path, write) -> None:
    """Write a folder into a temp sibling, then swap it into place; an old folder survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)  # NAME.partial-<pid>, made with the umask's mode (mkdtemp would make it 0700)
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    tmp.mkdir()
    try:
        if path.exists():  # keep files the adapter does not own (e.g. a README) in the new folder
            for item in path.iterdir():
                if item.name not in (CONFIG_NAME, WEIGHTS_NAME) and item.is_file():
                    shutil.copy2(item, tmp / item.name)
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model: nn.Module, path, adapter_name: str = "default") -> Path:
    """Save one slice as a PEFT adapter folder (about 4 bytes per selected weight). Returns the folder."""
    bare = _unwrap(model)
    configs = getattr(model, "peft_config", None) or getattr(bare, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r} on this model (have: {sorted(configs) or 'none'}); "
                         "pass adapter_name=")
    config = configs[adapter_name]
    if config.peft_type != SLICE_PEFT_TYPE:
        raise ValueError(f"adapter {adapter_name!r} is a {config.peft_type} adapter, not a slice")
    layouts = model_layouts(bare, config.target_modules, config.exclude_modules)
    record = layout_record(layouts, config.tile_order)
    state = adapter_state_dict(model, adapter_name)
    saved_config = SliceConfig(**{**config.to_dict(), "layout": record, "inference_mode": True})
    metadata = {"format": "pt", "slice_fingerprint": record["fingerprint"],
                "slice": json.dumps({"fraction": config.fraction, "slice_id": config.slice_id, "seed": config.seed})}

    def write(folder: Path):
        save_file(state, str(folder / WEIGHTS_NAME), metadata=metadata)
        honour_umask(folder / WEIGHTS_NAME)
        saved_config.save_pretrained(str(folder))

    _write_folder_atomically(Path(path), write)
    return Path(path)


def read_adapter_config(path) -> SliceConfig:
    """The SliceConfig of an adapter folder, with clear errors for a missing or broken folder."""
    raw = read_adapter_settings(path).raw
    fields = set(SliceConfig.__dataclass_fields__)
    return SliceConfig(**{k: v for k, v in raw.items() if k in fields and k != "peft_type"})


def read_adapter_values(path) -> dict[str, torch.Tensor]:
    """The values file of an adapter folder (keys as PEFT writes them)."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{str(path)!r} has no {WEIGHTS_NAME}: the adapter folder is incomplete")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(weights)!r} is corrupted or truncated ({err}): re-save or re-download it") from None


def _free_adapter_name(model: nn.Module) -> str:
    taken = set(getattr(model, "peft_config", {}) or {})
    if "default" not in taken:
        return "default"
    i = 1
    while f"default_{i}" in taken:
        i += 1
    return f"default_{i}"


def load_adapter(model: nn.Module, path, adapter_name: Optional[str] = None, is_trainable: bool = False,
                 autocast_adapter_dtype: bool = True) -> str:
    """Load a slice folder onto `model` and activate it beside the already active adapters. Returns its name.

    `adapter_name=None` takes "default", or the first free "default_<n>". `autocast_adapter_dtype=False` keeps the
    values in the base parameters' dtype (PEFT's meaning); the default keeps them in float32.
    """
    from peft import PeftModel, inject_adapter_in_model

    config = read_adapter_config(path)
    values = read_adapter_values(path)
    if isinstance(model, PeftModel):
        name = adapter_name or _free_adapter_name(model)
        model.load_adapter(str(path), adapter_name=name, is_trainable=is_trainable,
                           autocast_adapter_dtype=autocast_adapter_dtype)
        return name
    name = adapter_name or _free_adapter_name(model)
    if name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"an adapter named {name!r} is already loaded: pass another adapter_name")
    config.inference_mode = not is_trainable
    previously_active = _active_adapters(model)
    inject_adapter_in_model(config, model, name)  # checks the recorded layout against the model
    try:
        assign_values(model, name, values, path)
    except ValueError:
        for module in model.modules():
            if isinstance(module, SliceLayer):
                module.delete_adapter(name)
        model.peft_config.pop(name, None)
        raise
    if not autocast_adapter_dtype:
        cast_slice_values(model, name, autocast_adapter_dtype=False)
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True
    active = previously_active + [name]
    for module in model.modules():
        if isinstance(module, SliceLayer):
            module.set_adapter([a for a in active if a in module.slice_values] or [name], inference_mode=not is_trainable)
    return name


def _active_adapters(model: nn.Module) -> list[str]:
    for module in model.modules():
        if isinstance(module, SliceLayer):
            return list(module.active_adapters)
    return []


def assign_values(model: nn.Module, adapter_name: str, values: dict[str, torch.Tensor], path, *,
                  fix: str = "the values file is corrupted or belongs to another slice") -> None:
    """Set the values of the slice `adapter_name` on `model` from `values` (read from `path`); a file that does not
    fit the slice is refused with one message ending in `fix`."""
    bad = values_mismatch(model, adapter_name, values)
    if bad is not None and bad.shape is None:
        first = bad.missing[0] if bad.missing else bad.unexpected[0]
        raise ValueError(f"{str(path)!r} does not match the slice on this model ({len(bad.missing)} missing, "
                         f"{len(bad.unexpected)} unexpected, e.g. {first!r}): {fix}")
    if bad is not None:
        key, got, need = bad.shape
        raise ValueError(f"{key!r} in {str(path)!r} has shape {got}, the slice needs {need}: {fix}")
    set_adapter_values(model, adapter_name, values)
