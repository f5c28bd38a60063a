"""Checkpoints with accelerate: `output_dir/checkpoint-N/` holds the slice (adapter layout, under `slice/`), the
optimizer, the lr scheduler, the RNG states and a `TrainingProgress` (step + every process's data position).

The frozen base is never written: a save hook replaces the model weights accelerate would save with the slice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import slice_adapter
from slice_adapter.files.safetensors_stream import write_json_atomically
from slice_adapter.files.io import assign_values, read_adapter_values

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SLICE_SUBDIR = "slice"


# --- slice values -----------------------------------------------------------------------------------------------


def load_slice_values(model: torch.nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy the values of an adapter folder into the slice already on `model` (same slice, exact values)."""
    assign_values(model, adapter_name, read_adapter_values(folder), folder,
                  fix="it is not the slice being trained: resume with the same --ff, --ffid, --slice_seed and model")


def register_slice_hooks(accelerator, model: torch.nn.Module) -> None:
    """Make `save_state`/`load_state` write and read the slice of `model` instead of the full model (diffusers'
    LoRA pattern).

    `model` is given explicitly: under FSDP2 the trainer shards it itself and accelerate never sees it (see
    `slice_ft.distributed`); its slice values are whole on every process, so the checkpoint is the single-process one.
    """

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            slice_adapter.save_adapter(accelerator.unwrap_model(model), Path(output_dir) / SLICE_SUBDIR)
            _moment("slice_saved", Path(output_dir))
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
#
# A checkpoint is written into `checkpoint-N.partial/`, its files fsynced, and renamed to `checkpoint-N/` only when
# complete, so `checkpoint-N` never names a half-written save (a kill or a full disk leaves `.partial`, which the next
# run removes). Older checkpoints are pruned only after the new one is complete. Each checkpoint records the run's
# training settings in `run.json`: resuming another run's checkpoint is refused, and a fresh run moves an earlier
# run's checkpoints to `previous_runs/` instead of overwriting or pruning them.

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
RUN_FILE = "run.json"
PREVIOUS_RUNS_SUBDIR = "previous_runs"
# accelerate writes these last (the progress object after the RNG states): with them every earlier file is there
REQUIRED_FILES = ("random_states_0.pkl", "custom_checkpoint_0.pkl")

# Called with (moment, folder) at each step of `save_checkpoint` (tests kill the process there):
# "begin", "slice_saved", "state_saved", "synced", "renamed", "pruned".
on_save_moment: Optional[Callable[[str, Path], None]] = None


def _moment(name: str, folder: Path) -> None:
    if on_save_moment is not None:
        on_save_moment(name, Path(folder))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders of `output_dir`, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """Why `path` is not a usable checkpoint folder, or None: it is one."""
    path = Path(path)
    if not path.is_dir():
        return "is not a folder"
    if (path / "adapter_config.json").is_file():
        return ("is a slice folder (a run's final output, adapter_config.json + adapter_model.safetensors), not a "
                "checkpoint: pass a checkpoint-N folder of the run's OUTPUT_DIR, or 'latest'")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            if not any(path.iterdir()):
                return "is empty (a save that was interrupted)"
            return f"has no {name}: not a checkpoint, or a save that was interrupted"
    for file in path.rglob("*"):
        if file.is_file() and file.stat().st_size == 0:
            return f"has an empty {file.relative_to(path)} (a save that was interrupted)"
    if (path / SLICE_SUBDIR).is_dir() and not (path / SLICE_SUBDIR / "adapter_model.safetensors").is_file():
        return f"has no {SLICE_SUBDIR}/adapter_model.safetensors (a save that was interrupted)"
    return None


def read_run_settings(path: str | os.PathLike) -> Optional[dict]:
    """The training settings a checkpoint recorded (None: written before slice-ft recorded them)."""
    file = Path(path) / RUN_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_differences(recorded: Optional[dict], current: Optional[dict]) -> list[str]:
    """`--flag: checkpoint value -> this run's value` for every training setting that differs."""
    if recorded is None or current is None:
        return []
    missing = object()
    out = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, missing), current.get(key, missing)
        if old != new:
            show = lambda v: "(not recorded)" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"--{key}: {show(old)} in the checkpoint, {show(new)} now")
    return out


def _mismatch_error(path: Path, differences: list[str]) -> ValueError:
    return ValueError(
        f"{str(path)!r} was written by a run with other training settings ({'; '.join(differences)}): resuming it "
        "would continue another run. Pass the same settings, use another --output_dir for a new run, or add "
        "--force_resume to continue it with the new settings")


