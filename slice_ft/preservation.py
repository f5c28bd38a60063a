"""Self-generated preservation: keep the concepts already in a model while a new slice trains, without their data.

DreamBooth's prior preservation, aimed at the concepts baked into the base: before training, the frozen model (the
transformer with its slices disabled) samples latent clips for the earlier concepts' prompts; each training step then
adds a separate batch of them, noised at sampled sigmas, with one of two losses:
  distill  ||student - teacher||^2, the teacher being the same transformer with its slices disabled (no second copy);
  flow     the plain flow-matching loss on the generated clips (cheaper: no teacher forward).
When the base already has earlier slices merged in, "every adapter disabled" is exactly "the slice being trained
disabled": the earlier concepts live in the base weights.

    with slices_disabled(transformer): ...                      # the frozen model / the teacher
    latents = generate_preservation_latents(transformer, embeds, (C, F, H, W), num_samples=32, seed=0)
    loss = preservation_loss(transformer, latents[idx], embeds[idx % P], sigmas=s, noise=n, mode="distill")
    save_preservation_set(path, PreservationSet(latents, embeds), fingerprint); load_preservation_set(path, ...)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from slice_ft import flow_matching as fm

logger = logging.getLogger(__name__)

LOSS_MODES: tuple[str, ...] = ("distill", "flow")
DEFAULT_SHIFT = 3.0  # Wan 2.1's sampling shift at 480p (diffusers' Wan scheduler configs: flow_shift 3.0)


# --- the frozen model ---------------------------------------------------------------------------------------------


def _tuner_layers(model: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def slices_disabled(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The transformer with every PEFT adapter layer (its slices; a LoRA too) disabled, restored exactly on exit.

    Uses PEFT's own switch (`BaseTunerLayer.enable_adapters`, what diffusers' `disable_adapters()` calls on each
    layer); PEFT's switch also clears the adapters' `requires_grad`, so each layer's on/off state and each adapter
    parameter's `requires_grad` are recorded first and put back on exit, also when the body raises. A model without
    adapter layers is its own frozen model (a no-op). A merged adapter cannot be switched off without unmerging the
    base weights (PEFT's layers unmerge on the next forward), so it is refused.
    """
    layers = _tuner_layers(transformer)
    merged = [type(m).__name__ for m in layers if m.merged]
    if merged:
        raise ValueError(
            f"slices_disabled: {len(merged)} adapter layers are merged into the base weights (e.g. a {merged[0]}); "
            "disabling them would unmerge them; unmerge first (slice_adapter.unmerge_adapters) or use the merged "
            "model as the base"
        )
    saved = [
        (m, m.disable_adapters, [(p, p.requires_grad) for name in m.adapter_layer_names
                                 for p in getattr(m, name).parameters()])
        for m in layers
    ]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield transformer
    finally:
        for m, was_disabled, grads in saved:
            m.enable_adapters(not was_disabled)
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)


# --- generating the preservation set ------------------------------------------------------------------------------


def _unwrap(transformer: torch.nn.Module) -> torch.nn.Module:
    return getattr(transformer, "module", transformer)  # DDP / accelerate wrappers


def _check_prompt_embeds(prompt_embeds: torch.Tensor, model: torch.nn.Module) -> None:
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3 or prompt_embeds.shape[0] == 0:
        shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds).__name__
        raise ValueError(
            f"prompt_embeds must be a (num_prompts >= 1, seq_len, text_dim) tensor, got {shape}; encode at least one "
            "prompt (slice_ft.encoding.encode_prompts)"
        )
    text_dim = getattr(getattr(model, "config", None), "text_dim", None)
    if text_dim is not None and prompt_embeds.shape[-1] != text_dim:
        raise ValueError(
            f"prompt_embeds have width {prompt_embeds.shape[-1]} but the transformer's text_dim is {text_dim}; "
            "encode the prompts with this model's text encoder"
        )


