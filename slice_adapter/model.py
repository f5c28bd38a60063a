"""`SliceModel`: the PEFT tuner that injects slice layers into a model, and the model-level functions of the public
API (`plan`, `overlap`, `merge_adapters`, `unmerge_adapters`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule

from .config import SliceConfig
from . import _module_imported
from .layer import Elementwise, Linear, ParamSlice, SliceLayer
from .recompute import install_block_hooks, install_ffn_hooks, remove_block_hooks
from .selection import (
    ADAPTER_CHILD,
    SlicePlan,
    _is_adapter_name,
    canonical_name,
    layout_fingerprint,
    model_layouts,
    overlap_count,
    plan_layouts,
)


def plan_for_model(model: nn.Module, config: SliceConfig) -> SlicePlan:
    """The slice `config` selects in `model`, checked against the layout the config recorded (if any)."""
    layouts = model_layouts(model, config.target_modules, config.exclude_modules)
    if not layouts:
        hint = (
            "target_modules=None targets the parameters of transformer blocks (`blocks.<i>.`), and this model has none"
            if config.target_modules is None
            else f"target_modules={config.target_modules!r} exclude_modules={config.exclude_modules!r} match nothing"
        )
        raise ValueError(f"no parameter to slice: {hint}; pass target_modules naming modules or parameters of the model")
    if config.layout:
        check_layout(config.layout, layouts)
    plan = plan_layouts(layouts, config.fraction, config.slice_id, config.seed, config.tile_order)
    plan.shapes = {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters() if not _is_adapter_name(n)}
    return plan


def check_layout(recorded: dict, layouts) -> None:
    """Raise a ValueError naming the first parameter (in model order) where a model's layout differs from a record."""
    if recorded.get("fingerprint") == layout_fingerprint(layouts):
        return
    params = recorded.get("parameters", {})
    for lay in layouts:
        if lay.name not in params:
            raise ValueError(f"slice layout mismatch: the model targets {lay.name!r}, which the slice does not record: "
                             "use the slice's target_modules/exclude_modules and the model it was trained on")
        shape, tiled_rows = params[lay.name]
        if list(lay.shape) != list(shape) or lay.tiled_rows != tiled_rows:
            raise ValueError(f"slice layout mismatch at {lay.name!r}: slice has shape {tuple(shape)}, model has "
                             f"{lay.shape}: load it onto the model it was trained on")
    missing = next(name for name in params if name not in {lay.name for lay in layouts})
    raise ValueError(f"slice layout mismatch: the slice targets {missing!r}, which this model does not have "
                     "(or does not target): load it onto the model it was trained on")


