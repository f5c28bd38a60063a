"""Text and video encoding for Wan training, plus an on-disk cache of both (`--cache_dir`).

Encodings match what `WanPipeline` feeds the transformer at inference: UMT5 embeddings cut at the real token
length and zero-padded to `max_sequence_length`, and VAE latents normalised with the VAE config's
`latents_mean`/`latents_std` (the exact inverse of the pipeline's de-normalisation before `vae.decode`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

CACHE_FORMAT_VERSION = 2  # 2: frames resized by ImageOps.fit. Bump when what is stored (or how it is computed)
# changes: old files then miss
REQUIRED_SETTINGS: tuple[str, ...] = ("vae", "text_encoder", "max_sequence_length", "dtype")
_TEXT_SETTINGS = ("text_encoder", "max_sequence_length")  # the rest of the global settings go to the latents key


# --- encoders ---------------------------------------------------------------------------------------------------


def encode_prompts(
    text_encoder,
    tokenizer,
    prompts: str | list[str],
    max_sequence_length: int = 512,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, max_sequence_length, D) prompt embeddings, exactly as `WanPipeline.encode_prompt` makes them.

    Runs diffusers' own code path (a `WanPipeline` holding only the tokenizer and text encoder), so prompt
    cleaning, truncation, the cut at the real length and the zero padding cannot drift from inference.
    `dtype` defaults to the text encoder's dtype, `device` to the encoder's device.
    """
    from diffusers import WanPipeline

    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}; pass [''] for an empty caption")
    if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}; Wan uses 512")
    if device is None:
        device = next(text_encoder.parameters()).device
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
            device=torch.device(device),
            dtype=dtype,
        )
    return embeds


def _latents_stats(vae_config, device, dtype=torch.float32):
    z_dim = vae_config.z_dim
    mean = torch.tensor(vae_config.latents_mean, dtype=dtype, device=device).view(1, z_dim, 1, 1, 1)
    std = torch.tensor(vae_config.latents_std, dtype=dtype, device=device).view(1, z_dim, 1, 1, 1)
    return mean, std


def normalize_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """(z - mean) * (1 / std) in float32: undone by WanPipeline's `latents / (1 / std) + mean` before decoding."""
    mean, std = _latents_stats(vae_config, z.device)
    return (z.float() - mean) * (1.0 / std)


def encode_videos(vae, pixels: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised Wan latents (B, z_dim, 1 + (F-1)/4, H/8, W/8) of pixels (B, C, F, H, W) in [-1, 1].

    Uses the posterior's mode (its mean): deterministic, so a cached latent is the same every run and the key
    needs no seed; it is also what the original Wan VAE `encode` and musubi-tuner's latent caching return.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 5:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be a (B, C, F, H, W) tensor, got {shape}; add the batch dim with [None]")
    cfg = vae.config
    _, c, f, h, w = pixels.shape
    in_ch = getattr(cfg, "in_channels", 3)
    t_scale, s_scale = cfg.scale_factor_temporal, cfg.scale_factor_spatial
    if c != in_ch:
        raise ValueError(f"pixels have {c} channels, the VAE takes {in_ch}; pass RGB as (B, 3, F, H, W)")
    if (f - 1) % t_scale:
        raise ValueError(
            f"frame count {f} is not 1 + {t_scale}k, the VAE would drop the last {(f - 1) % t_scale} frame(s); "
            f"use e.g. {f - (f - 1) % t_scale} frames"
        )
    if h % s_scale or w % s_scale:
        raise ValueError(f"height x width {h}x{w} must be multiples of {s_scale}; resize to a bucket that is")
    lo, hi = pixels.aminmax()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"pixels span [{lo.item():.3g}, {hi.item():.3g}], expected [-1, 1]; use x / 127.5 - 1")
    param = next(vae.parameters())
    with torch.no_grad():
        z = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode()
    return normalize_latents(z, cfg).to(dtype)


def free_encoders(holder: MutableMapping | object, names: Iterable[str] = ("vae", "text_encoder", "tokenizer")):
    """Drop `holder`'s references to the named models, then diffusers' `free_memory()` (gc and the
    accelerator's cache).

    `holder` is a dict (entries popped, e.g. `build_tiny_components()`'s) or an object such as a pipeline
    (attributes set to None). Memory only comes back once no other reference exists: `del` your own locals too.
    Returns the names that were dropped.
    """
    dropped = []
    for name in names:
        if isinstance(holder, MutableMapping):
            if holder.pop(name, None) is not None:
                dropped.append(name)
        elif getattr(holder, name, None) is not None:
            setattr(holder, name, None)
            dropped.append(name)
    from diffusers.training_utils import free_memory

    free_memory()  # gc, then the accelerator's cache (CUDA, XPU, MPS, ...)
    return dropped


# --- cache ------------------------------------------------------------------------------------------------------


@dataclass
class CacheItem:
    """One training sample for `LatentCache.precompute`.

    pixels: (C, F, H, W) or (1, C, F, H, W) in [-1, 1], already resized to its bucket, or a zero-argument callable
    returning it (decoded only on a cache miss; then num_frames/height/width must be given).
    content_id: the data pipeline's sha1 of the media bytes.
    """

    content_id: str
    prompt: str
    pixels: torch.Tensor | Callable[[], torch.Tensor]
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None


