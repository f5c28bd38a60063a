"""The pieces of one training step: optimizer, per-sample noise and sigmas, batch encoding, flow-matching loss."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import flow_matching as fm
from .choices import OPTIMIZERS
from .encoding import LatentCache, encode_prompts, encode_videos


# --- optimizer --------------------------------------------------------------------------------------------------


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The slice values: the only parameters with `requires_grad` after `add_adapter`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter: add the slice with transformer.add_adapter(SliceConfig(...)) "
                         "before building the optimizer")
    return params


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "adamw",
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    optimizer_args: Optional[Mapping[str, Any]] = None,
) -> torch.optim.Optimizer:
    """AdamW (torch), AdamW8bit (bitsandbytes) or Adafactor (transformers, fixed learning rate) over `params`.

    `optimizer_args` are passed to the optimizer's constructor and win over the named arguments."""
    params = list(params)
    if not learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {learning_rate!r}; e.g. 1e-4")
    if name == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(betas=betas, weight_decay=weight_decay, eps=eps)
    elif name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SystemExit(
                "--optimizer adamw8bit needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                "(or `pip install slice-ft[8bit]`), or use --optimizer adamw / adafactor"
            ) from None
        cls, kwargs = bnb.optim.AdamW8bit, dict(betas=betas, weight_decay=weight_decay, eps=eps)
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        # An external learning rate (and so the lr scheduler) instead of Adafactor's relative step size.
        cls, kwargs = Adafactor, dict(weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                                      warmup_init=False)
    else:
        raise ValueError(f"--optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    optimizer_args = dict(optimizer_args or {})
    kwargs.update(optimizer_args)
    try:
        return cls(params, lr=learning_rate, **kwargs)
    except TypeError as e:  # an --optimizer_args key the constructor does not take
        raise ValueError(f"--optimizer {name} ({cls.__module__}.{cls.__name__}) rejected its arguments "
                         f"{sorted(optimizer_args)}: {e}; check --optimizer_args") from None


# --- timesteps and noise ----------------------------------------------------------------------------------------


def timestep_bounds(min_timestep: float, max_timestep: float, expert_component: Optional[str] = None,
                    boundary_ratio: Optional[float] = None) -> tuple[float, float]:
    """[min, max] timesteps to train: the user's range, narrowed to the Wan 2.2 expert's side of the boundary."""
    if expert_component is None:
        return float(min_timestep), float(max_timestep)
    lo, hi = fm.expert_timestep_range(expert_component, boundary_ratio)
    new_lo, new_hi = max(lo, min_timestep), min(hi, max_timestep)
    if new_lo >= new_hi:
        raise ValueError(
            f"--min_timestep {min_timestep} / --max_timestep {max_timestep} leave nothing of the {expert_component} "
            f"expert's range [{lo:g}, {hi:g}]; widen them or drop them to train the whole expert range"
        )
    return new_lo, new_hi


def sample_seed(seed: int, *key: Any) -> int:
    """A 63-bit seed from the run seed and a key: the same sample at the same step always gets the same noise."""
    digest = hashlib.sha256("|".join(map(str, (seed, *key))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SigmaSampling:
    """`flow_matching.sample_sigmas` settings (the --timestep_sampling family of flags)."""

    method: str = "shift"
    shift: float = 3.0
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_timestep: float = 0.0
    max_timestep: float = 1000.0
    preserve_distribution_shape: bool = False


def draw_noise_and_sigmas(
    latents: torch.Tensor, sample_keys: Sequence[Any], *, seed: int, step: int, sampling: SigmaSampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise like `latents` in float32, sigmas (B,)), each sample drawn from its own generator.

    Seeded by (seed, step, sample key), so the draws do not depend on how samples are spread over processes or on
    where a run was resumed: one process with batch 2 and two processes with batch 1 see the same noise.
    """
    if len(sample_keys) != latents.shape[0]:
        raise ValueError(f"got {len(sample_keys)} sample keys for a batch of {latents.shape[0]}; pass one per sample")
    noise, sigmas = [], []
    for key in sample_keys:
        gen = torch.Generator().manual_seed(sample_seed(seed, step, key))
        sigmas.append(fm.sample_sigmas(
            1, method=sampling.method, shift=sampling.shift, sigmoid_scale=sampling.sigmoid_scale,
            logit_mean=sampling.logit_mean, logit_std=sampling.logit_std, min_timestep=sampling.min_timestep,
            max_timestep=sampling.max_timestep, preserve_distribution_shape=sampling.preserve_distribution_shape,
            generator=gen,
        ))
        noise.append(torch.randn(latents.shape[1:], generator=gen, dtype=torch.float32))
    return torch.stack(noise).to(latents.device), torch.cat(sigmas).to(latents.device)


# --- encoding ---------------------------------------------------------------------------------------------------


class BatchEncoder:
    """Latents and prompt embeddings of a loader batch: read from a `LatentCache`, or encoded on the fly (no grad)."""

    def __init__(self, *, vae=None, text_encoder=None, tokenizer=None, max_sequence_length: int,
                 cache: Optional[LatentCache] = None, device: torch.device | str = "cpu"):
        if cache is None and (vae is None or text_encoder is None or tokenizer is None):
            raise ValueError("BatchEncoder needs the VAE, text encoder and tokenizer, or a LatentCache")
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.max_sequence_length = max_sequence_length
        self.cache = cache
        self.device = torch.device(device)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            bucket = batch["bucket"]
            items = [self.cache.get(cid, caption, num_frames=bucket.num_frames, height=bucket.height,
                                    width=bucket.width) for cid, caption in zip(batch["ids"], batch["captions"])]
            latents = torch.stack([it["latents"] for it in items])
            embeds = torch.stack([it["prompt_embeds"] for it in items])
        else:
            pixels = batch["pixel_values"].to(self.device)
            latents = encode_videos(self.vae, pixels, dtype=torch.float32)
            embeds = encode_prompts(self.text_encoder, self.tokenizer, list(batch["captions"]),
                                    self.max_sequence_length, device=self.device)
        return latents.to(self.device, torch.float32), embeds.to(self.device)


# --- the loss ---------------------------------------------------------------------------------------------------


def input_dtype(transformer: torch.nn.Module) -> torch.dtype:
    """The dtype the transformer's first layer computes in (its base dtype; fp8 bases keep it bf16)."""
    model = getattr(transformer, "module", transformer)  # DDP
    return model.patch_embedding.weight.dtype


def flow_matching_step(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "none",
) -> torch.Tensor:
    """The weighted flow-matching loss of one batch: x_t = (1-σ)x0 + σε, predict ε - x0 at timestep σ·1000."""
    dtype = input_dtype(transformer)
    noisy = fm.noisy_latents(latents, noise, sigmas)
    target = fm.flow_target(latents, noise)
    pred = transformer(
        hidden_states=noisy.to(dtype),
        timestep=fm.sigma_to_timestep(sigmas),
        encoder_hidden_states=prompt_embeds.to(dtype),
        return_dict=False,
    )[0]
    return fm.flow_matching_loss(pred, target, fm.loss_weights(sigmas, weighting_scheme))
