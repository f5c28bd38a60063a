"""Preservation in the trainer: the set of earlier concepts' clips, made once, and its batch at every step.

`Preservation.setup` (while the text encoder and VAE are loaded) reads the cached generated set from `--cache_dir`
when its fingerprint (the base weights, the prompts and every setting that changes the clips) matches, and otherwise
encodes the prompts; it also encodes `--preserve_dataset`'s real clips through the trainer's data pipeline.
`Preservation.generate` (after `accelerator.prepare`) samples the missing set with the frozen model
(`slice_ft.preservation`), each process its share, and the main process caches it. `Preservation.backward` adds one
preservation batch per micro-step: drawn from a generator keyed by (seed, step, micro-step), so a resumed run draws
the same batches, and split over processes like the main batch (process r takes part r of the global draw).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from . import preservation as pres
from .training import SigmaSampling, draw_noise_and_sigmas, sample_seed

CACHE_SUBDIR = "preservation"
CACHE_FILE = "preservation_set.safetensors"


def base_identity(base: Optional[Path], source: dict) -> str:
    """Names the base weights in cache keys: path, size and mtime of its file(s); the seed of the tiny model."""
    if base is None:
        return f"tiny:seed={source.get('seed')}"
    from .components import _weights_stamp

    if base.is_dir():
        return _weights_stamp(str(base))
    st = base.stat()
    return f"{base.resolve()}|{st.st_size}|{int(st.st_mtime)}"


def preservation_latent_shape(vae_config, buckets) -> tuple[int, int, int, int]:
    """Latent (C, F, H, W) of the generated clips: the first bucket resolution at the largest bucket frame count."""
    width, height = buckets.resolutions[0]
    frames = max(buckets.frame_counts)
    t, s = int(vae_config.scale_factor_temporal), int(vae_config.scale_factor_spatial)
    return int(vae_config.z_dim), 1 + (frames - 1) // t, height // s, width // s


def draw_indices(sizes: list[int], global_batch: int, seed: int, step: int, micro: int) -> tuple[int, list[int]]:
    """(group, clip indices) of one global preservation batch: a group drawn in proportion to its size, then
    `global_batch` of its clips without repeats until every clip was taken once. Depends on its arguments only."""
    gen = torch.Generator().manual_seed(sample_seed(seed, "preserve-batch", step, micro))
    group = int(torch.multinomial(torch.tensor(sizes, dtype=torch.float64), 1, generator=gen))
    n = sizes[group]
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(global_batch / n))])
    return group, order[:global_batch].tolist()


class Preservation:
    """The preservation set of a run (generated clips and/or real clips, grouped by latent shape) and its loss."""

    def __init__(self, *, mode: str, weight: float, batch_size: int, seed: int, sampling: SigmaSampling,
                 weighting_scheme: str, offload: Callable = contextlib.nullcontext, log: Callable[[str], None] = print):
        self.mode, self.weight, self.batch_size, self.seed = mode, weight, batch_size, seed
        self.sampling, self.weighting_scheme, self.offload, self.log = sampling, weighting_scheme, offload, log
        self.groups: list[pres.PreservationSet] = []  # the generated set (when any) first, then real clips by shape
        self.pending: Optional[dict] = None  # what generate() still has to make
        self.cache_path: Optional[Path] = None
        self.generated = False  # whether this run sampled the set (rather than reading the cache)

    # --- setup (encoders loaded) ---------------------------------------------------------------------------------

    @classmethod
    def setup(cls, accelerator, args, comps, buckets, sampling: SigmaSampling, base: Optional[Path], *,
              offload: Callable = contextlib.nullcontext, log: Callable[[str], None] = print) -> "Preservation":
        from accelerate.utils import DistributedType

        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError("preservation (--preserve_prompts/--preserve_previous/--preserve_dataset) adds a second "
                             "backward per step, which DeepSpeed's engine counts as an extra micro-step; use DDP "
                             "(configs/accelerate/multi_gpu_ddp.yaml) or FSDP")
        self = cls(mode=args.preserve_loss, weight=args.preserve_weight,
                   batch_size=args.preserve_batch_size or args.train_batch_size, seed=args.seed, sampling=sampling,
                   weighting_scheme=args.weighting_scheme, offload=offload, log=log)
        device = accelerator.device
        if args.preserve_prompt_list:
            shape = preservation_latent_shape(comps.vae.config, buckets)
            settings = dict(
                base=base_identity(base, comps.source), subfolder=comps.subfolder, prompts=args.preserve_prompt_list,
                num_samples=args.preserve_samples, latent_shape=list(shape),
                num_inference_steps=args.preserve_num_inference_steps, shift=args.discrete_flow_shift,
                seed=args.seed, text_encoder=comps.identity.get("text_encoder"),
                max_sequence_length=args.max_sequence_length, base_dtype=args.base_dtype,
                mixed_precision=args.mixed_precision,
            )
            fingerprint = pres.preservation_fingerprint(**settings)
            cached = None
            if args.cache_dir:
                self.cache_path = Path(args.cache_dir) / CACHE_SUBDIR / CACHE_FILE
                cached = pres.load_preservation_set(self.cache_path, fingerprint, log=log)
            if cached is not None:
                log(f"preservation set: {len(cached)} clips of {len(args.preserve_prompt_list)} prompt(s) read from "
                    f"{self.cache_path}")
                self.groups.append(cached)
            else:
                from .encoding import encode_prompts

                embeds = encode_prompts(comps.text_encoder, comps.tokenizer, args.preserve_prompt_list,
                                        args.max_sequence_length, device=device).float().cpu()
                self.pending = dict(embeds=embeds, shape=shape, fingerprint=fingerprint,
                                    num_samples=args.preserve_samples, steps=args.preserve_num_inference_steps,
                                    shift=args.discrete_flow_shift, batch_size=self.batch_size)
        if args.preserve_dataset:
            real = encode_real_clips(args, comps, buckets, device)
            self.groups += real
            log(f"preservation set: {sum(len(g) for g in real)} real clips of {args.preserve_dataset} in "
                f"{len(real)} shape(s)")
        return self

    # --- generation (after accelerator.prepare) ------------------------------------------------------------------

    def generate(self, accelerator, transformer) -> None:
        """Sample the pending set with the frozen model, each process its share; the main process caches it."""
        from accelerate.utils import gather_object

        if self.pending is None:
            return
        p = self.pending
        n, rank, world = p["num_samples"], accelerator.process_index, accelerator.num_processes
        share = list(range(rank, n, world))
        # equal forward counts on every process (FSDP gathers each block's weights from all of them)
        share += share[-1:] * (math.ceil(n / world) - len(share)) if share else [0] * math.ceil(n / world)
        where = f" (cached in {self.cache_path})" if self.cache_path else " (pass --cache_dir to keep it)"
        self.log(f"generating {n} preservation clips of latent shape {tuple(p['shape'])} for "
                 f"{p['embeds'].shape[0]} prompt(s) with the frozen model, {p['steps']} steps{where}")
        latents = pres.generate_preservation_latents(
            transformer, p["embeds"].to(accelerator.device), p["shape"], num_samples=n,
            num_inference_steps=p["steps"], shift=p["shift"], seed=self.seed, batch_size=p["batch_size"],
            sample_ids=share, progress=accelerator.is_local_main_process,
        )
        by_id = {i: x for i, x in gather_object(list(zip(share, latents.unbind(0))))}
        pset = pres.PreservationSet(torch.stack([by_id[i] for i in range(n)]), p["embeds"])
        if self.cache_path is not None and accelerator.is_main_process:
            pres.save_preservation_set(self.cache_path, pset, p["fingerprint"])
        accelerator.wait_for_everyone()
        self.groups.insert(0, pset)
        self.pending = None
        self.generated = True

    # --- each step -----------------------------------------------------------------------------------------------

    def batch(self, step: int, micro: int, rank: int = 0, world: int = 1):
        """(latents, prompt embeddings, sample keys) of this process's part of the step's preservation batch."""
        group, order = draw_indices([len(g) for g in self.groups], self.batch_size * world, self.seed, step, micro)
        positions = range(rank * self.batch_size, (rank + 1) * self.batch_size)
        idx = [order[k] for k in positions]
        pset = self.groups[group]
        keys = [f"preserve:{group}:{order[k]}:{k}" for k in positions]
        return pset.latents[idx], pset.embeds_for(idx), keys

    def backward(self, accelerator, transformer, step: int, micro: int) -> torch.Tensor:
        """Forward and backward of this micro-step's preservation batch (weighted); returns the unweighted loss.

        Gradients are not synchronized here: they add to the main batch's, whose backward synchronizes both.
        """
        latents, embeds, keys = self.batch(step, micro, accelerator.process_index, accelerator.num_processes)
        latents, embeds = latents.to(accelerator.device), embeds.to(accelerator.device)
        noise, sigmas = draw_noise_and_sigmas(latents, keys, seed=self.seed, step=f"preserve:{step}:{micro}",
                                              sampling=self.sampling)
        no_sync = accelerator.no_sync(transformer) if accelerator.sync_gradients else contextlib.nullcontext()
        with no_sync:
            with self.offload():
                loss = pres.preservation_loss(transformer, latents, embeds, sigmas=sigmas, noise=noise,
                                              mode=self.mode, weighting_scheme=self.weighting_scheme)
            accelerator.backward(self.weight * loss)
        return loss.detach()


def encode_real_clips(args, comps, buckets, device) -> list:
    """`--preserve_dataset`'s clips through the trainer's data pipeline, encoded once, grouped by latent shape."""
    from .data import BucketedLoader, build_dataset
    from .encoding import encode_prompts, encode_videos

    dataset = build_dataset(args.preserve_dataset, image_column=args.image_column, video_column=args.video_column,
                            caption_column=args.caption_column)
    loader = BucketedLoader(dataset, buckets, batch_size=1, shuffle=False, frame_stride=args.frame_stride,
                            decode_threads=args.decode_threads)
    groups: dict[tuple, list] = {}
    for item in loader.iter_items():
        latents = encode_videos(comps.vae, item.pixel_values[None].to(device), dtype=torch.float32)[0].cpu()
        embeds = encode_prompts(comps.text_encoder, comps.tokenizer, [item.caption], args.max_sequence_length,
                                device=device)[0].float().cpu()
        groups.setdefault(tuple(latents.shape), []).append((latents, embeds))
    if not groups:
        raise ValueError(f"--preserve_dataset {args.preserve_dataset}: no usable clip (skipped: "
                         f"{dict(loader.stats.skipped)}); check the folder, its captions and --bucket_frame_counts")
    return [pres.PreservationSet(torch.stack([x for x, _ in items]), torch.stack([e for _, e in items]))
            for _, items in sorted(groups.items())]


def preservation_summary(p: Optional[Preservation]) -> dict:
    """What the run's result records about preservation."""
    if p is None:
        return {}
    return {"clips": sum(len(g) for g in p.groups), "groups": len(p.groups), "generated": p.generated,
            "batch_size": p.batch_size, "mode": p.mode, "weight": p.weight}
