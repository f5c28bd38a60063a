"""Test helpers for the checkpoint tools: tiny slices, base checkpoints in every key format, sharded folders,
synthetic checkpoints and slices built from shapes alone, and dense reference deltas."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import slice_adapter
from slice_adapter import SliceConfig
from slice_adapter.deltas import layouts_from_shapes, slice_deltas
from slice_adapter.formats import CONFIG_NAME, WEIGHTS_NAME, layout_record, values_key
from slice_adapter.keys import from_diffusers_state_dict
from slice_adapter.selection import plan_layouts
from slice_ft.tiny import build_tiny_transformer

REPO = Path(__file__).resolve().parents[1]
WAN_PREFIX = "model.diffusion_model."
# Every block parameter that is not an nn.Linear weight or bias: what diffusers cannot load from a LoRA file.
NON_LINEAR = ["norm_q", "norm_k", "norm2", "scale_shift_table"]


def tiny_state(seed: int = 0, **overrides) -> dict:
    """A tiny Wan transformer's diffusers state dict (contiguous copies)."""
    model = build_tiny_transformer(seed, **overrides)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def make_slice(folder, fraction, slice_id, seed: int = 0, model_seed: int = 0, model_overrides=None, **cfg) -> Path:
    """Save a slice with random deltas trained (notionally) on the tiny model `model_seed`."""
    model = build_tiny_transformer(model_seed, **(model_overrides or {}))
    model.add_adapter(SliceConfig(fraction=fraction, slice_id=slice_id, seed=seed, init_weights=False, **cfg))
    return slice_adapter.save_adapter(model, folder)


def save_base(state: dict, path, fmt: str = "diffusers", prefix: str = "", dtype=None, metadata=None) -> Path:
    """Write a diffusers state dict as a single safetensors file in key format `fmt` with `prefix`."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    save_file(from_diffusers_state_dict(sd, fmt, prefix), str(path), metadata=metadata or {"format": "pt"})
    return Path(path)


def save_sharded(state: dict, folder, shards: int = 3, config=None) -> Path:
    """A diffusers transformer folder with `shards` shards and its index, like `save_pretrained(max_shard_size=)`,
    and a config.json when `config` is given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **config}))
    return folder


def dense_deltas(slice_dir, shapes: dict) -> dict:
    """{diffusers name: dense float32 delta} of a slice, from its folder (the reference for merges)."""
    out = {}
    for name, (idx, values) in slice_deltas(slice_dir).items():
        d = torch.zeros(math.prod(shapes[name]), dtype=torch.float32)
        d[torch.from_numpy(idx)] = torch.from_numpy(values)
        out[name] = d.view(shapes[name])
    return out


def reference_merge(state: dict, slice_dirs, dtype=None) -> dict:
    """BASE + each slice's delta in turn, in float32, rounded once to `dtype` (default: each tensor's own)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    acc = {k: v.float() for k, v in state.items() if v.is_floating_point()}
    for d in slice_dirs:
        for name, delta in dense_deltas(d, shapes).items():
            acc[name] = acc[name] + delta
    out = {}
    for k, v in state.items():
        target = dtype if dtype is not None and v.is_floating_point() else v.dtype
        out[k] = acc[k].to(target) if k in acc else v.to(target)
    return out


def synthetic_shapes(config: dict) -> dict:
    """Diffusers parameter names and shapes of a WanTransformer3DModel config (meta device, no memory)."""
    from slice_adapter.wan_configs import build_meta_transformer

    return {k: tuple(v.shape) for k, v in build_meta_transformer(config).state_dict().items()}


def synthetic_checkpoint(path, shapes: dict, dtype=torch.float32, fmt="diffusers", prefix="", seed=0) -> Path:
    """Random tensors with the given diffusers shapes, written as one safetensors file in `fmt`."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    return save_base(sd, path, fmt, prefix)


def synthetic_slice(folder, shapes: dict, fraction, slice_id, seed=0, target_modules=None, exclude_modules=None,
                    value_seed=0, tile_order="banded") -> Path:
    """A slice folder made from shapes alone, following io's layout (config with layout record + values file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layouts = layouts_from_shapes(shapes, target_modules, exclude_modules)
    plan = plan_layouts(layouts, fraction, slice_id, seed, tile_order)
    g = torch.Generator().manual_seed(value_seed)
    values = {}
    for name, tiles in plan.tiles.items():
        lay = plan.layouts[name]
        module, _, pname = name.rpartition(".")
        if pname not in ("weight", "bias"):
            module += ".sliced_params"  # raw parameters are served by the owner's sliced_params child
        shape = (len(tiles), lay.tile_width) if lay.tiled_rows else (len(tiles),)
        values[values_key(module, pname)] = torch.randn(shape, generator=g) * 0.02
    save_file(values, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = SliceConfig(fraction=fraction, slice_id=slice_id, seed=seed, target_modules=target_modules,
                      exclude_modules=exclude_modules, layout=layout_record(layouts, tile_order), inference_mode=True)
    cfg.save_pretrained(str(folder))
    assert (folder / CONFIG_NAME).is_file()
    return folder


def run_script(name: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run scripts/<name> in a subprocess from the repo root."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


def cli(name: str):
    """A script's module (its `main(argv) -> exit code`), loaded from scripts/ without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cli_{name.removesuffix('.py')}", REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_bytes(path, key: str) -> bytes:
    """The raw bytes of one tensor of a safetensors file (for bit-identity checks)."""
    from slice_adapter.checkpoint import read_header

    entry = read_header(path)[0][key]
    with open(path, "rb") as f:
        f.seek(entry.start)
        return f.read(entry.nbytes)


def files_in(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


def load(path) -> dict:
    return load_file(str(path))
