"""Registration of the "SLICE" method with PEFT, in one place: PEFT builds and loads slices by its type name."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from . import _module_imported
from .config import SLICE_NAME, SLICE_PEFT_TYPE, SliceConfig
from .model import SliceModel

__all__ = ["SLICE_NAME", "SLICE_PEFT_TYPE", "register_slice_method"]


def register_slice_method() -> None:
    """Register `SliceConfig`/`SliceModel` with PEFT (idempotent)."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(SLICE_PEFT_TYPE) is SliceModel:
        return
    register_peft_method(name=SLICE_NAME, config_cls=SliceConfig, model_cls=SliceModel, prefix="slice_")


_module_imported(__name__)
