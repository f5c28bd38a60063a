"""Validation samples: `WanPipeline` with the trained (unmerged) slice renders each prompt to an mp4."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

SAMPLES_SUBDIR = "samples"


@dataclass(frozen=True)
class ValidationSettings:
    num_frames: int = 5
    height: int = 32
    width: int = 32
    num_inference_steps: int = 4
    guidance_scale: float = 5.0
    max_sequence_length: int = 512
    seed: int = 0
    fps: int = 16


def sample_path(output_dir: str | os.PathLike, step: int, index: int) -> Path:
    """`output_dir/samples/step-<step>-<index>.mp4`."""
    return Path(output_dir) / SAMPLES_SUBDIR / f"step-{step}-{index}.mp4"


def frames_to_uint8(frames) -> np.ndarray:
    """Pipeline frames (F, H, W, 3) floats in [0, 1] -> uint8."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return arr


def render_validation(
    transformer: torch.nn.Module,
    *,
    vae,
    text_encoder,
    tokenizer,
    scheduler,
    prompts: Sequence[str],
    output_dir: str | os.PathLike,
    step: int,
    settings: ValidationSettings,
    device: torch.device | str = "cpu",
    expand_timesteps: bool = False,
    autocast=None,
) -> list[Path]:
    """Render every prompt with the transformer as it is now (slice active, unmerged); returns the mp4 paths.

    The VAE and text encoder are moved to `device` for the rendering and back to wherever they were (a run that
    parked them on the CPU after caching keeps its GPU memory); the transformer is left where it is (block swap
    manages its own placement). The transformer comes back in training mode; a dedicated generator keeps the
    training RNG untouched.
    """
    from diffusers import WanPipeline
    from diffusers.training_utils import offload_models

    from .corpus import write_video

    if not prompts:
        return []
    was_training = transformer.training
    transformer.eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer, expand_timesteps=expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    paths = []
    try:
        with offload_models(vae, text_encoder, device=device):
            for k, prompt in enumerate(prompts):
                generator = torch.Generator(device="cpu").manual_seed(settings.seed + k)
                with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
                    out = pipe(
                        prompt=prompt, num_frames=settings.num_frames, height=settings.height, width=settings.width,
                        num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                        max_sequence_length=settings.max_sequence_length, generator=generator, output_type="np",
                    )
                path = sample_path(output_dir, step, k)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_video(path, frames_to_uint8(out.frames[0]), fps=settings.fps)
                paths.append(path)
    finally:
        if was_training:
            transformer.train()
    return paths


def log_videos(accelerator, paths: Sequence[Path], prompts: Sequence[str], step: int) -> None:
    """Send the samples to W&B as `wandb.Video` when W&B is a tracker (other trackers only get the files)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "wandb":
            import wandb

            videos = [wandb.Video(str(p), caption=f"{k}: {prompt}", format="mp4")
                      for k, (p, prompt) in enumerate(zip(paths, prompts))]
            tracker.log({"validation": videos}, step=step)


def validation_settings_check(height: int, width: int, num_frames: int, multiple: int, temporal: int = 4) -> Optional[str]:
    """A message when the sample size cannot be rendered (None when it can)."""
    if height % multiple or width % multiple:
        return (f"--validation_height/--validation_width {height}x{width} must be multiples of {multiple} "
                f"(VAE x patch size); use e.g. {max(multiple, height // multiple * multiple)}")
    if (num_frames - 1) % temporal:
        return f"--validation_num_frames {num_frames} must be {temporal}k+1 (e.g. {num_frames - (num_frames - 1) % temporal})"
    return None