def _check_latent_shape(latent_shape: Sequence[int], model: torch.nn.Module) -> tuple[int, int, int, int]:
    shape = tuple(latent_shape)
    if len(shape) != 4 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"latent_shape must be four positive ints (channels, frames, height, width), got {shape!r}")
    config = getattr(model, "config", None)
    channels = getattr(config, "in_channels", None)
    if channels is not None and shape[0] != channels:
        raise ValueError(f"latent_shape has {shape[0]} channels but the transformer takes {channels}; use "
                         f"({channels}, frames, height, width)")
    patch = tuple(getattr(config, "patch_size", (1, 1, 1)))
    if any(s % p for s, p in zip(shape[1:], patch)):
        raise ValueError(f"latent_shape {shape} (frames, height, width) must be divisible by the patch size {patch}")
    if shape[2] % 2 or shape[3] % 2:  # WanPipeline wants pixel sizes divisible by 16, i.e. even latent sizes
        raise ValueError(f"latent_shape {shape}: latent height and width must be even (pixel sizes divisible by 16)")
    return shape  # type: ignore[return-value]


def preservation_noise(latent_shape: Sequence[int], sample_id: int, seed: int) -> torch.Tensor:
    """The initial noise of preservation sample `sample_id`: its own generator, so a sample never depends on the
    batch size or on how the samples are split over processes."""
    from slice_ft.training import sample_seed

    gen = torch.Generator().manual_seed(sample_seed(seed, "preserve", sample_id))
    return torch.randn(tuple(latent_shape), generator=gen, dtype=torch.float32)


def generate_preservation_latents(
    transformer: torch.nn.Module,
    prompt_embeds: torch.Tensor,
    latent_shape: Sequence[int],
    *,
    num_samples: int,
    num_inference_steps: int = 20,
    shift: float = DEFAULT_SHIFT,
    seed: int = 0,
    batch_size: int = 8,
    sample_ids: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Latent clips the frozen model samples for the prompts: float32 (N, C, F, H, W) on the CPU, no VAE.

    Sample i is drawn for prompt `i % num_prompts` (prompts cycled over `num_samples`) from its own seeded noise, by
    diffusers' `WanPipeline` (latents only, no classifier-free guidance) with a `FlowMatchEulerDiscreteScheduler` of
    `shift`, `num_inference_steps` Euler steps, every adapter of `transformer` disabled (`slices_disabled`).
    `sample_ids` (default: all of range(num_samples)) generates only those samples, e.g. one rank's share; the same
    id gives the same clip whatever the split or the batch size. The transformer's adapters, their values and its
    train/eval mode are unchanged afterwards.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from tqdm.auto import tqdm

    model = _unwrap(transformer)
    _check_prompt_embeds(prompt_embeds, model)
    shape = _check_latent_shape(latent_shape, model)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}; e.g. 32 clips of the earlier concepts")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}; Wan samples with 3.0 (480p) or 5.0 (720p), 1.0 = no shift")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}; e.g. 20")
    ids = list(range(num_samples)) if sample_ids is None else [int(i) for i in sample_ids]
    bad = [i for i in ids if not 0 <= i < num_samples]
    if bad:
        raise ValueError(f"sample_ids must lie in [0, {num_samples}), got {bad[:5]}")

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=fm.NUM_TRAIN_TIMESTEPS, shift=shift)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=model)
    pipe.set_progress_bar_config(disable=True)  # one bar over the samples below instead of one per batch
    device = next(model.parameters()).device
    channels, frames, height, width = shape
    num_prompts = prompt_embeds.shape[0]
    out = []
    was_training = model.training
    model.eval()
    try:
        with slices_disabled(model), tqdm(total=len(ids), desc="generating preservation clips", disable=not progress) as bar:
            for start in range(0, len(ids), batch_size):
                batch = ids[start:start + batch_size]
                noise = torch.stack([preservation_noise(shape, i, seed) for i in batch]).to(device)
                embeds = prompt_embeds[[i % num_prompts for i in batch]].to(device)
                latents = pipe(
                    prompt_embeds=embeds, latents=noise, guidance_scale=1.0, num_inference_steps=num_inference_steps,
                    num_frames=(frames - 1) * pipe.vae_scale_factor_temporal + 1,
                    height=height * pipe.vae_scale_factor_spatial, width=width * pipe.vae_scale_factor_spatial,
                    output_type="latent", return_dict=False,
                )[0]
                out.append(latents.detach().float().cpu())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    if not out:
        return torch.empty((0, *shape), dtype=torch.float32)
    return torch.cat(out)


