"""slice_adapter: full fine-tuning of deterministic, disjoint parameter slices as a PEFT adapter type ("SLICE")."""

from .registry import SLICE_PEFT_TYPE, register_slice_method
from .config import SliceConfig
from .model import SliceModel

register_slice_method()

from .api import merge_adapters, overlap, plan, unmerge_adapters  # noqa: E402
from .io import load_adapter, save_adapter  # noqa: E402
from .diffusers_integration import install_diffusers_integration  # noqa: E402

install_diffusers_integration()

__all__ = [
    "SLICE_PEFT_TYPE",
    "SliceConfig",
    "SliceModel",
    "load_adapter",
    "merge_adapters",
    "overlap",
    "plan",
    "save_adapter",
    "unmerge_adapters",
]
