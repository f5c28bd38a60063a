"""Make slices first-class on diffusers models: `model.load_adapter(path)` where diffusers defines none."""

from __future__ import annotations


def install_diffusers_integration() -> None:
    try:
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError:  # diffusers is optional for the adapter library
        return
    if hasattr(ModelMixin, "load_adapter"):
        return

    def load_adapter(self, path, adapter_name=None, is_trainable=False):
        """Load a slice adapter folder (slice_adapter.load_adapter); returns the adapter name."""
        from .files.io import load_adapter as _load

        return _load(self, path, adapter_name=adapter_name, is_trainable=is_trainable)

    ModelMixin.load_adapter = load_adapter
