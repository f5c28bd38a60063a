"""Exports of a slice for other tools: LoRA files that ComfyUI, Wan2GP, musubi-tuner and diffusers apply exactly.
(Wan2GP finetune definitions for merged checkpoints are in `wan2gp`, re-exported here.)

LoRA. A slice on an `nn.Linear` weight changes whole row tiles, so its delta D (out x in) is exactly B @ A with
  B (lora_B / lora_up, out x r): a one-hot selector of the r touched rows,
  A (lora_A / lora_down, r x in): those rows of D (zeros outside the selected tiles),
and alpha = r, so every loader's scale alpha / r is 1. Other deltas (norm weights, biases, convolutions) are written
as `.diff` / `.diff_b` keys where the program reads them.

What each program applies (read from their loaders; `CLIENTS` below, tests/test_export_clients.py measures it):
- ComfyUI (`comfy`): LoRA pairs, `.diff`, `.diff_b` on every leaf module. Not the raw parameters of a module with
  children (`blocks.N.modulation` = `scale_shift_table`, `head.modulation`, `img_emb.emb_pos`): its model patcher only
  patches leaf modules, so such a patch is registered and silently never applied.
- Wan2GP (`wan2gp`, loaded by mmgp): the same keys; its Wan LoRA preprocessing deletes every `*modulation.diff` key.
- musubi-tuner (`musubi`): `lora_unet_<original name with _>.lora_down/.lora_up/.alpha` pairs of the Linear weights
  in the blocks (its merge-on-load and `networks/lora_wan.py` read nothing else).
- diffusers (`diffusers`, `WanPipeline.load_lora_weights`): LoRA pairs and Linear bias deltas (`lora_B.bias`); its
  Wan converter drops norm `.diff` keys and ignores the others (modulation, patch embedding).
Before writing, the export compares the slice with what the named program applies and refuses a lossy file (naming
the parameters, their count and the largest delta left out) unless `allow_lossy=True`; the file's metadata records
what was left out (`slice_ft.dropped`). `SliceConfig(lossless_for=...)` trains slices every such file carries.

diffusers quirks handled in the comfy/wan2gp/diffusers layouts: once any `lora_B.bias` exists it enables LoRA bias on
every LoRA module, so every Linear module gets both a pair and a bias delta (zero rank-1 pairs / zero bias deltas as
padding); its converter takes the I2V image projections (k_img, v_img) only when both appear, so a missing one gets
a zero entry; it fails on `.alpha` keys outside the blocks, so those are left out (no alpha means scale 1).

Size: r is the number of touched rows, so the file holds about r x (in + out) numbers per module, far more than the
slice itself (at small fractions nearly every selected tile is in its own row). Merge instead when size matters.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .safetensors_stream import StreamWriter, dtype_label, parse_dtype, refuse_overwriting_inputs
from .deltas import SliceDeltas, read_slice
from .adapter_folder import slice_files
from .keys import diffusers_to_wan
from .wan2gp import (PHASES, TWO_EXPERT, WAN2GP_ARCHITECTURES, WAN2GP_CHOICES, WAN2GP_DEFAULT_SETTINGS,  # noqa: F401
                     WAN2GP_MODEL_ALIASES, check_wan2gp_filename, infer_wan2gp_architecture, matching_models,
                     suggest_wan2gp_filename, wan2gp_definition, write_wan2gp_definition)

COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
MUSUBI_PREFIX = "lora_unet_"


# ---------------------------------------------------------------------------------------------------------------
# What each program applies from a LoRA file
# ---------------------------------------------------------------------------------------------------------------
def delta_kind(name: str, tiled_rows: bool) -> str:
    """The kind of a Wan parameter's delta, as the LoRA loaders tell them apart: `linear_weight`, `linear_bias`,
    `norm` (norm weights and biases), `conv` (patch embedding) or `raw` (a parameter held directly by a module with
    children: `scale_shift_table`, the image embedder's `pos_embed`)."""
    module, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return "raw"
    if "norm" in module.rpartition(".")[2]:
        return "norm"
    if module.endswith("patch_embedding"):
        return "conv"
    if leaf == "weight":
        return "linear_weight" if tiled_rows else "norm"
    return "linear_bias"


@dataclass(frozen=True)
class Client:
    """A program users load LoRA files into: which kinds of deltas it applies, and why not the others."""

    program: str
    carries: frozenset
    why_not: str
    blocks_only: bool = False  # applies only parameters inside `blocks.<i>.`

    def drops(self, name: str, tiled_rows: bool) -> bool:
        if self.blocks_only and not name.startswith("blocks."):
            return True
        return delta_kind(name, tiled_rows) not in self.carries


CLIENTS = {
    "comfy": Client("ComfyUI", frozenset({"linear_weight", "linear_bias", "norm", "conv"}),
                    "ComfyUI patches only parameters of leaf modules (comfy/model_patcher.py skips a module with "
                    "children), so a .diff for a raw parameter such as blocks.N.modulation is never applied"),
    "wan2gp": Client("Wan2GP", frozenset({"linear_weight", "linear_bias", "norm", "conv"}),
                     "Wan2GP's Wan LoRA preprocessing deletes every *modulation.diff key, and mmgp patches modules, "
                     "not raw parameters"),
    "musubi": Client("musubi-tuner", frozenset({"linear_weight"}),
                     "musubi-tuner's Wan LoRA loading reads only lora_down/lora_up pairs of the blocks' Linear weights "
                     "(no bias, norm, modulation or top-level deltas)", blocks_only=True),
    "diffusers": Client("diffusers", frozenset({"linear_weight", "linear_bias"}),
                        "diffusers' Wan LoRA converter drops norm .diff keys and ignores the other .diff keys "
                        "(modulation, patch embedding)"),
}
LORA_FORMATS = tuple(CLIENTS)


# ---------------------------------------------------------------------------------------------------------------
# LoRA export
# ---------------------------------------------------------------------------------------------------------------
def _touched_rows(slice_: SliceDeltas, name: str) -> torch.Tensor:
    """Sorted rows of a Linear weight that hold at least one selected tile: the LoRA rank is their count."""
    return torch.unique(torch.from_numpy(slice_.plan.tiles[name]) // slice_.layouts[name].segments_per_row)


def _down_matrix(slice_: SliceDeltas, name: str, values: torch.Tensor) -> torch.Tensor:
    """The touched rows of a Linear weight's delta, dense (rows x in), zeros outside the selected tiles."""
    lay = slice_.layouts[name]
    tiles = torch.from_numpy(slice_.plan.tiles[name])
    rows, seg = tiles // lay.segments_per_row, tiles % lay.segments_per_row
    uniq, slot = torch.unique(rows, return_inverse=True)
    down = torch.zeros(len(uniq), lay.segments_per_row, lay.tile_width, dtype=torch.float32)
    down[slot, seg] = values.view(-1, lay.tile_width)
    return down.view(len(uniq), lay.shape[1])


def _dense(shape, idx: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(math.prod(shape), dtype=torch.float32)
    out[torch.from_numpy(idx)] = values
    return out.view(tuple(shape))


def _comfy_base(diffusers_name: str) -> str:
    """ComfyUI key stem of a parameter: the original Wan name, prefixed, without `.weight`/`.bias`."""
    wan = diffusers_to_wan(diffusers_name)
    return COMFY_PREFIX + re.sub(r"\.(weight|bias)$", "", wan)


def _musubi_base(diffusers_name: str) -> str:
    """musubi-tuner's LoRA module name: `lora_unet_` + the original Wan module name with `.` -> `_`."""
    return MUSUBI_PREFIX + re.sub(r"\.(weight|bias)$", "", diffusers_to_wan(diffusers_name)).replace(".", "_")


@dataclass
class _LoraLayout:
    """How a slice's deltas map onto LoRA modules and diff keys."""

    linear: dict[str, tuple[int, int]]  # Linear module -> (out, in), from its recorded weight
    pairs: set[str]  # Linear modules with a weight delta
    biases: set[str]  # Linear modules with a bias delta
    diffs: list[str]  # every other delta (norms, convolutions, biases of untargeted weights)
    warnings: list[str]
    padding: set[str] = field(default_factory=set)  # Linear modules with no delta that get zero LoRA entries

    @property
    def modules(self) -> list[str]:
        return sorted(self.pairs | self.biases | self.padding)

    @property
    def with_bias(self) -> bool:  # diffusers turns on lora_bias for every module once any bias delta exists
        return bool(self.biases)


def _lora_layout(slice_: SliceDeltas, names, pad_for_diffusers: bool) -> _LoraLayout:
    linear = {n.removesuffix(".weight"): tuple(l.shape) for n, l in slice_.layouts.items() if l.tiled_rows}
    out = _LoraLayout(linear, set(), set(), [], [])
    for name in names:
        module, _, leaf = name.rpartition(".")
        if slice_.layouts[name].tiled_rows:
            out.pairs.add(module)
        elif leaf == "bias" and module in linear:
            out.biases.add(module)
        else:
            out.diffs.append(name)
            if delta_kind(name, False) == "linear_bias":
                out.warnings.append(f"{name!r}: bias delta of a module whose weight the slice does not target; "
                                    "written as .diff_b (ComfyUI and Wan2GP apply it; diffusers may not load it)")
    if not pad_for_diffusers:
        return out
    # diffusers' Wan converter handles the image projections (k_img / v_img) only when both appear somewhere, and
    # fails on the leftover keys otherwise: give the missing one a zero entry (both have the same shape).
    image_kv = [m for m in out.modules if m.endswith((".attn2.add_k_proj", ".attn2.add_v_proj"))]
    kinds = {m.rpartition(".")[2] for m in image_kv}
    if len(kinds) == 1:
        have = image_kv[0]
        other = have[: -len("add_k_proj")] + ("add_v_proj" if have.endswith("add_k_proj") else "add_k_proj")
        out.linear[other] = out.linear[have]
        out.padding.add(other)
    return out


def lossless_check(slice_: SliceDeltas, format: str) -> dict:
    """What `format`'s program would not apply of a slice: {"parameters": [...], "count", "max_abs_delta",
    "reason"} (empty list when the export is lossless)."""
    client = CLIENTS[format]
    linear = {n.removesuffix(".weight") for n, lay in slice_.layouts.items() if lay.tiled_rows}

    def drops(n: str) -> bool:
        if client.drops(n, slice_.layouts[n].tiled_rows):
            return True
        # diffusers holds a bias delta only as lora_B.bias next to a pair, which needs the Linear's recorded weight
        return format == "diffusers" and delta_kind(n, False) == "linear_bias" and n.rpartition(".")[0] not in linear

    dropped = [n for n in slice_.plan.tiles if drops(n)]
    largest = 0.0
    if dropped:
        with slice_.open_values() as f:
            largest = max(float(np.abs(slice_.values(n, f)).max()) for n in dropped)
    return {"parameters": dropped, "count": len(dropped), "max_abs_delta": largest,
            "reason": client.why_not if dropped else ""}


def _lossy_error(slice_: SliceDeltas, format: str, check: dict) -> ValueError:
    kinds = Counter(delta_kind(n, slice_.layouts[n].tiled_rows) for n in check["parameters"])
    shown = ", ".join(check["parameters"][:6]) + (", ..." if check["count"] > 6 else "")
    return ValueError(
        f"--format {format}: {CLIENTS[format].program} would not apply {check['count']} of the slice's "
        f"{len(slice_.plan.tiles)} changed parameters ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}; "
        f"largest delta left out {check['max_abs_delta']:.4g}): {shown}. Why: {check['reason']}. Fix: merge "
        f"instead (scripts/merge_slices.py writes every delta and loads in every program), train the slice with "
        f"lossless_for={format!r} (--lossless_for {format}), or pass allow_lossy=True (--allow_lossy) to write the "
        "rest; the file then records what it left out")


def export_lora(slice_dir, output, format: str = "comfy", *, dtype=None, overwrite: bool = False,
                allow_lossy: bool = False) -> dict:
    """Write a slice as a LoRA safetensors file for one program. Returns a summary (keys, ranks, dropped deltas, bytes).

    `format="comfy"` / `"wan2gp"`: `diffusion_model.<original Wan name>.lora_A.weight` / `.lora_B.weight` / `.alpha`
    plus `.diff` / `.diff_b` (ComfyUI; Wan2GP; diffusers' Wan converter reads it too). `format="musubi"`:
    `lora_unet_<original name, _-joined>.lora_down.weight` / `.lora_up.weight` / `.alpha` (musubi-tuner's Wan LoRA).
    `format="diffusers"`: the keys `WanPipeline.save_lora_weights` writes, with LoRA config metadata.
    A slice with deltas the program does not apply raises a ValueError naming them (count, largest delta, fix),
    unless `allow_lossy=True`: then they are left out, listed in `dropped` and in the file's `slice_ft.dropped`
    metadata. `dtype`: fp32 (default, lossless), bf16 or fp16 (the one-hot up matrices stay exact; alpha is fp32).
    """
    if format not in CLIENTS:
        raise ValueError(f"format must be one of {LORA_FORMATS}, got {format!r}")
    out_dtype = parse_dtype(dtype) or torch.float32
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {str(output)!r}")
    if output.is_dir():
        raise ValueError(f"output {str(output)!r} is a directory: pass a file path ending in .safetensors")
    refuse_overwriting_inputs(output, slice_files(slice_dir))
    if output.exists() and not overwrite:
        raise ValueError(f"output {str(output)!r} already exists: pass overwrite=True (--overwrite) or another path")
    slice_ = read_slice(slice_dir)
    check = lossless_check(slice_, format)
    if check["count"] and not allow_lossy:
        raise _lossy_error(slice_, format, check)
    dropped = set(check["parameters"])
    kept = [n for n in slice_.plan.tiles if n not in dropped]
    musubi = format == "musubi"
    lora = _lora_layout(slice_, kept, pad_for_diffusers=not musubi)
    modules, has_pair, has_bias, with_bias = lora.modules, lora.pairs, lora.biases, lora.with_bias and not musubi

    # Ranks from the tiles alone (no values read yet), so the header can be planned before any data moves.
    rank: dict[str, int] = {}
    for module in modules:
        if module in has_pair:
            rank[module] = len(_touched_rows(slice_, module + ".weight"))
        else:
            rank[module] = 1  # padding: a zero rank-1 pair so the module loads with lora_bias on

    plan: list[tuple[str, torch.dtype, tuple]] = []
    producers = []  # (key, callable returning the tensor)
    ignored_by_diffusers = []
    values_cache: dict[str, torch.Tensor] = {}

    def values(name):
        if name not in values_cache:
            values_cache.clear()  # one parameter's values at a time
            values_cache[name] = torch.from_numpy(slice_.values(name))
        return values_cache[name]

    def add(key, shape, make, dt=None):
        plan.append((key, dt or out_dtype, tuple(shape)))
        producers.append((key, make))

    down_name, up_name = (".lora_down.weight", ".lora_up.weight") if musubi else (".lora_A.weight", ".lora_B.weight")
    for module in modules:
        (out_f, in_f), r = lora.linear[module], rank[module]
        wname = module + ".weight"
        stem = {"diffusers": DIFFUSERS_PREFIX + module, "musubi": _musubi_base(wname)}.get(format) or _comfy_base(wname)

        def make_down(wname=wname, module=module, in_f=in_f):
            if module not in has_pair:
                return torch.zeros(1, in_f)
            return _down_matrix(slice_, wname, values(wname))

        def make_up(wname=wname, module=module, out_f=out_f, r=r):
            up = torch.zeros(out_f, r)
            if module in has_pair:
                up[_touched_rows(slice_, wname), torch.arange(r)] = 1.0
            return up

        add(stem + down_name, (r, in_f), make_down)
        add(stem + up_name, (out_f, r), make_up)
        # diffusers' Wan converter chokes on alpha keys outside the blocks; alpha absent means scale 1 everywhere.
        # musubi's network loader needs an alpha for every module.
        if musubi or (format != "diffusers" and module.startswith("blocks.")):
            add(f"{stem}.alpha", (), lambda r=r: torch.tensor(float(r)), torch.float32)
        if module in has_bias or with_bias:
            bname = module + ".bias"
            bias_key = f"{stem}.lora_B.bias" if format == "diffusers" else f"{stem}.diff_b"

            def make_bias(bname=bname, module=module, out_f=out_f):
                if module not in has_bias:
                    return torch.zeros(out_f)
                return _dense((out_f,), slice_.indices(bname), values(bname))

            add(bias_key, (out_f,), make_bias)

    for name in lora.diffs:  # comfy / wan2gp only: the other formats' clients drop every diff (checked above)
        lay = slice_.layouts[name]
        wan = diffusers_to_wan(name)
        if wan.endswith(".weight"):
            key = COMFY_PREFIX + wan[: -len(".weight")] + ".diff"
        elif wan.endswith(".bias"):
            key = COMFY_PREFIX + wan[: -len(".bias")] + ".diff_b"
        else:
            raise AssertionError(f"{name!r}: no LoRA client applies a raw parameter; lossless_check drops it")
        ignored_by_diffusers.append(name)
        add(key, lay.shape, lambda name=name, lay=lay: _dense(lay.shape, slice_.indices(name), values(name)))

    if not plan:
        raise ValueError(f"slice {slice_.label}: nothing to export (no weights selected, or every delta is one "
                         f"{CLIENTS[format].program} does not apply)")
    order = sorted(range(len(plan)), key=lambda i: plan[i][0])
    plan = [plan[i] for i in order]
    producers = [producers[i] for i in order]

    metadata = {"format": "pt", "slice_ft.source_slice": json.dumps(slice_.provenance(), sort_keys=True),
                "slice_ft.client": CLIENTS[format].program,
                "slice_ft.dropped": json.dumps({k: check[k] for k in ("count", "max_abs_delta", "parameters")})}
    if format == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(_lora_config_metadata(rank, with_bias), sort_keys=True)
    if musubi:  # what musubi-tuner records about its own Wan LoRAs
        metadata.update({"ss_network_module": "networks.lora_wan", "ss_network_dim": str(max(rank.values())),
                         "ss_network_alpha": str(max(rank.values()))})
    with StreamWriter(output, plan, metadata) as writer:
        for (key, make), (_, dt, _) in zip(producers, plan):
            writer.write(key, make().to(dt))
        writer.commit()
    return {
        "output": str(output),
        "format": format,
        "dtype": dtype_label(out_dtype),
        "lora_modules": len(modules),
        "padded_modules": sorted(m for m in modules if m not in has_pair or (with_bias and m not in has_bias)),
        "ranks": {"min": min(rank.values(), default=0), "max": max(rank.values(), default=0),
                  "total": sum(rank.values())},
        "diff_keys": len(lora.diffs),
        "dropped": check["parameters"],
        "max_dropped_delta": check["max_abs_delta"],
        "ignored_by_diffusers": ignored_by_diffusers,
        "warnings": lora.warnings,
        "bytes": output.stat().st_size,
    }


def _lora_config_metadata(rank: dict[str, int], with_bias: bool) -> dict:
    """The LoraConfig diffusers rebuilds on load, with alpha = rank for every module (scale 1), prefixed as
    `save_lora_weights` writes it."""
    r = Counter(rank.values()).most_common(1)[0][0]
    pattern = {"^" + re.escape(m): v for m, v in rank.items() if v != r}
    config = {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(rank),
        "lora_bias": with_bias,
        "use_dora": False,
    }
    return {f"{DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}
