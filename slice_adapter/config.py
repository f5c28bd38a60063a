"""`SliceConfig`: the PEFT config of a slice adapter."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from . import _module_imported
from .selection import (TILE_ORDER, TILE_ORDERS, check_slice_fields, check_tile_order, num_slices_for,
                        recorded_tile_order)

SLICE_NAME = "slice"  # the method's name in PEFT; its type (`peft_type`) is defined here, registered in registry.py


def _add_peft_type_member(name: str) -> PeftType:
    # PEFT only registers methods listed in its PeftType enum and offers no way to extend it, so add the member by hand.
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


SLICE_PEFT_TYPE = _add_peft_type_member(SLICE_NAME.upper())

# What each program cannot take from a LoRA file, as an exclusion regex over diffusers parameter/module names (full
# match, as `exclude_modules`). Measured with the programs' own loaders (slice_adapter.files.export.CLIENTS says why).
_NON_LEAF = r"(?:.*\.)?scale_shift_table|(?:.*\.)?pos_embed"  # raw parameters of modules with children
LOSSLESS_FOR_EXCLUDES = {
    "comfy": _NON_LEAF,
    "wan2gp": _NON_LEAF,
    "diffusers": _NON_LEAF + r"|(?:.*\.)?norm[^.]*(?:\.(?:weight|bias))?|(?:.*\.)?patch_embedding(?:\..*)?",
    # everything but the Linear weights of the attention and FFN of the blocks
    "musubi": r"(?!blocks\.\d+\.(?:attn1|attn2|ffn)\.).*|.*\.bias|(?:.*\.)?norm[^.]*(?:\.weight)?",
}


def exclusion_with_client(exclude_modules, lossless_for: Optional[str]):
    """`exclude_modules` widened by what `lossless_for` cannot carry, as one regex (idempotent: a saved config that
    already holds the widened regex is returned unchanged)."""
    if lossless_for is None:
        return exclude_modules
    if lossless_for not in LOSSLESS_FOR_EXCLUDES:
        raise ValueError(f"lossless_for must be one of {sorted(LOSSLESS_FOR_EXCLUDES)} or None, got {lossless_for!r}")
    preset = LOSSLESS_FOR_EXCLUDES[lossless_for]
    if exclude_modules is None or exclude_modules == preset:
        return preset
    if isinstance(exclude_modules, str):
        if exclude_modules.endswith(f"|(?:{preset})"):
            return exclude_modules
        user = exclude_modules
    else:  # a list entry matches a name exactly or as a `.`-suffix: the same as this full-match regex
        user = "|".join(r"(?:.*\.)?" + re.escape(p) for p in exclude_modules)
    return f"(?:{user})|(?:{preset})"


@dataclass
class SliceConfig(PeftConfig):
    """Configuration of a slice adapter: full fine-tuning of a deterministic fraction of the real weights.

    Args:
        fraction (`float`): Share of the targeted weights the slice trains (`--ff`), in (0, 1].
        slice_id (`int`): Which slice (`--ffid`), in [0, num_slices); slices with different ids at the same fraction
            and seed never share a weight.
        seed (`int`): Selection seed; the same model layout, fraction, slice id and seed give the same weights anywhere.
        tile_order (`str`): How a matrix's tiles are ranked (`selection.py`): `"scattered"` (default) or `"banded"`
            (a small slice reads one band of each matrix's input, so training keeps less activation memory, but an
            earlier concept forgets more when a later one is trained). Slices at one fraction and seed are
            disjoint only within one order. A saved config takes the order its layout record names.
        target_modules (`list[str] | str | None`): What to slice. `None`: every parameter of the transformer blocks
            (`blocks.<i>.`: attention projections, FFN, norms, biases, `scale_shift_table`); a model without `blocks`
            needs explicit targets. A list entry matches a module name or a parameter name exactly or as a
            `.`-suffix, so raw parameters are named directly (`"scale_shift_table"`, `"norm2.weight"`); a string is a
            regex that must fully match a module or parameter name.
        exclude_modules (`list[str] | str | None`): Removes matches, with the same rules.
        lossless_for (`str | None`): `"comfy"`, `"wan2gp"`, `"musubi"` or `"diffusers"`: also leave out the parameters
            that program cannot take from a LoRA file, so `export_lora(format=...)` for it is lossless (merged files
            carry every parameter anyway). Folded into `exclude_modules` (one regex), which is what the saved config
            records.
        init_weights (`bool`): True: zero deltas (the model starts unchanged); False: small random deltas (tests).
        modules_to_save (`list[str] | None`): Modules trained in full and saved with the adapter (PEFT convention).
        layout (`dict | None`): Written on save: the fingerprint and the targeted parameters' names, shapes and
            tilings, so a slice can be checked against a model, merged or exported without the model.
    """

    fraction: float = field(default=0.001, metadata={"help": "Share of the targeted weights to train (--ff), in (0, 1]."})
    slice_id: int = field(default=0, metadata={"help": "Which disjoint slice to train (--ffid), in [0, num_slices)."})
    seed: int = field(default=0, metadata={"help": "Selection seed: same layout, fraction, id and seed give the same slice."})
    tile_order: str = field(
        default=TILE_ORDER,
        metadata={"help": f"How each matrix's tiles are ranked: one of {list(TILE_ORDERS)} (a saved config takes the "
                  "order its layout record names)."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules or raw parameters to slice (suffix match for a list, full regex match for a string). "
            "None: every parameter of the transformer blocks."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules or parameters to leave out (same matching as target_modules)."}
    )
    lossless_for: Optional[str] = field(
        default=None,
        metadata={
            "help": "Leave out what this program cannot take from a LoRA file (comfy, wan2gp, musubi, diffusers), "
            "so the LoRA export for it is lossless. None: target as target_modules/exclude_modules say."
        },
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: zero deltas; False: small random deltas (for tests)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    layout: Optional[dict] = field(
        default=None,
        metadata={"help": "Set on save: layout fingerprint and targeted parameter names/shapes/tilings."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SLICE_PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = list(self.exclude_modules)
        self.exclude_modules = exclusion_with_client(self.exclude_modules, self.lossless_for)
        check_slice_fields(self.fraction, self.slice_id, self.seed)  # ValueErrors naming the field and the value
        # a saved slice's tiles are where its record says: records without an order predate orders ("scattered")
        self.tile_order = recorded_tile_order(self.layout) if self.layout else check_tile_order(self.tile_order)

    @property
    def num_slices(self) -> int:
        """How many disjoint slice ids this fraction defines: floor(1 / fraction)."""
        return num_slices_for(self.fraction)


_module_imported(__name__)
