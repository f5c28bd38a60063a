"""Final outputs of a run: the slice (`output_dir/slice/`) and, on request, the merged transformer
(`output_dir/merged/`) in the key format of the input.

- pipeline folder input (or `tiny`): `merged/` is a diffusers transformer folder (`config.json` +
  `diffusion_pytorch_model.safetensors`, diffusers keys), loadable with `WanTransformer3DModel.from_pretrained` and
  usable as `--transformer_file merged/diffusion_pytorch_model.safetensors` to stack another slice;
- `--transformer_file X.safetensors` input: `merged/X.safetensors`, with X's own keys and prefix (original Wan /
  ComfyUI or diffusers) and X's per-tensor dtypes.

The merge always starts from the base on disk (never from a bf16/fp8 training copy): `slice_adapter.merge` streams
it one tensor at a time; without a base file (`tiny`), the base is rebuilt in memory and merged there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

import slice_adapter
from slice_adapter import ledger

SLICE_SUBDIR = "slice"
MERGED_SUBDIR = "merged"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def save_slice(transformer: torch.nn.Module, output_dir: str | os.PathLike, concept: Optional[dict] = None) -> Path:
    """`output_dir/slice/`: the adapter folder (`adapter_config.json` + `adapter_model.safetensors`) and, given a
    concept (`slice_adapter.ledger.concept_record`), its ledger record `concept.json`."""
    folder = slice_adapter.save_adapter(transformer, Path(output_dir) / SLICE_SUBDIR)
    if concept is None:  # an earlier run's record in the same folder does not describe this slice
        (folder / ledger.CONCEPT_FILE).unlink(missing_ok=True)
        return folder
    cfg = transformer.peft_config["default"]  # the adapter save_adapter wrote
    ledger.write_concept(folder, concept, fraction=cfg.fraction, slice_id=cfg.slice_id, seed=cfg.seed)
    return folder


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base parameter names and (merged) values of a model carrying slice layers: adapter entries dropped."""
    out = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if any(p.startswith("slice") for p in parts):  # slice_values, sliced_params: adapter state
            continue
        out[".".join(p for p in parts if p != "base_layer")] = tensor
    return out


def merge_base_path(source: dict) -> Optional[Path]:
    """The base checkpoint on disk (a file or a diffusers transformer folder), or None (tiny: in memory only)."""
    if source.get("kind") == "single_file":
        return Path(source["transformer_file"])
    if source.get("kind") == "pretrained":
        root = Path(source["pretrained_model_name_or_path"])
        return root / source["subfolder"] if source.get("subfolder") else root
    return None


def merged_output_path(source: dict, output_dir: str | os.PathLike) -> Path:
    """Where the merged weights file goes."""
    merged = Path(output_dir) / MERGED_SUBDIR
    if source.get("kind") == "single_file":
        return merged / Path(source["transformer_file"]).name
    return merged / DIFFUSERS_WEIGHTS


def check_merged_space(source: dict, output_dir: str | os.PathLike, model: Optional[torch.nn.Module] = None) -> int:
    """--save_merged, checked before training: the merged file needs about the base's size free on OUTPUT_DIR's disk
    (the merge writes it next to any earlier one, which stays until the new one is complete). Returns the bytes."""
    from slice_adapter.checkpoint import open_checkpoint
    from slice_adapter.report import format_bytes

    base = merge_base_path(source)
    if base is not None:
        need = sum(e.nbytes for e in open_checkpoint(base).entries.values())
    else:  # tiny: rebuilt in memory and written in float32
        need = sum(p.numel() * 4 for p in (model.parameters() if model is not None else ()))
    probe = Path(output_dir).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ValueError(f"--save_merged needs {format_bytes(need)} free in {str(output_dir)!r} for "
                         f"{MERGED_SUBDIR}/ and {format_bytes(free)} are free: free space, pass another --output_dir, "
                         "or drop --save_merged and merge later with scripts/merge_slices.py")
    return need


def save_merged(
    source: dict,
    slice_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    rebuild_base: Optional[Callable[[], torch.nn.Module]] = None,
    progress: bool = True,
) -> Path:
    """Write `output_dir/merged/` = base + slice in the base's key format; returns the weights file."""
    out = merged_output_path(source, output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = merge_base_path(source)
    merge_slices = _streaming_merge()
    if base is not None and merge_slices is not None:
        merge_slices(base, [Path(slice_dir)], out, overwrite=True, progress=progress)
        if base.is_dir():
            shutil.copy2(base / "config.json", out.parent / "config.json")
        return out
    if rebuild_base is None:
        raise ValueError("save_merged: no base checkpoint on disk and no rebuild_base; pass rebuild_base=")
    return _merge_in_memory(source, rebuild_base(), slice_dir, out)


def _streaming_merge():
    try:
        from slice_adapter.merge import merge_slices
    except ImportError:  # the streaming merge is optional; the in-memory merge covers every input
        return None
    return merge_slices


def _stored_dtypes(source: dict) -> dict[str, torch.dtype]:
    """Per-tensor dtypes of the base file (keyed by diffusers name), to write merged tensors as the base stores them."""
    base = merge_base_path(source)
    if base is None or not base.is_file():
        return {}
    from safetensors import safe_open

    from slice_adapter.keys import to_diffusers_state_dict

    with safe_open(str(base), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    names = to_diffusers_state_dict(dict.fromkeys(dtypes))
    st = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    return {d: st.get(dtypes[k], None) for k, d in zip(dtypes, names)}


def _merge_in_memory(source: dict, model: torch.nn.Module, slice_dir, out: Path) -> Path:
    from .models import save_transformer_state_dict

    if any(p.dtype != torch.float32 for p in model.parameters()):
        model.to(torch.float32)  # base + delta in float32, rounded once below
    slice_adapter.load_adapter(model, slice_dir)
    slice_adapter.merge_adapters(model)
    dtypes = _stored_dtypes(source)
    state = {k: (v.to(dtypes[k]) if dtypes.get(k) else v) for k, v in merged_state_dict(model).items()}
    meta = {k: v for k, v in (source.get("metadata") or {}).items() if k != "format"}
    # the ledger the streaming merge writes (the base's records, then this slice's), so stacking on this output
    # sees every slice and concept in it
    meta[ledger.LEDGER_KEY] = ledger.encode_records(ledger.merged_records(source.get("metadata"), [slice_dir]))
    save_transformer_state_dict(state, out, source.get("key_format", "diffusers"), source.get("prefix", ""), meta)
    if source.get("kind") != "single_file":
        model.save_config(out.parent)
    return out
