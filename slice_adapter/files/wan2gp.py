"""Wan2GP finetune definitions for merged checkpoints (Wan2GP's FINETUNES.md): which architecture id a checkpoint's
shapes call for, the file-name convention Wan2GP picks files by, and the definition JSON. Torch-free, like the merge
that writes them."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Optional

from . import dtypes
from .safetensors_stream import open_checkpoint, write_json_atomically

# Wan2GP architecture id (the ids its Wan handler's query_supported_types accepts) -> the published model
# (slice_adapter.wan_configs) whose shapes it has.
WAN2GP_ARCHITECTURES = {
    "t2v_1.3B": "wan2.1-t2v-1.3b",
    "t2v": "wan2.1-t2v-14b",
    "i2v": "wan2.1-i2v-14b",
    "t2v_2_2": "wan2.2-t2v-a14b",
    "i2v_2_2": "wan2.2-i2v-a14b",
    "ti2v_2_2": "wan2.2-ti2v-5b",
}
# Wan2GP model ids that are not architectures: `i2v_720p` is Wan2GP's defaults/i2v_720p.json, architecture `i2v`
# (a definition saying "architecture": "i2v_720p" is hidden: "unsupported architecture").
WAN2GP_MODEL_ALIASES = {"i2v_720p": "i2v"}
# Generation defaults each Wan2GP model's own definition sets (defaults/<id>.json, every key but "model").
WAN2GP_DEFAULT_SETTINGS = {
    "t2v_2_2": {"guidance_phases": 2, "switch_threshold": 875, "guidance_scale": 4, "guidance2_scale": 3,
                "flow_shift": 12},
    "i2v_2_2": {"guidance_phases": 2, "switch_threshold": 900, "guidance_scale": 3.5, "guidance2_scale": 3.5,
                "masking_strength": 0.1, "denoising_strength": 0.9, "flow_shift": 5},
    "ti2v_2_2": {"video_length": 121, "guidance_scale": 5, "flow_shift": 5, "num_inference_steps": 50,
                 "resolution": "1280x720"},
    "i2v_720p": {"resolution": "1280x720"},
}
# Two-expert models: Wan2GP's own definitions put the high-noise expert in URLs and the low-noise one in URLs2.
TWO_EXPERT = ("t2v_2_2", "i2v_2_2")
WAN2GP_CHOICES = (*WAN2GP_ARCHITECTURES, *WAN2GP_MODEL_ALIASES)


def _wan2gp_architecture(model_id: str) -> str:
    """The Wan2GP architecture of an id users may pass (an architecture, or a model id such as `i2v_720p`)."""
    if model_id in WAN2GP_MODEL_ALIASES:
        return WAN2GP_MODEL_ALIASES[model_id]
    if model_id not in WAN2GP_ARCHITECTURES:
        raise ValueError(f"unknown Wan2GP architecture {model_id!r}; supported: {', '.join(WAN2GP_CHOICES)}")
    return model_id
PHASES = ("high", "low")


def _signature(shapes: dict) -> Optional[tuple]:
    """What tells the published Wan transformers apart, from diffusers-named shapes."""
    pe = shapes.get("patch_embedding.weight")
    ffn = shapes.get("blocks.0.ffn.net.0.proj.weight")
    if pe is None or ffn is None:
        return None
    layers = len({n.split(".")[1] for n in shapes if n.startswith("blocks.")})
    has_image = any(n.startswith("condition_embedder.image_embedder.") for n in shapes)
    return (tuple(pe), tuple(ffn), layers, has_image)


def _config_signature(config: dict) -> tuple:
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    pe = (dim, config["in_channels"], *config["patch_size"])
    return (pe, (config["ffn_dim"], dim), config["num_layers"], config.get("image_dim") is not None)


def matching_models(shapes: dict) -> list[str]:
    """The published Wan models (wan_configs names) whose transformer has exactly these shapes' signature."""
    from ..wan_configs import WAN_CONFIGS

    sig = _signature(shapes)
    return [name for name, cfg in WAN_CONFIGS.items() if sig is not None and _config_signature(cfg) == sig]


def infer_wan2gp_architecture(shapes: dict, architecture: Optional[str] = None) -> str:
    """The Wan2GP architecture id of a checkpoint (diffusers-named shapes): checked if given, inferred where the
    shapes decide it, otherwise a ValueError saying which ids are possible."""
    models = matching_models(shapes)
    candidates = [a for a, m in WAN2GP_ARCHITECTURES.items() if m in models]
    if architecture is not None:
        base = _wan2gp_architecture(architecture)
        if models and base not in candidates:
            raise ValueError(f"Wan2GP architecture {architecture!r} needs {WAN2GP_ARCHITECTURES[base]} "
                             f"shapes, but the checkpoint has {' / '.join(models)} shapes: pass one of "
                             f"{', '.join(candidates)}")
        return architecture  # shapes of no published model (e.g. a test model): taken as given
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError("the checkpoint's shapes match no published Wan model, so its Wan2GP architecture cannot "
                         f"be inferred: pass wan2gp_architecture (--wan2gp_architecture), one of "
                         f"{', '.join(WAN2GP_CHOICES)}")
    note = " (a Wan 2.2 A14B expert has exactly the Wan 2.1 T2V-14B shapes)" if "t2v_2_2" in candidates else ""
    raise ValueError(f"the checkpoint has the shapes of {' and '.join(models)}{note}, so the Wan2GP architecture "
                     f"cannot be inferred: pass wan2gp_architecture (--wan2gp_architecture), one of "
                     f"{', '.join(repr(c) for c in candidates)}")


