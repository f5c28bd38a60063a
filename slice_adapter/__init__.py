"""slice_adapter: full fine-tuning of deterministic, disjoint parameter slices as a PEFT adapter type ("SLICE").

Two rooms: this folder is the PEFT method (config, layer, model, registry, selection, wan_configs); `files/` is
everything on disk (adapter folder and io, safetensors streaming, key names, deltas, merge, export, reports).

Importing the package is cheap: the checkpoint tools need only numpy and safetensors (`slice_adapter.files.merge`,
`.deltas`, `.report`, `.wan2gp`: no torch, which takes ~2 s to import) or torch as well (`.export`). The PEFT side loads with the first public name used (`SliceConfig`, `load_adapter`,
...) and registers the SLICE type with PEFT; it also registers as soon as PEFT itself is imported (now, if it already
is), so `PeftModel.from_pretrained(model, slice_folder)` works after a bare `import slice_adapter`. Likewise diffusers
models get `load_adapter` once diffusers is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

import wrapt


def _drop_bitsandbytes_cpu_kernel_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes' import (through PEFT) warns that its optional CPU 4-bit kernel package `kernels` is missing;
    # slice-ft never runs 4-bit layers (adamw8bit uses its CUDA 8-bit optimizer), so the line would only mislead.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bitsandbytes_cpu_kernel_notice)

_PUBLIC = {
    "SLICE_PEFT_TYPE": "config",
    "SliceConfig": "config",
    "SliceModel": "model",
    "load_adapter": "files.io",
    "save_adapter": "files.io",
    "merge_adapters": "model",
    "overlap": "model",
    "plan": "model",
    "unmerge_adapters": "model",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}.model")  # registers the SLICE type with PEFT as its import ends
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


# Modules that moved (the file formats into `files/`), importable by their old names: the same module object, so
# monkeypatching either name patches both.
_MOVED = {
    "api": "model",
    "checkpoint": "files.safetensors_stream",
    "deltas": "files.deltas",
    "export": "files.export",
    "formats": "files.adapter_folder",
    "io": "files.io",
    "keys": "files.keys",
    "ledger": "files.ledger",
    "merge": "files.merge",
    "report": "files.report",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import slice_adapter.merge` -> `slice_adapter.files.merge`, imported only when asked for."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != __name__ or old not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # the import system gave it the old name's spec: undo that


sys.meta_path.insert(0, _MovedModuleFinder())


_PEFT_MODULES = ("registry", "config", "layer", "model")  # the package's modules that import PEFT
_finished: set[str] = set()  # those of them whose import has ended


def _module_imported(name: str) -> None:
    """The last line of each of _PEFT_MODULES: it is whole now, so registration may go ahead."""
    _finished.add(name.rpartition(".")[2])
    _ensure_registered()


def _ensure_registered(*_) -> None:
    """Register the SLICE type with PEFT as soon as the modules it needs can be imported.

    Runs when PEFT is imported and as each of _PEFT_MODULES finishes importing; waits while one of them is still
    importing (it calls this again when done). Registration is idempotent.
    """
    if any(f"{__name__}.{sub}" in sys.modules and sub not in _finished for sub in _PEFT_MODULES):
        return
    importlib.import_module(f"{__name__}.registry").register_slice_method()


def _extend_diffusers(_diffusers) -> None:
    """Make slices first-class on diffusers models: `model.load_adapter(path)` where diffusers defines none."""
    from diffusers.models.modeling_utils import ModelMixin

    if hasattr(ModelMixin, "load_adapter"):
        return

    def load_adapter(self, path, adapter_name=None, is_trainable=False):
        """Load a slice adapter folder (slice_adapter.load_adapter); returns the adapter name."""
        from .files.io import load_adapter as _load

        return _load(self, path, adapter_name=adapter_name, is_trainable=is_trainable)

    ModelMixin.load_adapter = load_adapter


# A post-import hook runs right after the module is imported, or now if it already is.
wrapt.register_post_import_hook(_ensure_registered, "peft")
wrapt.register_post_import_hook(_extend_diffusers, "diffusers")