# --- the loss -----------------------------------------------------------------------------------------------------


def _predict(transformer, noisy: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    from slice_ft.training import input_dtype

    dtype = input_dtype(transformer)
    return transformer(hidden_states=noisy.to(dtype), timestep=fm.sigma_to_timestep(sigmas),
                       encoder_hidden_states=prompt_embeds.to(dtype), return_dict=False)[0]


def preservation_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    mode: str = "distill",
    weighting_scheme: str = "none",
) -> torch.Tensor:
    """The float32 preservation loss of one batch of preservation clips, noised as x_t = (1-σ)x0 + σε.

    distill: MSE between the student (the transformer as it is) and the teacher (the same transformer inside
             `slices_disabled`, under no_grad) predictions; 0 while the slice values are 0.
    flow:    the plain flow-matching loss on the clips (`slice_ft.training.flow_matching_step`).
    `weighting_scheme` weights each sample as the main loss does (`flow_matching.loss_weights`).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"preservation loss mode {mode!r} is unknown; use one of {', '.join(LOSS_MODES)}")
    if latents.ndim != 5:
        raise ValueError(f"latents must be (batch, channels, frames, height, width), got shape {tuple(latents.shape)}")
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != latents.shape[0]:
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} must be (batch, seq_len, text_dim) with the "
                         f"latents' batch {latents.shape[0]}; index the embeddings like the clips")
    if noise.shape != latents.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != latents shape {tuple(latents.shape)}; draw noise like the clips")
    if sigmas.ndim != 1 or sigmas.shape[0] != latents.shape[0]:
        raise ValueError(f"sigmas must be one per clip ({latents.shape[0]},), got shape {tuple(sigmas.shape)}")
    if mode == "flow":
        from slice_ft.training import flow_matching_step

        return flow_matching_step(transformer, latents, prompt_embeds, noise, sigmas, weighting_scheme)
    if not _tuner_layers(transformer):
        raise ValueError("distill preservation needs a transformer carrying the slice being trained (its teacher is "
                         "the same model with the slice disabled); add the slice first, or use mode='flow'")
    noisy = fm.noisy_latents(latents, noise, sigmas)
    with torch.no_grad(), slices_disabled(transformer):
        teacher = _predict(transformer, noisy, sigmas, prompt_embeds).float()
    student = _predict(transformer, noisy, sigmas, prompt_embeds)
    return fm.flow_matching_loss(student, teacher, fm.loss_weights(sigmas, weighting_scheme))


# --- the cached set -----------------------------------------------------------------------------------------------


@dataclass
class PreservationSet:
    """Generated clips (N, C, F, H, W) and the prompt embeddings they were drawn for (P, L, D): clip i <- prompt i % P."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]

    def embeds_for(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The prompt embeddings of clips `indices`."""
        idx = torch.as_tensor(indices, dtype=torch.long) % self.prompt_embeds.shape[0]
        return self.prompt_embeds[idx]


def preservation_fingerprint(**parts: Any) -> str:
    """A hex digest of JSON-serialisable parts, e.g. base=<base fingerprint>, prompts=[...], samples=32, steps=20."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save_preservation_set(path: str | os.PathLike, pset: PreservationSet, fingerprint: str) -> Path:
    """Write the set as safetensors with its fingerprint in the metadata (temp name, then renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({"latents": pset.latents.contiguous().float().cpu(),
                   "prompt_embeds": pset.prompt_embeds.contiguous().cpu()}, str(tmp),
                  metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_preservation_set(
    path: str | os.PathLike, fingerprint: str, log: Callable[[str], None] = logger.info
) -> Optional[PreservationSet]:
    """The cached set at `path` if its fingerprint matches; None (and a log line saying why) to regenerate."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            found = (f.metadata() or {}).get("fingerprint")
            if found != fingerprint:
                log(f"preservation set {path} was made for other settings (fingerprint {str(found)[:12]}, "
                    f"now {fingerprint[:12]}): regenerating")
                return None
            return PreservationSet(f.get_tensor("latents"), f.get_tensor("prompt_embeds"))
    except Exception as exc:  # a truncated or foreign file: regenerate rather than fail the run
        log(f"preservation set {path} is unreadable ({exc}): regenerating")
        return None
