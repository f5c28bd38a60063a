"""Model-level functions of the public API: plan, overlap, merge, unmerge."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .config import SliceConfig
from .layer import SliceLayer
from .model import plan_for_model
from .selection import SlicePlan, overlap_count


def plan(model: nn.Module, config: SliceConfig) -> SlicePlan:
    """The weights `config` selects in `model` (works on meta-device models; adapters already injected are ignored)."""
    return plan_for_model(model, config)


def overlap(model: nn.Module, config_a: SliceConfig, config_b: SliceConfig) -> int:
    """Exact number of weights of `model` that both slices select."""
    return overlap_count(plan(model, config_a), plan(model, config_b))


def _layers(model: nn.Module) -> list[SliceLayer]:
    return [m for m in model.modules() if isinstance(m, SliceLayer)]


def merge_adapters(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
    """Bake the active (or named) slices into the base weights; `unmerge_adapters` restores them exactly."""
    layers = _layers(model)
    if not layers:
        raise ValueError("the model has no slice adapter to merge: add one with add_adapter or load_adapter first")
    for layer in layers:
        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)


def unmerge_adapters(model: nn.Module) -> None:
    """Restore the base weights exactly as they were before `merge_adapters`."""
    for layer in _layers(model):
        layer.unmerge()