def _as_item(item) -> CacheItem:
    if isinstance(item, CacheItem):
        out = item
    elif isinstance(item, Mapping):
        missing = [k for k in ("content_id", "prompt", "pixels") if k not in item]
        if missing:
            raise ValueError(f"cache item lacks {missing}; give content_id, prompt and pixels (got {sorted(item)})")
        out = CacheItem(**{k: item.get(k) for k in CacheItem.__dataclass_fields__})
    elif all(hasattr(item, a) for a in ("id", "caption", "pixel_values")):  # slice_ft.data.Item
        bucket = getattr(item, "bucket", None)  # its sizes; pixels are None when the loader skipped decoding
        sizes = (bucket.num_frames, bucket.height, bucket.width) if bucket is not None else ()
        out = CacheItem(item.id, item.caption, item.pixel_values, *sizes)
    else:
        raise ValueError(
            f"cache item must be a CacheItem, a mapping or a slice_ft.data.Item, got {type(item).__name__}"
        )
    if out.num_frames is None or out.height is None or out.width is None:
        if callable(out.pixels):
            raise ValueError(
                f"item {out.content_id!r} has lazy pixels but no num_frames/height/width; "
                "give them so the cache can be checked without decoding the video"
            )
        f, h, w = out.pixels.shape[-3:]
        out = CacheItem(out.content_id, out.prompt, out.pixels, f, h, w)
    return out


def _as_dtype(value) -> torch.dtype:
    dt = value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"cache dtype {value!r} is not a torch float dtype; use 'bfloat16', 'float16' or 'float32'")
    return dt


