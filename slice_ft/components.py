"""The frozen Wan components a training run needs, from `tiny`, a diffusers pipeline folder or a single file.

`load_components` returns the transformer to train (the chosen Wan 2.2 expert, if any), the VAE, the UMT5 text
encoder and tokenizer, the scheduler (for validation), the pipeline's `boundary_ratio`/`expand_timesteps`, and
`source`: how the transformer was loaded, so the merged output can be written in the same format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .choices import TINY

# --expert names (musubi/Wan 2.2 speak) -> the pipeline component that expert is.
EXPERT_SUBFOLDERS = {"high": "transformer", "low": "transformer_2"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
TINY_EXPERT_SEEDS = {"transformer": 0, "transformer_2": 1}  # two different tiny experts
DEFAULT_TINY_BOUNDARY_RATIO = 0.875  # Wan 2.2 T2V A14B's value


@dataclass
class Components:
    transformer: torch.nn.Module
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    subfolder: str  # "transformer" or "transformer_2": which pipeline component is trained
    boundary_ratio: Optional[float] = None
    expand_timesteps: bool = False
    source: dict = field(default_factory=dict)  # models.load_transformer's source_info, or {"kind": "tiny", ...}
    identity: dict = field(default_factory=dict)  # strings naming the VAE/text encoder weights (cache keys)
    reload: Optional[Callable[[], torch.nn.Module]] = None  # the base transformer again, float32 (the merge base when none is on disk)


def _model_index(path: str) -> dict:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(
            f"{path!r} has no model_index.json: not a diffusers pipeline folder. Pass a pipeline folder (e.g. a local "
            f"copy of Wan-AI/Wan2.1-T2V-1.3B-Diffusers), 'tiny', or write one with scripts/make_tiny_wan.py DIR"
        )
    with open(index, encoding="utf-8") as fh:
        return json.load(fh)


def _weights_stamp(folder: str) -> str:
    """Identity of a component folder for cache keys: path plus the newest weight file's size and mtime."""
    stamps = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith((".safetensors", ".bin", ".json")):
            st = os.stat(os.path.join(folder, name))
            stamps.append(f"{name}:{st.st_size}:{int(st.st_mtime)}")
    return f"{os.path.abspath(folder)}|{';'.join(stamps)}"


def _is_i2v(config) -> bool:
    return bool(getattr(config, "image_dim", None)) or bool(getattr(config, "added_kv_proj_dim", None))


def expert_subfolder(expert: Optional[str]) -> str:
    if expert is None:
        return "transformer"
    if expert not in EXPERT_SUBFOLDERS:
        raise ValueError(f"--expert {expert!r} is unknown; use 'high' (transformer, t >= boundary) or 'low' "
                         "(transformer_2, t < boundary)")
    return EXPERT_SUBFOLDERS[expert]


def load_components(
    pretrained_model_name_or_path: str,
    *,
    transformer_file: Optional[str] = None,
    transformer_config: Optional[str] = None,
    expert: Optional[str] = None,
    boundary_ratio: Optional[float] = None,
    base_dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
) -> Components:
    """Load everything frozen (eval mode, `requires_grad=False`); the transformer on CPU in `base_dtype`."""
    sub = expert_subfolder(expert)
    if pretrained_model_name_or_path == TINY:
        comps = _load_tiny(sub, expert, transformer_file, transformer_config, boundary_ratio, base_dtype)
    else:
        comps = _load_pipeline(pretrained_model_name_or_path, sub, expert, transformer_file, transformer_config,
                               boundary_ratio, base_dtype, text_encoder_dtype, vae_dtype)
    check_compatible(comps)
    for module in (comps.transformer, comps.vae, comps.text_encoder):
        module.requires_grad_(False)
        module.eval()
    for module, dtype in ((comps.text_encoder, text_encoder_dtype), (comps.vae, vae_dtype)):
        if module.dtype != dtype:
            module.to(dtype)
    return comps


def _load_tiny(sub, expert, transformer_file, transformer_config, boundary_ratio, base_dtype) -> Components:
    from .tiny import TINY_TRANSFORMER_CONFIG, build_tiny_scheduler, build_tiny_text_encoder, build_tiny_transformer, build_tiny_vae

    text_encoder, tokenizer = build_tiny_text_encoder(0)
    seed = TINY_EXPERT_SEEDS[sub]
    config = transformer_config or dict(TINY_TRANSFORMER_CONFIG)
    if transformer_file:
        transformer, source = _load_file(None, sub, transformer_file, config, base_dtype)
        reload = lambda: _load_file(None, sub, transformer_file, config, torch.float32)[0]  # noqa: E731
    else:
        transformer = build_tiny_transformer(seed)
        if base_dtype != torch.float32:
            _cast_like_from_pretrained(transformer, base_dtype)
        source = {"kind": TINY, "seed": seed, "subfolder": sub, "key_format": "diffusers", "prefix": ""}
        reload = lambda: build_tiny_transformer(seed)  # noqa: E731
    ratio = None
    if expert is not None:
        ratio = boundary_ratio if boundary_ratio is not None else DEFAULT_TINY_BOUNDARY_RATIO
    return Components(
        transformer=transformer, vae=build_tiny_vae(0), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=build_tiny_scheduler(), subfolder=sub, boundary_ratio=ratio, source=source,
        identity={"vae": "tiny-wan-vae:seed=0", "text_encoder": "tiny-umt5:seed=0"}, reload=reload,
    )


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast to `dtype` except the modules diffusers keeps in float32 (`from_pretrained(torch_dtype=...)` does this)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, param in model.named_parameters():
        if not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)