class SliceModel(BaseTuner):
    """Injects slice layers for every module that owns a parameter the slice selects.

    Example:

        ```py
        >>> import slice_adapter
        >>> from slice_adapter import SliceConfig
        >>> transformer.add_adapter(SliceConfig(fraction=0.001, slice_id=1))
        ```
    """

    prefix: str = "slice_"
    tuner_layer_cls = SliceLayer
    target_module_mapping = {}

    def _prepare_adapter_config(self, peft_config: SliceConfig, model_config: dict) -> SliceConfig:
        return peft_config  # target_modules=None has a meaning of its own (every block parameter)

    def _pre_injection_hook(self, model: nn.Module, config: SliceConfig, adapter_name: str) -> None:
        plan = plan_for_model(model, config)
        owners: dict[str, dict] = {}
        for name, tiles in plan.tiles.items():
            module_name, _, pname = name.rpartition(".")
            owners.setdefault(module_name, {})[pname] = (plan.layouts[name], tiles)
        self._injection_owners = owners
        install_block_hooks(model)  # the inputs a Wan block's norms feed are recomputed in backward, not kept
        excluded = set()
        if config.exclude_modules:  # tell PEFT what was excluded, or it warns that nothing was
            kept = {lay.name for lay in plan.layouts.values()}
            for lay in model_layouts(model, config.target_modules, None):
                if lay.name not in kept:
                    excluded.add(lay.name.rpartition(".")[0])
        self._excluded_owners = excluded - set(owners)

    def inject_adapter(self, model: nn.Module, *args, **kwargs) -> None:
        super().inject_adapter(model, *args, **kwargs)
        # after every injection (a later adapter may wrap net.0.proj): under torch.compile, the FFN's hidden
        # activation is made again in chunks in backward
        install_ffn_hooks(model)

    def _check_target_module_exists(self, peft_config: SliceConfig, key: str):
        if _is_adapter_name(key) or key.endswith("base_layer"):
            return False
        name = canonical_name(key)
        if name in getattr(self, "_excluded_owners", ()):
            return _ExcludedModule()
        return name in getattr(self, "_injection_owners", {})

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        entries = self._injection_owners[canonical_name(current_key)]
        if isinstance(target, SliceLayer):
            target.update_layer(adapter_name, entries, config.init_weights, config.inference_mode)
            return
        existing = getattr(target, ADAPTER_CHILD, None)
        if isinstance(existing, ParamSlice):
            existing.update_layer(adapter_name, entries, config.init_weights, config.inference_mode)
            return
        new_module = self._create_new_module(config, adapter_name, target, entries)
        if isinstance(new_module, ParamSlice):
            target.add_module(ADAPTER_CHILD, new_module)
        else:
            self._replace_module(parent, target_name, new_module, target)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)

    @staticmethod
    def _create_new_module(config: SliceConfig, adapter_name: str, target: nn.Module, entries: dict) -> nn.Module:
        """Dispatch on the base module type: Linear, leaf (norms), or container owning raw parameters."""
        if isinstance(target, nn.Linear):
            return Linear(target, adapter_name, entries, init_weights=config.init_weights)
        if not any(True for _ in target.children()):
            return Elementwise(target, adapter_name, entries, init_weights=config.init_weights)
        return ParamSlice(target, adapter_name, entries, init_weights=config.init_weights)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        remove_block_hooks(model)
        return model

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if new_module is None:  # a ParamSlice unloaded itself: drop the child
            delattr(parent, child_name)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if not _is_adapter_name(name):
                param.requires_grad = False
        for module in model.modules():
            if isinstance(module, SliceLayer):
                module._freeze_non_trainable_peft_weights()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's contract (get_peft_model, add_adapter, from_pretrained, load_adapter): True keeps the values in
        float32 (half-precision values are upcast); False stores them in each base parameter's dtype."""
        cast_slice_values(self.model, adapter_name, autocast_adapter_dtype)


def cast_slice_values(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Values of `adapter_name` in float32 (`autocast_adapter_dtype=True`) or in their base parameter's dtype."""
    for module in model.modules():
        if not isinstance(module, SliceLayer) or adapter_name not in module.slice_values:
            continue
        base = module.sliced_parameters()
        values = module.slice_values[adapter_name]
        for pname, value in list(values.items()):
            dtype = torch.float32 if autocast_adapter_dtype else base[pname].dtype
            if autocast_adapter_dtype and value.dtype not in (torch.float16, torch.bfloat16):
                continue  # PEFT upcasts half precision only
            if not dtype.is_floating_point or value.dtype == dtype:
                continue
            values[pname] = nn.Parameter(value.detach().to(dtype), requires_grad=value.requires_grad)


def slice_layers(model: nn.Module):
    """(name, layer) of every slice layer of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SliceLayer)]


def plan(model: nn.Module, config: SliceConfig) -> SlicePlan:
    """The weights `config` selects in `model` (works on meta-device models; adapters already injected are ignored)."""
    return plan_for_model(model, config)


def overlap(model: nn.Module, config_a: SliceConfig, config_b: SliceConfig) -> int:
    """Exact number of weights of `model` that both slices select."""
    return overlap_count(plan(model, config_a), plan(model, config_b))


def merge_adapters(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
    """Bake the active (or named) slices into the base weights; `unmerge_adapters` restores them exactly."""
    layers = [layer for _, layer in slice_layers(model)]
    if not layers:
        raise ValueError("the model has no slice adapter to merge: add one with add_adapter or load_adapter first")
    for layer in layers:
        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)


def unmerge_adapters(model: nn.Module) -> None:
    """Restore the base weights exactly as they were before `merge_adapters`."""
    for _, layer in slice_layers(model):
        layer.unmerge()


_module_imported(__name__)  # SliceConfig and SliceModel exist now: PEFT can build and load slices