def _canonical(obj) -> str:
    # sort_keys + str fallback: the same settings always give the same key, whatever their order or type.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class LatentCache:
    """safetensors cache of VAE latents and prompt embeddings under `cache_dir`, reused across runs.

    settings: everything that changes the encodings; must name `vae` and `text_encoder` (identity strings, e.g.
    model path + revision), `max_sequence_length` and `dtype` (the stored dtype); any extra key is added to both
    keys. Latents are keyed by content_id, frame count, bucket height/width, VAE and dtype (+ extras); prompt
    embeddings by the prompt text, text encoder, max_sequence_length and dtype (+ extras), so editing a caption
    re-encodes only the text and identical captions share a file. Embeddings are stored cut at the last nonzero
    position and zero-padded back on load (lossless: the padding is zeros).
    Files are written to a temp file and renamed, so a crash never leaves a half file under the final name.
    Run `precompute` on one process (e.g. under `accelerator.main_process_first()`) before the others read.
    """

    def __init__(self, cache_dir: str | os.PathLike, settings: Mapping[str, Any]):
        missing = [k for k in REQUIRED_SETTINGS if k not in settings]
        if missing:
            raise ValueError(
                f"cache settings lack {missing} (got {sorted(settings)}); give e.g. vae='Wan-AI/Wan2.1-T2V-1.3B@main', "
                "text_encoder='...', max_sequence_length=512, dtype='bfloat16'"
            )
        self.dtype = _as_dtype(settings["dtype"])
        self.max_sequence_length = settings["max_sequence_length"]
        if not isinstance(self.max_sequence_length, int) or self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive int, got {self.max_sequence_length!r}")
        self.cache_dir = Path(cache_dir)
        self.settings = {k: (str(self.dtype) if k == "dtype" else v) for k, v in settings.items()}
        extras = {k: v for k, v in self.settings.items() if k not in REQUIRED_SETTINGS}
        self._text_settings = {k: self.settings[k] for k in (*_TEXT_SETTINGS, "dtype")} | extras
        self._latent_settings = {k: v for k, v in self.settings.items() if k not in _TEXT_SETTINGS}

    # keys and paths

    def _latents_key(self, content_id: str, num_frames: int, height: int, width: int) -> str:
        return _canonical(
            dict(kind="latents", format=CACHE_FORMAT_VERSION, content_id=str(content_id), num_frames=int(num_frames),
                 height=int(height), width=int(width), settings=self._latent_settings)
        )

    def _text_key(self, prompt: str) -> str:
        return _canonical(dict(kind="text", format=CACHE_FORMAT_VERSION, prompt=prompt, settings=self._text_settings))

    def _path(self, key: str) -> Path:
        kind = json.loads(key)["kind"]
        return self.cache_dir / kind / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def latents_path(self, content_id: str, *, num_frames: int, height: int, width: int) -> Path:
        return self._path(self._latents_key(content_id, num_frames, height, width))

    def text_path(self, prompt: str) -> Path:
        return self._path(self._text_key(prompt))

    # reading

    def _check(self, key: str, tensor_name: str) -> bool:
        """True if the file for `key` opens and is that key's; a corrupt one is warned about and removed."""
        path = self._path(key)
        if not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                ok = tensor_name in f.keys() and meta.get("key") == key
        except (SafetensorError, OSError) as err:
            self._discard(path, err)
            return False
        if not ok:
            self._discard(path, "tensor or key metadata missing or different")
        return ok

    def _load(self, key: str, tensor_name: str) -> torch.Tensor:
        path = self._path(key)
        if not path.exists():
            raise KeyError(f"not cached: {path} ({key}); run LatentCache.precompute over this item first")
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key or tensor_name not in f.keys():
                    raise SafetensorError("tensor or key metadata missing or different")
                # clone: the tensor would otherwise share the file's mmap (and change if the file is rewritten)
                return f.get_tensor(tensor_name).clone()
        except (SafetensorError, OSError) as err:
            self._discard(path, err)
            raise KeyError(f"cache file {path} was corrupt and is removed; run LatentCache.precompute again") from err

    @staticmethod
    def _discard(path: Path, err) -> None:
        warnings.warn(f"corrupt cache file {path} ({err}); removing it, it will be recomputed", RuntimeWarning)
        path.unlink(missing_ok=True)

    def has(self, content_id: str, prompt: str, *, num_frames: int, height: int, width: int) -> bool:
        """Both the latents and the prompt embeddings of this sample are cached and readable."""
        return self.has_latents(content_id, num_frames=num_frames, height=height, width=width) and self._check(
            self._text_key(prompt), "prompt_embeds"
        )

    def has_latents(self, content_id: str, *, num_frames: int, height: int, width: int) -> bool:
        """The latents of this media at this bucket size are cached and readable (what decoding would produce)."""
        return self._check(self._latents_key(content_id, num_frames, height, width), "latents")

    def get_latents(self, content_id: str, *, num_frames: int, height: int, width: int) -> torch.Tensor:
        """(z_dim, F', H', W') normalised latents in the cache dtype; KeyError if missing or corrupt."""
        return self._load(self._latents_key(content_id, num_frames, height, width), "latents")

    def get_prompt_embeds(self, prompt: str) -> torch.Tensor:
        """(max_sequence_length, D) embeddings, zero past the real length; KeyError if missing or corrupt."""
        cut = self._load(self._text_key(prompt), "prompt_embeds")
        return torch.cat([cut, cut.new_zeros(self.max_sequence_length - cut.shape[0], cut.shape[1])])

    def get(self, content_id: str, prompt: str, *, num_frames: int, height: int, width: int) -> dict:
        """{'latents': (z_dim, F', H', W'), 'prompt_embeds': (max_sequence_length, D)} for one sample."""
        return {
            "latents": self.get_latents(content_id, num_frames=num_frames, height=height, width=width),
            "prompt_embeds": self.get_prompt_embeds(prompt),
        }

    # writing

    def _write(self, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = safetensors_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"key": key})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def precompute(
        self,
        items: Iterable[Any],
        vae,
        text_encoder,
        tokenizer,
        *,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> dict[str, int]:
        """Encode whatever is not cached yet; returns counts {latents,text}_{computed,reused}.

        items: `CacheItem`s, mappings with its field names, or `slice_ft.data.Item`s (id, caption, pixel_values).

        `device` is where the text encoder runs (default: its own); the VAE runs where it lives.
        """
        counts = dict(latents_computed=0, latents_reused=0, text_computed=0, text_reused=0)
        total = len(items) if hasattr(items, "__len__") else None
        for raw in tqdm(items, total=total, desc="caching latents + text embeddings", disable=not progress):
            item = _as_item(raw)
            lkey = self._latents_key(item.content_id, item.num_frames, item.height, item.width)
            if self._check(lkey, "latents"):
                counts["latents_reused"] += 1
            else:
                pixels = item.pixels() if callable(item.pixels) else item.pixels
                if pixels is None:
                    raise ValueError(f"item {item.content_id!r} has no pixels (the loader skipped decoding it) but its "
                                     "latents are not cached; build the loader with a skip_decode that asks this cache")
                if pixels.ndim == 4:
                    pixels = pixels[None]
                if tuple(pixels.shape[-3:]) != (item.num_frames, item.height, item.width) or pixels.shape[0] != 1:
                    raise ValueError(
                        f"item {item.content_id!r}: pixels {tuple(pixels.shape)} do not match the declared "
                        f"(1, C, {item.num_frames}, {item.height}, {item.width}); fix the item's sizes"
                    )
                latents = encode_videos(vae, pixels, dtype=torch.float32)[0].to(self.dtype)
                self._write(lkey, {"latents": latents})
                counts["latents_computed"] += 1
            tkey = self._text_key(item.prompt)
            if self._check(tkey, "prompt_embeds"):
                counts["text_reused"] += 1
            else:
                emb = encode_prompts(
                    text_encoder, tokenizer, [item.prompt], self.max_sequence_length, device=device, dtype=self.dtype
                )[0]
                nonzero = emb.ne(0).any(dim=-1).nonzero()
                length = int(nonzero.max()) + 1 if nonzero.numel() else 0
                self._write(tkey, {"prompt_embeds": emb[:length]})
                counts["text_computed"] += 1
        return counts
