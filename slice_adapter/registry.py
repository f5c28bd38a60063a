"""Registration of the "SLICE" PEFT type, kept apart so it is imported (and tested) on its own."""

from __future__ import annotations

from peft.utils.peft_types import PeftType

from . import _module_imported

SLICE_NAME = "slice"


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


def register_slice_method() -> None:
    """Register `SliceConfig`/`SliceModel` with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import SliceConfig
    from .model import SliceModel

    if PEFT_TYPE_TO_TUNER_MAPPING.get(SLICE_PEFT_TYPE) is SliceModel:
        return
    register_peft_method(name=SLICE_NAME, config_cls=SliceConfig, model_cls=SliceModel, prefix="slice_")


_module_imported(__name__)
