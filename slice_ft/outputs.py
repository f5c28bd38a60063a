"""Final outputs of a run: the slice (`output_dir/slice/`) and, on request, the merged transformer
(`output_dir/merged/`) in the key format of the input.

- pipeline folder input (or `tiny`): `merged/` is a diffusers transformer folder (`config.json` +
  `diffusion_pytorch_model.safetensors`, diffusers keys), loadable with `WanTransformer3DModel.from_pretrained` and
  usable as `--transformer_file merged/diffusion_pytorch_model.safetensors` to stack another slice;
- `--transformer_file X.safetensors` input: `merged/X.safetensors`, with X's own keys and prefix (original Wan /
  ComfyUI or diffusers) and X's per-tensor dtypes.

The merge always starts from the base on disk (never from a bf16/fp8 training copy): `slice_adapter.files.merge`
streams it one tensor at a time; without a base file (`tiny`), the base is rebuilt, written to a temp file and streamed
from there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

import slice_adapter
from slice_adapter.files import ledger

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
    from slice_adapter.files.report import format_bytes
    from slice_adapter.files.safetensors_stream import open_checkpoint

    base = merge_base_path(source)
    if base is not None:
        need = sum(e.nbytes for e in open_checkpoint(base).entries.values())
    else:  # tiny: rebuilt and written in float32 to a temp base file, then merged beside it
        need = 2 * sum(p.numel() * 4 for p in (model.parameters() if model is not None else ()))
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
    """Write `output_dir/merged/` = base + slice in the base's key format; returns the weights file.

    One merge path: the streaming merge of `slice_adapter.merge`. A base that exists only in memory (`tiny`) is
    written to a temp file next to the output first (removed afterwards), and streamed from there."""
    from slice_adapter.files.merge import merge_slices

    out = merged_output_path(source, output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = merge_base_path(source)
    if base is not None:
        merge_slices(base, [Path(slice_dir)], out, overwrite=True, progress=progress)
        if base.is_dir():
            shutil.copy2(base / "config.json", out.parent / "config.json")
        return out
    if rebuild_base is None:
        raise ValueError("save_merged: no base checkpoint on disk and no rebuild_base; pass rebuild_base=")
    from .models import save_transformer_state_dict

    model = rebuild_base()
    temp_base = out.with_name(f".{out.stem}.base-{os.getpid()}.safetensors")
    meta = {k: v for k, v in (source.get("metadata") or {}).items() if k != "format"}
    try:
        save_transformer_state_dict(model.state_dict(), temp_base, source.get("key_format", "diffusers"),
                                    source.get("prefix", ""), meta)
        merge_slices(temp_base, [Path(slice_dir)], out, overwrite=True, progress=progress)
    finally:
        temp_base.unlink(missing_ok=True)
    if source.get("kind") != "single_file":
        model.save_config(out.parent)
    return out