def resolve_resume(output_dir: str | os.PathLike, resume_from_checkpoint: Optional[str], run: Optional[dict] = None,
                   force: bool = False, logger: Any = None) -> Optional[Path]:
    """The checkpoint to resume, or None (a fresh start).

    'latest': the newest complete checkpoint of this run in `output_dir` (incomplete ones are logged and skipped; None
    when there is none). An explicit folder must be a complete checkpoint. A checkpoint whose recorded settings differ
    from `run` is refused naming the differences, unless `force`.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        other = None
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem:
                _log(logger, "warning", f"skipping {path}: it {problem}")
                continue
            differences = run_differences(read_run_settings(path), run)
            if differences and not force:
                _log(logger, "warning", f"skipping {path}: written by a run with other settings "
                                        f"({'; '.join(differences)})")
                other = other or (path, differences)
                continue
            if differences:
                _log(logger, "warning", f"--force_resume: resuming {path} despite other settings "
                                        f"({'; '.join(differences)})")
            return path
        if other is not None:
            raise _mismatch_error(*other)
        return None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / resume_from_checkpoint).is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    problem = checkpoint_problem(path)
    if problem:
        found = [p.name for p in list_checkpoints(output_dir) if not checkpoint_problem(p)]
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} {problem}; pass 'latest' or a "
                         f"checkpoint-N folder (complete ones in {str(output_dir)!r}: {found or 'none'})")
    differences = run_differences(read_run_settings(path), run)
    if differences and not force:
        raise _mismatch_error(path, differences)
    if differences:
        _log(logger, "warning", f"--force_resume: resuming {path} despite other settings ({'; '.join(differences)})")
    return path


def remove_interrupted_saves(output_dir: str | os.PathLike, logger: Any = None) -> list[Path]:
    """Delete the `checkpoint-N.partial` folders interrupted saves left (never a usable checkpoint)."""
    root = Path(output_dir)
    removed = []
    for path in sorted(root.glob(f"checkpoint-*{PARTIAL_SUFFIX}")) if root.is_dir() else []:
        _log(logger, "info", f"removing {path}: a checkpoint save that was interrupted (kill or full disk)")
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def set_aside_earlier_run(output_dir: str | os.PathLike, logger: Any = None) -> Optional[Path]:
    """A fresh run in a folder holding checkpoints: move them to `previous_runs/<time>/` (nothing is deleted)."""
    found = list_checkpoints(output_dir) + sorted(Path(output_dir).glob(f"checkpoint-*{REPLACED_SUFFIX}"))
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = Path(output_dir) / PREVIOUS_RUNS_SUBDIR / stamp
    n = 1
    while target.exists():
        n += 1
        target = Path(output_dir) / PREVIOUS_RUNS_SUBDIR / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in found:
        os.replace(path, target / path.name)
    _log(logger, "warning", f"this run starts fresh (no --resume_from_checkpoint): moved the {len(found)} "
                            f"checkpoint(s) of an earlier run in {str(output_dir)!r} to {str(target)!r}")
    return target


def claim_output_dir(output_dir: str | os.PathLike, fresh: bool, logger: Any = None) -> None:
    """Before a run's first step (main process): drop interrupted saves; a fresh run sets earlier checkpoints aside."""
    remove_interrupted_saves(output_dir, logger)
    if fresh:
        set_aside_earlier_run(output_dir, logger)


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: Optional[int], logger: Any = None) -> list[Path]:
    """Delete the oldest checkpoints beyond the newest `total_limit` (call it once a new one is complete)."""
    if not total_limit:
        return []
    found = list_checkpoints(output_dir)
    removed = found[:max(0, len(found) - total_limit)]
    for path in removed:
        _log(logger, "info", f"removing old checkpoint {path} (--checkpoints_total_limit {total_limit})")
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk, so a rename after it publishes complete data."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _log(logger: Any, level: str, message: str) -> None:
    if logger is not None:
        getattr(logger, level)(message)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, global_step: int, total_limit: Optional[int] = None,
                    logger: Any = None, run: Optional[dict] = None) -> Path:
    """`accelerator.save_state` to `output_dir/checkpoint-<global_step>`, crash-safe (call it on every process).

    Written into `checkpoint-N.partial`, fsynced and renamed; then older checkpoints beyond `total_limit` are
    pruned. Any failure (a full disk) removes the partial folder and leaves the earlier checkpoints as they were.
    """
    path = Path(output_dir) / f"checkpoint-{global_step}"
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            _moment("begin", partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        _moment("state_saved", partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomically(partial / RUN_FILE, {"settings": run, "global_step": global_step})
            _fsync_tree(partial)
            _moment("synced", partial)
            replaced = path.with_name(path.name + REPLACED_SUFFIX)
            if path.exists():  # a resumed run saving a step again: the new save wins
                os.replace(path, replaced)
            os.replace(partial, path)
            _fsync_dir(path.parent)
            shutil.rmtree(replaced, ignore_errors=True)
            _moment("renamed", path)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit, logger)
        _moment("pruned", path)
    accelerator.wait_for_everyone()
    _log(logger, "info", f"saved checkpoint {path}")
    return path
