"""On-disk parameter names of a Wan transformer: diffusers' `WanTransformer3DModel` vs original Wan / ComfyUI.

Pure name mapping (no torch, no diffusers import). The two formats store the same tensors with the same
shapes (e.g. `blocks.N.modulation` and `scale_shift_table` are both (1, 6, dim), `head.modulation` is (1, 2, dim)),
so converting a state dict only renames keys; no tensor is reshaped, split or transposed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

KEY_FORMATS = ("diffusers", "wan")
# Longest first: "model.diffusion_model." (ComfyUI full checkpoints) contains "diffusion_model." (LoRA-style files).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")

# Mirrors TRANSFORMER_KEYS_RENAME_DICT of diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers
# (plus `img_emb.emb_pos` from diffusers' scripts/convert_wan_to_diffusers.py for FLF2V); that table is a local
# variable applied as ordered substring replaces (not importable, not invertible), so it is restated here as exact
# per-module pairs (diffusers, wan). Tests check this agrees with diffusers' own converter on every Wan config.
_TOP_MODULES = (
    ("patch_embedding", "patch_embedding"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("proj_out", "head.head"),
)
# Bare nn.Parameters (no .weight/.bias leaf).
_TOP_PARAMS = (
    ("scale_shift_table", "head.modulation"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
)
_ATTN_MODULES = (
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "o"),
    ("norm_q", "norm_q"),
    ("norm_k", "norm_k"),
)
_I2V_MODULES = (("add_k_proj", "k_img"), ("add_v_proj", "v_img"), ("norm_added_k", "norm_k_img"))
_BLOCK_MODULES = (
    *((f"attn1.{d}", f"self_attn.{w}") for d, w in _ATTN_MODULES),
    *((f"attn2.{d}", f"cross_attn.{w}") for d, w in _ATTN_MODULES + _I2V_MODULES),
    # The affine cross-attn norm: diffusers norm2 == Wan norm3 (the other norms have no parameters).
    ("norm2", "norm3"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
)
_BLOCK_PARAMS = (("scale_shift_table", "modulation"),)
_LEAVES = ("weight", "bias")


def _tables():
    d2w_top = {f"{d}.{leaf}": f"{w}.{leaf}" for d, w in _TOP_MODULES for leaf in _LEAVES}
    d2w_top.update(_TOP_PARAMS)
    d2w_block = {f"{d}.{leaf}": f"{w}.{leaf}" for d, w in _BLOCK_MODULES for leaf in _LEAVES}
    d2w_block.update(_BLOCK_PARAMS)
    w2d_top = {w: d for d, w in d2w_top.items()}
    w2d_block = {w: d for d, w in d2w_block.items()}
    # A bijection only if no two names collide; fail at import rather than silently.
    assert len(w2d_top) == len(d2w_top) and len(w2d_block) == len(d2w_block)
    return {"diffusers": (d2w_top, d2w_block), "wan": (w2d_top, w2d_block)}


_TABLES = _tables()
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")
_TARGET = {"diffusers": "wan", "wan": "diffusers"}


def _convert(name: str, src: str) -> str | None:
    top, block = _TABLES[src]
    if name in top:
        return top[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in block:
        return f"blocks.{m.group(1)}.{block[m.group(2)]}"
    return None


def _not_a_param(name: str, src: str) -> ValueError:
    other = _TARGET[src]
    hint = (
        f" (it is a {other}-format name; use {other}_to_{src}() for it)" if _convert(name, other) is not None else ""
    )
    return ValueError(
        f"{name!r} is not a {src}-format WanTransformer3DModel parameter name{hint}; strip any "
        f"'model.diffusion_model.'/'diffusion_model.' prefix first (detect_key_format() finds it) and pass only "
        f"transformer parameters (no LoRA, VACE, Animate or quantization-scale keys)"
    )


def diffusers_to_wan(name: str) -> str:
    """diffusers parameter name -> original Wan name (no prefix), e.g. `blocks.0.attn1.to_q.weight` ->
    `blocks.0.self_attn.q.weight`."""
    out = _convert(name, "diffusers")
    if out is None:
        raise _not_a_param(name, "diffusers")
    return out


def wan_to_diffusers(name: str) -> str:
    """Original Wan name (no prefix) -> diffusers parameter name; the exact inverse of `diffusers_to_wan`."""
    out = _convert(name, "wan")
    if out is None:
        raise _not_a_param(name, "wan")
    return out


def _split_prefix(keys: list[str]) -> str:
    for prefix in PREFIXES[:-1]:
        with_prefix = [k for k in keys if k.startswith(prefix)]
        if with_prefix and len(with_prefix) != len(keys):
            stray = next(k for k in keys if not k.startswith(prefix))
            raise ValueError(
                f"state dict mixes prefixed and unprefixed keys: {with_prefix[0]!r} has prefix {prefix!r} but "
                f"{stray!r} does not; save the transformer alone, with one prefix for every key"
            )
        if with_prefix:
            return prefix
    return ""


def detect_key_format(keys: Iterable[str]) -> tuple[str, str]:
    """(`"diffusers"` or `"wan"`, prefix) of a transformer state dict's keys; prefix is one of `PREFIXES`.

    Keys valid in both formats only (just `patch_embedding.*`) count as diffusers unless prefixed.
    """
    keys = list(keys)
    if not keys:
        raise ValueError("detect_key_format: got no keys; pass the keys of a non-empty transformer state dict")
    prefix = _split_prefix(keys)
    names = [k[len(prefix):] for k in keys]
    bad = {src: [n for n in names if _convert(n, src) is None] for src in KEY_FORMATS}
    if not bad["diffusers"] and not bad["wan"]:
        return ("wan" if prefix else "diffusers"), prefix
    for fmt in KEY_FORMATS:
        if not bad[fmt]:
            return fmt, prefix
    neither = [n for n in bad["diffusers"] if n in set(bad["wan"])]
    if neither:
        shown = ", ".join(repr(prefix + n) for n in neither[:5])
        raise ValueError(
            f"{len(neither)} key(s) belong to neither the diffusers nor the original Wan transformer format, "
            f"e.g. {shown}; pass a WanTransformer3DModel state dict only (drop LoRA/VACE/quantization keys)"
        )
    raise ValueError(
        f"state dict mixes formats: {prefix + bad['wan'][0]!r} is a diffusers name but "
        f"{prefix + bad['diffusers'][0]!r} is an original Wan name; convert it to one format first"
    )


def _renamed(sd: Mapping, rename) -> dict:
    out: dict = {}
    for key, value in sd.items():
        new = rename(key)
        if new in out:
            raise ValueError(f"two keys map to {new!r} (the second is {key!r}); the state dict has duplicate entries")
        out[new] = value
    return out


def to_diffusers_state_dict(sd: Mapping) -> dict:
    """Any supported layout (either format, any of `PREFIXES`) -> diffusers names; values are not copied."""
    fmt, prefix = detect_key_format(sd.keys())
    if fmt == "diffusers":
        return _renamed(sd, lambda k: k[len(prefix):])
    return _renamed(sd, lambda k: wan_to_diffusers(k[len(prefix):]))


def from_diffusers_state_dict(sd: Mapping, fmt: str = "wan", prefix: str = "") -> dict:
    """diffusers names -> `fmt` names with `prefix` prepended (the layout `detect_key_format` reported)."""
    if fmt not in KEY_FORMATS:
        raise ValueError(f"key format {fmt!r} is not supported; use one of {KEY_FORMATS}")
    if prefix not in PREFIXES:
        raise ValueError(f"key prefix {prefix!r} is not supported; use one of {PREFIXES}")
    if fmt == "diffusers":
        for key in sd:  # validate: only real diffusers parameter names pass through
            diffusers_to_wan(key)
        return _renamed(sd, lambda k: prefix + k)
    return _renamed(sd, lambda k: prefix + diffusers_to_wan(k))