def suggest_wan2gp_filename(path, dtype_label_: str = "bf16") -> str:
    """A file name that follows Wan2GP's convention: lowercase `bf16`/`fp16` in the name, no `quanto`."""
    p = Path(path)
    stem = re.sub(r"(?i)[_\-.]?(bf16|fp16|fp32|f32|float32|float16|bfloat16|quanto)", "", p.stem) or "model"
    return str(p.with_name(f"{stem}_{dtype_label_}{p.suffix or '.safetensors'}"))


def check_wan2gp_filename(path, file_dtype: Optional[str] = None) -> None:
    """Refuse a merged file name that breaks Wan2GP's naming convention (it picks files by these tokens)."""
    name = Path(str(path)).name
    if file_dtype not in (None, "bf16", "fp16"):
        raise ValueError(f"Wan2GP expects 16-bit checkpoints (bf16 or fp16), this one is {file_dtype}: merge with "
                         "dtype='bf16' (--dtype bf16) or 'fp16'")
    if "quanto" in name.lower():
        suggestion = Path(suggest_wan2gp_filename(name, file_dtype or "bf16")).name
        raise ValueError(f"{name!r} contains 'quanto', which tells Wan2GP the file is quanto-quantized; a merged "
                         f"checkpoint is not: rename it, e.g. {suggestion!r}")
    tokens = [t for t in ("bf16", "fp16") if t in name]
    if not tokens:
        hint = " (Wan2GP needs them in lower case)" if re.search(r"(?i)bf16|fp16", name) else ""
        raise ValueError(f"Wan2GP picks files by a lowercase 'bf16' or 'fp16' in the file name{hint}; {name!r} has "
                         f"none: rename it, e.g. {Path(suggest_wan2gp_filename(name, file_dtype or 'bf16')).name!r}")
    if file_dtype is not None and file_dtype not in tokens:
        raise ValueError(f"{name!r} says {tokens[0]} but the file holds {file_dtype} weights: rename it, e.g. "
                         f"{Path(suggest_wan2gp_filename(name, file_dtype)).name!r}")


def _file_dtype(path) -> Optional[str]:
    """The dominant floating dtype of a safetensors file (by bytes), as bf16/fp16/fp32."""
    ckpt = open_checkpoint(path)
    counts: Counter = Counter()
    for e in ckpt.entries.values():
        if e.is_floating_point:
            counts[e.dtype] += e.nbytes
    return dtypes.label(counts.most_common(1)[0][0]) if counts else None


def wan2gp_definition(merged_file, *, architecture: str, phase: Optional[str] = None, name: str,
                      description: str = "", url: Optional[str] = None, auto_quantize: bool = True,
                      settings: Optional[dict] = None, file_dtype: Optional[str] = None) -> dict:
    """The finetune definition (a dict) for a merged checkpoint; see `write_wan2gp_definition`."""
    model_id, architecture = architecture, _wan2gp_architecture(architecture)
    two_expert = architecture in TWO_EXPERT
    if two_expert and phase not in PHASES:
        raise ValueError(f"Wan2GP architecture {architecture!r} has two experts (high-noise and low-noise): pass "
                         f"phase 'high' or 'low' (--wan2gp_phase) to say which one the merged file replaces, got "
                         f"{phase!r}")
    if not two_expert and phase is not None:
        raise ValueError(f"Wan2GP architecture {architecture!r} has a single transformer: phase must be None, got "
                         f"{phase!r}")
    if not name or not str(name).strip():
        raise ValueError("the Wan2GP definition needs a non-empty name (it is shown in Wan2GP's model list)")
    location = url or str(Path(merged_file).resolve())
    check_wan2gp_filename(location, file_dtype)
    model = {"name": name, "architecture": architecture, "description": description}
    if not two_expert:
        model["URLs"] = [location]
    elif phase == "high":
        model["URLs"], model["URLs2"] = [location], architecture  # the built-in low-noise expert
    else:
        model["URLs"], model["URLs2"] = architecture, [location]  # the built-in high-noise expert first
    model["auto_quantize"] = bool(auto_quantize)
    if architecture.endswith("_2_2"):
        model["group"] = "wan2_2"
    definition = {"model": model}
    definition.update(WAN2GP_DEFAULT_SETTINGS.get(model_id, {}))
    definition.update(settings or {})
    return definition


def write_wan2gp_definition(path, merged_file, *, architecture: str, phase: Optional[str] = None, name: str,
                            description: str = "", url: Optional[str] = None, auto_quantize: bool = True,
                            settings: Optional[dict] = None, overwrite: bool = False,
                            file_dtype: Optional[str] = None) -> dict:
    """Write a Wan2GP finetune definition (FINETUNES.md): a `model` subtree with `name`, `architecture`,
    `description`, `URLs` (the merged file's path, or `url` once uploaded), `auto_quantize`, plus generation
    defaults. For two-expert Wan 2.2 A14B models, `phase="low"` puts the file in `URLs2` behind the built-in
    high-noise expert (`"URLs": "<architecture>"`), `phase="high"` the other way round, as Wan2GP's own definitions
    do. The file name must carry lowercase `bf16`/`fp16` matching its weights. Save it in Wan2GP's `finetunes/`
    folder; its file name (without .json) is the model id. Returns the definition."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"the Wan2GP definition path must end in .json, got {str(path)!r}")
    if path.exists() and not overwrite:
        raise ValueError(f"{str(path)!r} already exists: pass overwrite=True (--overwrite) or another path")
    if file_dtype is None and Path(merged_file).is_file():
        file_dtype = _file_dtype(merged_file)
    definition = wan2gp_definition(merged_file, architecture=architecture, phase=phase, name=name,
                                   description=description, url=url, auto_quantize=auto_quantize,
                                   settings=settings, file_dtype=file_dtype)
    write_json_atomically(path, definition)
    return definition
