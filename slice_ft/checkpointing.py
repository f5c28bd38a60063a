"""Checkpoints with accelerate: `output_dir/checkpoint-N/` holds the slice (adapter layout, under `slice/`), the
optimizer, the lr scheduler, the RNG states and a `TrainingProgress` (step + every process's data position).

The frozen base is never written: a save hook replaces the model weights accelerate would save with the slice.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import slice_adapter
from slice_adapter.formats import values_key
from slice_adapter.io import read_adapter_values

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SLICE_SUBDIR = "slice"


# --- slice values -----------------------------------------------------------------------------------------------


def _value_params(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """{key in the adapter file: the live parameter} for every slice value of `adapter_name`."""
    marker = f".slice_values.{adapter_name}."
    out = {}
    for name, param in model.named_parameters():
        if marker in name:
            module, _, pname = name.partition(marker)
            out[values_key(module, pname)] = param
    return out


def load_slice_values(model: torch.nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy the values of an adapter folder into the slice already on `model` (same slice, exact values)."""
    values = read_adapter_values(folder)
    params = _value_params(model, adapter_name)
    missing, unexpected = sorted(set(params) - set(values)), sorted(set(values) - set(params))
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise ValueError(f"the slice in {str(folder)!r} is not the slice being trained ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, e.g. {first!r}): resume with the same --slice_fraction, "
                         "--slice_id, --slice_seed and model")
    with torch.no_grad():
        for key, param in params.items():
            if tuple(values[key].shape) != tuple(param.shape):
                raise ValueError(f"{key!r} has shape {tuple(values[key].shape)} in {str(folder)!r}, the slice being "
                                 f"trained needs {tuple(param.shape)}: resume with the same slice flags")
            param.copy_(values[key].to(param.device, param.dtype))


def register_slice_hooks(accelerator, model: torch.nn.Module) -> None:
    """Make `save_state`/`load_state` write and read the slice of `model` instead of the full model (diffusers'
    LoRA pattern).

    `model` is given explicitly: under FSDP2 the trainer shards it itself and accelerate never sees it (see
    `slice_ft.distributed`); its slice values are whole on every process, so the checkpoint is the single-process one.
    """

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            slice_adapter.save_adapter(accelerator.unwrap_model(model), Path(output_dir) / SLICE_SUBDIR)
        weights.clear()  # nothing else of the model goes to disk

    def load_model_hook(models, input_dir):
        models.clear()  # accelerate loads nothing else into the model
        load_slice_values(accelerator.unwrap_model(model), Path(input_dir) / SLICE_SUBDIR)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


# --- progress ---------------------------------------------------------------------------------------------------


class TrainingProgress:
    """Global step and each process's data position; registered with `accelerator.register_for_checkpointing`.

    accelerate writes a custom object from the main process only, so `state_dict` gathers every process's loader
    state (all processes call `save_state`) and `load_state_dict` hands each process its own.
    """

    def __init__(self, loader=None, *, process_index: int = 0, num_processes: int = 1,
                 gather: Optional[Callable[[list], list]] = None):
        self.global_step = 0
        self.loader = loader
        self.process_index = process_index
        self.num_processes = num_processes
        self._gather = gather or (lambda xs: xs)

    def _local_state(self) -> dict:
        if self.loader is None:
            return {}
        return {"loader": self.loader.state_dict(), "skipped": dict(self.loader.stats.skipped)}

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "num_processes": self.num_processes,
                "processes": self._gather([self._local_state()])}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_processes", 1) != self.num_processes:
            raise ValueError(
                f"the checkpoint was written by {state.get('num_processes')} process(es) and this run has "
                f"{self.num_processes}: each process resumes its own share of the data, so resume with "
                f"--num_processes {state.get('num_processes')}"
            )
        self.global_step = int(state["global_step"])
        mine = state["processes"][self.process_index]
        if self.loader is not None and mine:
            self.loader.load_state_dict(mine["loader"])
            self.loader.stats.skipped.update(mine.get("skipped", {}))


# --- folders ----------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders of `output_dir`, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | os.PathLike, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume: `latest` (None when there is none yet: a fresh start), or an explicit path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / resume_from_checkpoint).is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a folder; pass 'latest' or a "
                         f"checkpoint-N folder (found: {[p.name for p in list_checkpoints(output_dir)] or 'none'})")
    return path


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: Optional[int], logger: Any = None) -> list[Path]:
    """Delete the oldest checkpoints so that one more fits under `total_limit`; returns what was removed."""
    if not total_limit:
        return []
    found = list_checkpoints(output_dir)
    extra = len(found) - (total_limit - 1)
    removed = found[:max(0, extra)]
    for path in removed:
        if logger is not None:
            logger.info(f"removing old checkpoint {path} (--checkpoints_total_limit {total_limit})")
        shutil.rmtree(path, ignore_errors=True)
    return removed


def save_checkpoint(accelerator, output_dir: str | os.PathLike, global_step: int, total_limit: Optional[int] = None,
                    logger: Any = None) -> Path:
    """`accelerator.save_state` to `output_dir/checkpoint-<global_step>` (call it on every process)."""
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit, logger)
    accelerator.wait_for_everyone()
    path = Path(output_dir) / f"checkpoint-{global_step}"
    accelerator.save_state(str(path))
    if logger is not None:
        logger.info(f"saved checkpoint {path}")
    return path