def _load_file(root, sub, transformer_file, transformer_config, base_dtype):
    from .models import load_transformer

    config = transformer_config
    if isinstance(config, str) and os.path.isfile(config):
        # a config.json file: load_transformer takes its folder
        config = os.path.dirname(os.path.abspath(config)) or "."
    try:
        return load_transformer(root, subfolder=sub, transformer_file=transformer_file, config=config,
                                torch_dtype=base_dtype)
    except ValueError as err:
        raise ValueError(f"--transformer_file: {err}") from None


def _load_pipeline(path, sub, expert, transformer_file, transformer_config, boundary_ratio, base_dtype,
                   text_encoder_dtype, vae_dtype) -> Components:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not os.path.isdir(path):
        raise ValueError(
            f"--pretrained_model_name_or_path {path!r} is not a local folder; training runs offline: download the "
            f"diffusers pipeline first (e.g. `hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR`) or use 'tiny'"
        )
    index = _model_index(path)
    has_two = index.get("transformer_2") not in (None, [None, None])
    if has_two and expert is None and not transformer_file:
        raise ValueError(f"{path!r} is a Wan 2.2 A14B pipeline with two experts; pass --expert high (transformer) or "
                         "--expert low (transformer_2)")
    if expert is not None and sub == "transformer_2" and not has_two and not transformer_file:
        raise ValueError(f"--expert low trains transformer_2, but {path!r} has none (model_index.json); use a Wan 2.2 "
                         "A14B pipeline or drop --expert")
    ratio = boundary_ratio if boundary_ratio is not None else index.get("boundary_ratio")
    if expert is not None and ratio is None:
        raise ValueError(f"--expert needs the pipeline's boundary_ratio, and {path!r}/model_index.json has none; "
                         "pass --boundary_ratio (0.875 for Wan 2.2 T2V A14B, 0.9 for I2V)")
    from .models import load_transformer

    if transformer_file:
        transformer, source = _load_file(path, sub, transformer_file, transformer_config, base_dtype)
        reload = lambda: _load_file(path, sub, transformer_file, transformer_config, torch.float32)[0]  # noqa: E731
    else:
        transformer, source = load_transformer(path, subfolder=sub, torch_dtype=base_dtype)
        reload = lambda: load_transformer(path, subfolder=sub, torch_dtype=torch.float32)[0]  # noqa: E731
    import diffusers

    sched_name = (index.get("scheduler") or [None, None])[1]
    sched_cls = getattr(diffusers, str(sched_name), None) or UniPCMultistepScheduler
    return Components(
        transformer=transformer,
        vae=AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype),
        text_encoder=UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=text_encoder_dtype),
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
        scheduler=sched_cls.from_pretrained(path, subfolder="scheduler"),
        subfolder=sub,
        boundary_ratio=ratio if expert is not None else None,
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        source=source,
        identity={"vae": _weights_stamp(os.path.join(path, "vae")),
                  "text_encoder": _weights_stamp(os.path.join(path, "text_encoder"))},
        reload=reload,
    )


def check_compatible(comps: Components) -> None:
    """Fail early, naming both numbers, when the transformer cannot take this VAE's latents or this text encoder."""
    cfg = comps.transformer.config
    z_dim = comps.vae.config.z_dim
    if _is_i2v(cfg) or cfg.in_channels == 2 * z_dim + 4:  # noise + mask + image latents
        raise ValueError("this is an image-to-video Wan transformer (image conditioning inputs); slice-ft trains "
                         "text-to-video models (Wan 2.1 T2V, Wan 2.2 T2V A14B, TI2V-5B): pass a T2V checkpoint")
    if cfg.in_channels != z_dim:
        raise ValueError(f"the transformer takes {cfg.in_channels} latent channels but the VAE makes "
                         f"{z_dim}; use the VAE of the same model (TI2V-5B: the 48-channel Wan 2.2 VAE)")
    text_dim = getattr(comps.text_encoder.config, "d_model", None)
    if text_dim is not None and text_dim != cfg.text_dim:
        raise ValueError(f"the transformer takes {cfg.text_dim}-dim text embeddings but the text encoder makes "
                         f"{text_dim}; use the UMT5 encoder of the same model")


def spatial_multiple(comps: Components) -> int:
    """Bucket sizes must be multiples of this: VAE spatial compression times the transformer's patch size."""
    patch = comps.transformer.config.patch_size
    return int(comps.vae.config.scale_factor_spatial) * int(max(patch[1], patch[2]))
