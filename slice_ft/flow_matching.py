"""Rectified-flow training math for Wan: sigma sampling (musubi-tuner flag semantics), interpolation, target,
loss weighting, and the Wan 2.2 A14B expert split.

Conventions (those of diffusers' `FlowMatchEulerDiscreteScheduler` / `WanPipeline`):
  sigma in (0, 1], sigma = 1 is pure noise;  x_t = (1 - sigma) * x0 + sigma * noise;
  the model predicts the velocity  noise - x0;  the transformer's `timestep` is sigma * 1000.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .choices import SAMPLING_METHODS, WEIGHTING_SCHEMES

NUM_TRAIN_TIMESTEPS = 1000  # Wan's scheduler config; musubi's --min/max_timestep live in [0, 1000]

EXPERTS: tuple[str, ...] = ("transformer", "transformer_2")

_MAX_REJECTION_ROUNDS = 1000  # as musubi's --preserve_distribution_shape loop


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """sigma' = s * sigma / (1 + (s - 1) * sigma): the flow-shift of diffusers' schedulers and musubi's `shift`."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}; use e.g. 3.0 (Wan 480p) or 5.0 (Wan 720p), 1.0 = no shift")
    return (shift * sigma) / (1 + (shift - 1) * sigma)


def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The `timestep` the Wan transformer gets for noise level sigma (the pipeline passes scheduler sigmas * 1000)."""
    return sigma * NUM_TRAIN_TIMESTEPS


def _draw(n, method, shift, sigmoid_scale, logit_mean, logit_std, generator, device) -> torch.Tensor:
    """n raw sigmas in [0, 1] before the min/max restriction (float32, on `device`)."""
    if method == "uniform":
        # 1 - U[0,1) is U(0,1]: sigma = 0 (a clean input, zero target information) never comes out.
        return 1.0 - torch.rand(n, generator=generator, device=device)
    if method in ("sigmoid", "shift"):
        t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator, device=device))
        return shift_sigma(t, shift) if method == "shift" else t
    # logit_normal: the SD3 paper's sigmoid(N(mean, std)), drawn by diffusers' own helper. Shifted like musubi's
    # and diffusers' trainers, whose logit-normal draw indexes a shift-ed scheduler grid.
    u = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=logit_mean, logit_std=logit_std, device=device, generator=generator
    )
    return shift_sigma(u, shift)


def sample_sigmas(
    batch_size: int,
    *,
    method: str,
    shift: float,
    sigmoid_scale: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    min_timestep: float = 0,
    max_timestep: float = 1000,
    preserve_distribution_shape: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw `batch_size` float32 sigmas in (0, 1] the way musubi-tuner's `--timestep_sampling` does.

    method:
      uniform       U(0, 1]                                   (shift ignored, as in musubi)
      sigmoid       sigmoid(sigmoid_scale * N(0, 1))          (shift ignored, as in musubi)
      shift         shift_sigma(sigmoid(sigmoid_scale * N(0, 1)), shift)   (`--discrete_flow_shift`)
      logit_normal  shift_sigma(sigmoid(N(logit_mean, logit_std)), shift); pass shift=1.0 for plain SD3 logit-normal.
                    logit_mean > 0 leans towards noise (the paper's sign; musubi/diffusers index a descending grid).
    min_timestep/max_timestep (in [0, 1000], musubi's flags) restrict sigma*1000 to [min, max]:
      default: like musubi, the transformed draw t in [0, 1] is rescaled, sigma = t*(max-min)/1000 + min/1000
      (the shape of the distribution is squeezed into the range);
      preserve_distribution_shape=True: like musubi's flag of that name, draws outside [min, max] are rejected
      and redrawn (the distribution restricted to the range; use it for Wan 2.2 expert training).
    The draw happens on the generator's device (a CPU generator works for CUDA training) and is moved to `device`.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"timestep sampling method {method!r} is unknown; use one of {', '.join(SAMPLING_METHODS)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not shift > 0:
        raise ValueError(f"shift (--discrete_flow_shift) must be > 0, got {shift!r}; 1.0 means no shift")
    if not sigmoid_scale > 0:
        raise ValueError(f"sigmoid_scale must be > 0, got {sigmoid_scale!r}; 1.0 is musubi's default")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std!r}; 1.0 is the SD3 default")
    if not (0 <= min_timestep <= max_timestep <= NUM_TRAIN_TIMESTEPS) or max_timestep == 0:
        raise ValueError(
            f"need 0 <= min_timestep <= max_timestep <= {NUM_TRAIN_TIMESTEPS} and max_timestep > 0, got "
            f"min_timestep={min_timestep!r}, max_timestep={max_timestep!r}; e.g. min_timestep=875, max_timestep=1000"
        )
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    t_min, t_max = min_timestep / NUM_TRAIN_TIMESTEPS, max_timestep / NUM_TRAIN_TIMESTEPS
    args = (method, shift, sigmoid_scale, logit_mean, logit_std, generator, gen_device)

    if not preserve_distribution_shape:
        sigma = _draw(batch_size, *args) * (t_max - t_min) + t_min
    else:
        kept: list[torch.Tensor] = []
        n_kept = 0
        for _ in range(_MAX_REJECTION_ROUNDS):
            t = _draw(batch_size, *args)
            t = t[(t >= t_min) & (t <= t_max)]
            kept.append(t)
            n_kept += t.numel()
            if n_kept >= batch_size:
                break
        else:
            raise ValueError(
                f"preserve_distribution_shape: {method!r} sampling puts almost no mass in timesteps "
                f"[{min_timestep}, {max_timestep}] ({n_kept} of {batch_size} accepted in {_MAX_REJECTION_ROUNDS} "
                "rounds); widen the range, change shift/sigmoid_scale/logit_mean, or use rescaling "
                "(preserve_distribution_shape=False)"
            )
        sigma = torch.cat(kept)[:batch_size]

    # Float rounding of the rescale may step a hair outside [min, max]; 0 stays excluded (sigmoid can underflow).
    lo = max(torch.tensor(t_min, dtype=torch.float32).item(), torch.finfo(torch.float32).tiny)
    hi = torch.tensor(t_max, dtype=torch.float32).item()
    return sigma.float().clamp_(lo, hi).to(device or gen_device)


def expert_timestep_range(expert: str, boundary_ratio: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """(min_timestep, max_timestep) that Wan 2.2 A14B's `expert` serves in `WanPipeline.__call__`.

    The pipeline uses `transformer` (high-noise expert) when t >= boundary_ratio * num_train_timesteps and
    `transformer_2` (low-noise expert) when t < that; so the low range's upper end is exclusive at inference
    (hitting it exactly has probability ~0 for continuous sampling). Feed the pair to `sample_sigmas`.
    """
    if expert not in EXPERTS:
        raise ValueError(
            f"expert {expert!r} is unknown; use 'transformer' (high-noise, t >= boundary) or "
            "'transformer_2' (low-noise, t < boundary)"
        )
    if not 0 < boundary_ratio < 1:
        raise ValueError(
            f"boundary_ratio must be in (0, 1), got {boundary_ratio!r}; Wan 2.2 A14B uses 0.875 (T2V) or 0.9 (I2V)"
        )
    boundary = boundary_ratio * num_train_timesteps  # the pipeline's exact expression
    return (boundary, float(num_train_timesteps)) if expert == "transformer" else (0.0, boundary)


def expert_for_timestep(timestep: float, boundary_ratio: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """Which expert `WanPipeline` runs at `timestep`: the same `t >= boundary_timestep` test it uses."""
    boundary = boundary_ratio * num_train_timesteps
    return "transformer" if timestep >= boundary else "transformer_2"


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """sigma as float32 shaped (B, 1, ..., 1) to broadcast over `like` (B, ...); scalars broadcast as is."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == 1:
        if sigma.shape[0] != like.shape[0]:
            raise ValueError(
                f"sigma has {sigma.shape[0]} entries but the batch has {like.shape[0]}; pass one sigma per sample"
            )
        return sigma.view(-1, *([1] * (like.ndim - 1)))
    return sigma  # already broadcastable, e.g. (B, 1, 1, 1, 1)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, computed in float32, returned in x0's dtype."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} != noise shape {tuple(noise.shape)}; draw noise like x0")
    s = _per_sample(sigma, x0)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_t / d sigma = noise - x0, in float32 (a bf16 difference would lose bits the loss sees)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} != noise shape {tuple(noise.shape)}; draw noise like x0")
    return noise.float() - x0.float()


def loss_weights(sigma: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample float32 weights from diffusers' `compute_loss_weighting_for_sd3` (none | sigma_sqrt | cosmap)."""
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"loss weighting scheme {scheme!r} is unknown; use one of {', '.join(WEIGHTING_SCHEMES)}")
    return compute_loss_weighting_for_sd3(scheme, sigmas=sigma).float()


def flow_matching_loss(
    model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """float32 MSE: mean over all but the batch dim, times the per-sample weight, then mean over the batch."""
    if model_pred.shape != target.shape:
        raise ValueError(
            f"model_pred shape {tuple(model_pred.shape)} != target shape {tuple(target.shape)}; "
            "the transformer's output must match the latents"
        )
    per_sample = (model_pred.float() - target.float()).pow(2).reshape(target.shape[0], -1).mean(dim=1)
    if weights is None:
        return per_sample.mean()
    w = torch.as_tensor(weights, dtype=torch.float32, device=per_sample.device).reshape(-1)
    if w.numel() != per_sample.numel():
        raise ValueError(f"weights has {w.numel()} entries but the batch has {per_sample.numel()}; one per sample")
    return (w * per_sample).mean()
