#!/usr/bin/env python
"""Fully fine-tune a deterministic slice of a Wan video transformer (diffusers' `WanTransformer3DModel`).

    accelerate launch train_slice_ft.py --config configs/wan2.1_t2v_1.3b.yaml [--flag value ...]
    python train_slice_ft.py --config configs/demo.yaml        # tiny embedded Wan, generated corpus, CPU, offline

The recipe, in diffusers' order: accelerator -> frozen models -> slice adapter -> optimizer -> data -> lr scheduler
-> accelerator.prepare -> loop under accelerator.accumulate -> checkpoints / validation -> final save.
"""

from __future__ import annotations

import sys

from slice_ft.arguments import check_inputs, check_slice_selects, parse_args, run_settings
from slice_ft.errors import exit_on_input_error

if __name__ == "__main__":  # flags first: --help and flag errors answer before torch, diffusers and accelerate load
    ARGS = exit_on_input_error(parse_args, debug="--debug" in sys.argv)

import argparse  # noqa: E402 (the model stack loads once the flags are known to be good)
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import free_memory
from tqdm.auto import tqdm

import slice_adapter
from slice_adapter import SliceConfig
from slice_adapter.report import format_bytes
from slice_ft import distributed
from slice_ft import flow_matching as fm
from slice_ft.concepts import base_checkpoint, concept_of_run, describe_auto_id
from slice_ft.checkpointing import (
    TrainingProgress, claim_output_dir, list_checkpoints, register_slice_hooks, resolve_resume, save_checkpoint,
)
from slice_ft.compile import check_compile_works, compile_blocks
from slice_ft.components import DTYPES, load_components, spatial_multiple
from slice_ft.data import BucketConfig, BucketedLoader, build_dataset
from slice_ft.encoding import LatentCache, free_encoders
from slice_ft.offload import offload_saved_activations
from slice_ft.outputs import check_merged_space, save_merged, save_slice
from slice_ft.preservation_set import Preservation, preservation_summary
from slice_ft.training import (
    BatchEncoder, SigmaSampling, build_optimizer, draw_noise_and_sigmas, flow_matching_step, timestep_bounds,
    trainable_parameters,
)
from slice_ft.validation import ValidationSettings, log_videos, render_validation, validation_settings_check

logger = get_logger(__name__)

DEMO_CORPUS_SUBDIR = "demo_corpus"


def tracker_config(args: argparse.Namespace) -> dict:
    """Flags as tracker-safe scalars (TensorBoard's hparams take no lists or None)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


def infinite_batches(loader):
    """Batches epoch after epoch (the loader resumes mid-epoch after a checkpoint); fails on a dataset with none."""
    empty_epochs = 0
    epoch = loader.epoch
    while True:
        loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield epoch, batch
        empty_epochs = empty_epochs + 1 if n == 0 else 0
        if empty_epochs >= 2:  # one empty epoch is normal right after resuming at an epoch's end
            raise ValueError(f"the dataset yields no usable sample (skipped: {dict(loader.stats.skipped)}); check "
                             "--dataset_name, captions and --bucket_frame_counts")
        epoch += 1


def main(args: argparse.Namespace) -> dict:
    check_inputs(args)
    output_dir = Path(args.output_dir)
    if args.wandb_mode and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = args.wandb_mode

    # --- accelerator -------------------------------------------------------------------------------------------
    engine = distributed.requested_engine()  # what accelerate launch's config asked for (FSDP2: the trainer shards)
    accelerator = distributed.make_accelerator(
        engine,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # Every block parameter takes part in a T2V forward (I2V models are refused), so DDP needs no graph search.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(f"{accelerator.state}engine: {engine.describe()}", main_process_only=False)
    if (auto_id := describe_auto_id(args)):
        logger.info(auto_id)
    if args.blocks_to_swap and accelerator.num_processes > 1:
        raise ValueError(f"--blocks_to_swap {args.blocks_to_swap} runs in one process only (got "
                         f"{accelerator.num_processes}); drop it, or drop it and shard the base with FSDP "
                         "(configs/accelerate/fsdp.yaml)")
    if args.compile:  # before loading anything: a machine that cannot compile says so now
        check_compile_works(accelerator.device, args.compile_backend)
    set_seed(args.seed)
    run = run_settings(args)  # recorded in each checkpoint: another run's checkpoints are never resumed by mistake
    resume = resolve_resume(output_dir, args.resume_from_checkpoint, run, force=args.force_resume, logger=logger)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        claim_output_dir(output_dir, fresh=resume is None, logger=logger)

    dataset_name = args.dataset_name or make_demo_corpus(accelerator, output_dir, args.seed)

    # --- models (frozen) ---------------------------------------------------------------------------------------
    weight_dtype = DTYPES[args.mixed_precision]
    base_dtype = torch.bfloat16 if args.base_dtype in ("bf16", "fp8") else torch.float32
    comps = load_components(
        args.pretrained_model_name_or_path, transformer_file=args.transformer_file,
        transformer_config=args.transformer_config, expert=args.expert, boundary_ratio=args.boundary_ratio,
        base_dtype=base_dtype, text_encoder_dtype=weight_dtype,
    )
    transformer = comps.transformer
    if args.save_merged and accelerator.is_main_process:
        check_merged_space(comps.source, output_dir, transformer)  # before training, not after it
    multiple = spatial_multiple(comps)
    buckets = BucketConfig.from_strings(args.bucket_resolutions, args.bucket_frame_counts)
    for w, h in buckets.resolutions:
        if w % multiple or h % multiple:
            raise ValueError(f"--bucket_resolutions {w}x{h}: this model needs multiples of {multiple} (VAE stride x "
                             f"patch size); use e.g. {round(w / multiple) * multiple}x{round(h / multiple) * multiple}")
    if args.validation_prompts:
        problem = validation_settings_check(args.validation_height, args.validation_width, args.validation_num_frames,
                                            multiple, int(comps.vae.config.scale_factor_temporal))
        if problem:
            raise ValueError(problem)
    t_min, t_max = timestep_bounds(args.min_timestep, args.max_timestep,
                                   comps.subfolder if args.expert else None, comps.boundary_ratio)
    sampling = SigmaSampling(args.timestep_sampling, args.discrete_flow_shift, args.sigmoid_scale, args.logit_mean,
                             args.logit_std, t_min, t_max, args.preserve_distribution_shape)
    if args.expert:
        logger.info(f"training the {args.expert}-noise expert ({comps.subfolder}) on timesteps [{t_min:g}, {t_max:g}] "
                    f"(boundary_ratio {comps.boundary_ratio})")

    # --- the slice adapter -------------------------------------------------------------------------------------
    slice_config = SliceConfig(fraction=args.slice_fraction, slice_id=args.slice_id, seed=args.slice_seed,
                               tile_order=args.slice_tile_order, lossless_for=args.lossless_for)
    plan = slice_adapter.plan(transformer, slice_config)
    check_slice_selects(plan, args.slice_fraction, args.slice_id, args.slice_seed)
    transformer.add_adapter(slice_config)
    logger.info(f"slice {args.slice_id} of {slice_config.num_slices} at fraction {args.slice_fraction}: training "
                f"{plan.selected:,} of {plan.targeted:,} block weights")
    if args.base_dtype == "fp8":
        from slice_ft.offload import quantize_base_to_fp8

        logger.info(f"fp8 base: {len(quantize_base_to_fp8(transformer))} block Linear weights stored as float8")
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.blocks_to_swap:
        from slice_ft.offload import enable_block_swap

        enable_block_swap(transformer, args.blocks_to_swap, accelerator.device)
    if args.compile:
        logger.info(f"compiled {compile_blocks(transformer, mode=args.compile_mode, backend=args.compile_backend)} "
                    "transformer blocks (torch.compile; kernels build during the first steps)")
    transformer.train()

    # --- optimizer ---------------------------------------------------------------------------------------------
    params = trainable_parameters(transformer)
    optimizer = build_optimizer(params, args.optimizer, learning_rate=args.learning_rate,
                                weight_decay=args.adam_weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                                eps=args.adam_epsilon, optimizer_args=args.optimizer_kwargs)

    # --- data --------------------------------------------------------------------------------------------------
    dataset = build_dataset(dataset_name, image_column=args.image_column, video_column=args.video_column,
                            caption_column=args.caption_column)
    comps.vae.to(accelerator.device)
    comps.text_encoder.to(accelerator.device)
    concept = concept_of_run(args, dataset)
    preservation = None
    if args.preserve_prompt_list or args.preserve_dataset:  # earlier concepts: encoded now, generated after prepare
        preservation = Preservation.setup(accelerator, args, comps, buckets, sampling, base_checkpoint(args),
                                          offload=offload_activations_for(args), log=logger.info)
    cache = make_latent_cache(accelerator, args, comps, dataset, buckets) if args.cache_dir else None
    loader = BucketedLoader(dataset, buckets, batch_size=args.train_batch_size, seed=args.seed,
                            shuffle=args.shuffle_buffer_size > 0, shuffle_buffer=max(1, args.shuffle_buffer_size),
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            frame_stride=args.frame_stride, decode_threads=args.decode_threads,
                            skip_decode=cached_latents(cache), num_workers=args.dataloader_num_workers)
    encoder = BatchEncoder(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                           max_sequence_length=args.max_sequence_length, cache=cache, device=accelerator.device)

    # --- lr scheduler ------------------------------------------------------------------------------------------
    max_train_steps = args.max_train_steps
    if max_train_steps is None:
        counter = BucketedLoader(dataset, buckets, batch_size=args.train_batch_size, seed=args.seed,
                                 shuffle=False, rank=accelerator.process_index, world_size=accelerator.num_processes,
                                 frame_stride=args.frame_stride)  # a throwaway loader: its skip counts stay out of the log
        per_epoch = max(gather_object([counter.count_batches()]))
        max_train_steps = args.num_train_epochs * max(1, math.ceil(per_epoch / args.gradient_accumulation_steps))
    # accelerate steps a prepared scheduler once per process per optimizer step: scale as diffusers' examples do.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes, num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    # --- prepare -----------------------------------------------------------------------------------------------
    transformer, optimizer, lr_scheduler = distributed.prepare(
        accelerator, engine, transformer, optimizer, lr_scheduler, place_model=not args.blocks_to_swap
    )
    if engine.sharded:
        local, total = distributed.local_base_bytes(transformer)
        logger.info(f"FSDP2: this process holds {local:,} of the {total:,} bytes of the frozen base "
                    f"({format_bytes(local)} of {format_bytes(total)})", main_process_only=False)
    register_slice_hooks(accelerator, transformer)
    progress = TrainingProgress(loader, process_index=accelerator.process_index,
                                num_processes=accelerator.num_processes, gather=gather_object)
    accelerator.register_for_checkpointing(progress)
    if accelerator.is_main_process and args.report_to != "none":
        init_kwargs = {"wandb": {"dir": str(output_dir), "name": args.tracker_run_name}} if args.report_to == "wandb" else {}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args), init_kwargs=init_kwargs)

    if resume is not None:
        logger.info(f"resuming from {resume}")
        accelerator.load_state(str(resume))
    elif args.resume_from_checkpoint:
        logger.info(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint in {output_dir}, starting fresh")
    global_step = progress.global_step
    if preservation is not None:
        preservation.generate(accelerator, transformer)

    # --- training loop -----------------------------------------------------------------------------------------
    offload_activations = offload_activations_for(args)
    progress_start = global_step
    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"training {max_train_steps} steps from step {global_step}: {global_batch} samples per step "
                f"({accelerator.num_processes} process(es) x batch {args.train_batch_size} x "
                f"{args.gradient_accumulation_steps} accumulation)")
    validation = ValidationSettings(args.validation_num_frames, args.validation_height, args.validation_width,
                                    args.validation_num_inference_steps, args.validation_guidance_scale,
                                    args.max_sequence_length, args.seed, args.validation_fps)
    result = {"losses": [], "preservation_losses": [], "timesteps": [], "samples": [], "output_dir": str(output_dir),
              "preservation": preservation_summary(preservation)}
    batches = infinite_batches(loader)
    bar = tqdm(total=max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    while global_step < max_train_steps:
        start = time.perf_counter()
        step_loss = torch.zeros((), device=accelerator.device)
        preserve_loss = torch.zeros((), device=accelerator.device)
        for micro in range(args.gradient_accumulation_steps):
            epoch, batch = next(batches)
            with accelerator.accumulate(transformer):
                if preservation is not None:  # its own forward and backward; the main backward syncs both
                    ploss = preservation.backward(accelerator, transformer, global_step, micro)
                    preserve_loss += accelerator.reduce(ploss, "mean") / args.gradient_accumulation_steps
                latents, prompt_embeds = encoder(batch)
                noise, sigmas = draw_noise_and_sigmas(latents, batch["ids"], seed=args.seed,
                                                      step=(global_step, micro), sampling=sampling)
                with offload_activations() as offloaded:
                    loss = flow_matching_step(transformer, latents, prompt_embeds, noise, sigmas,
                                              args.weighting_scheme)
                if offloaded is not None and global_step == progress_start and micro == 0:
                    logger.info(f"activation offload: {format_bytes(offloaded.packed_bytes)} of saved activations "
                                f"per micro-batch kept in CPU memory until backward")
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = distributed.clip_slice_gradients(accelerator, engine, params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += accelerator.reduce(loss.detach(), "mean") / args.gradient_accumulation_steps
            result["timesteps"].extend(fm.sigma_to_timestep(sigmas).tolist())
        global_step += 1
        progress.global_step = global_step
        step_time = time.perf_counter() - start
        logs = {"loss": step_loss.item(), "lr": lr_scheduler.get_last_lr()[0], "step_time": step_time,
                "samples_per_sec": global_batch / step_time, "epoch": epoch}
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        if preservation is not None:
            logs["preservation_loss"] = preserve_loss.item()
            result["preservation_losses"].append(logs["preservation_loss"])
        result["losses"].append(logs["loss"])
        accelerator.log(logs, step=global_step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")

        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, logger, run=run)
        if (args.validation_prompts and args.validation_steps and global_step % args.validation_steps == 0
                and global_step < max_train_steps and accelerator.is_main_process):
            result["samples"] += run_validation(accelerator, transformer, comps, args, validation, global_step)
    bar.close()

    # --- final save --------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    result["skipped"] = summarize_data(loader)
    if result["losses"]:
        k = max(1, len(result["losses"]) // 10)
        logger.info(f"loss: {sum(result['losses'][:k]) / k:.4f} over the first {k} step(s) -> "
                    f"{sum(result['losses'][-k:]) / k:.4f} over the last {k}")
    outputs = {}
    if accelerator.is_main_process:  # the slice values are whole on every process, also under FSDP2
        outputs["slice"] = str(save_slice(accelerator.unwrap_model(transformer), output_dir, concept))
        if args.validation_prompts:
            result["samples"] += run_validation(accelerator, transformer, comps, args, validation, global_step)
        accelerator.log({"data/skipped_files": sum(result["skipped"].values())}, step=global_step)
        if (checkpoints := list_checkpoints(output_dir)):
            outputs["checkpoint"] = str(checkpoints[-1])
    wandb_dir = tracker_dir(accelerator)
    # Release DDP and the process group while every process is still alive (a late rank can hang in teardown);
    # this also frees the training copy before the merge reads the base from disk.
    accelerator.wait_for_everyone()
    del transformer, optimizer, lr_scheduler, params
    comps.transformer = None
    accelerator.free_memory()  # drops accelerate's references to them, after its own collection ran
    free_memory()  # so collect (cycles) and empty the accelerator's cache once more: diffusers' training_utils
    accelerator.end_training()
    if accelerator.is_main_process and args.save_merged:
        outputs["merged"] = str(save_merged(comps.source, outputs["slice"], output_dir, rebuild_base=comps.reload))
    if accelerator.is_main_process:
        if result["samples"]:
            outputs["samples"] = str(Path(result["samples"][-1]).parent)
        if wandb_dir:
            outputs[args.report_to] = wandb_dir
        print_outputs(outputs, output_dir)
    result.update(outputs=outputs, global_step=global_step)
    return result


def offload_activations_for(args):
    """The context each training forward runs in: activation offload to CPU, or nothing."""
    return offload_saved_activations if args.gradient_checkpointing_cpu_offload else nullcontext


def make_demo_corpus(accelerator, output_dir: Path, seed: int) -> str:
    """--generate_demo_corpus: captioned images and short videos in OUTPUT_DIR/demo_corpus (kept across runs)."""
    folder = output_dir / DEMO_CORPUS_SUBDIR
    if accelerator.is_main_process and not (folder / "metadata.jsonl").is_file():
        from slice_ft.corpus import generate_corpus

        records = generate_corpus(folder, num_images=8, num_videos=8, size=[(48, 32), (32, 48)], num_frames=(5, 9),
                                  seed=seed)
        logger.info(f"generated a demo corpus of {len(records)} captioned images and videos in {folder}")
    accelerator.wait_for_everyone()
    return str(folder)


def make_latent_cache(accelerator, args, comps, dataset, buckets) -> LatentCache:
    """Encode every sample not cached yet (main process), then free the encoders (or park them for validation)."""
    dtype = "float32" if args.mixed_precision == "no" else str(DTYPES[args.mixed_precision]).removeprefix("torch.")
    cache = LatentCache(args.cache_dir, {
        "vae": comps.identity["vae"], "text_encoder": comps.identity["text_encoder"],
        "max_sequence_length": args.max_sequence_length, "dtype": dtype, "frame_stride": args.frame_stride,
    })
    if accelerator.is_main_process:
        every_item = BucketedLoader(dataset, buckets, batch_size=1, shuffle=False, frame_stride=args.frame_stride,
                                    skip_decode=cached_latents(cache))
        counts = cache.precompute(every_item.iter_items(), comps.vae, comps.text_encoder, comps.tokenizer,
                                  device=accelerator.device, progress=True)
        logger.info(f"latent cache {args.cache_dir}: {counts}")
    accelerator.wait_for_everyone()
    if args.validation_prompts:  # the validation pipeline needs them again
        comps.vae.to("cpu")
        comps.text_encoder.to("cpu")
    else:
        free_encoders(comps)
    return cache


def cached_latents(cache):
    """The loader's skip_decode: media whose latents are cached at the bucket's size need no decoding."""
    if cache is None:
        return None
    return lambda cid, b: cache.has_latents(cid, num_frames=b.num_frames, height=b.height, width=b.width)


def summarize_data(loader) -> dict:
    """Skip counts of every process, summed and logged."""
    stats = gather_object([loader.stats.as_dict()])
    skipped: dict = {}
    for s in stats:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    logger.info(f"data: {sum(s['yielded_items'] for s in stats)} samples used; skipped {sum(skipped.values())} "
                f"unusable files (counted once per epoch){': ' + str(skipped) if skipped else ''}")
    return skipped


def run_validation(accelerator, transformer, comps, args, settings, step) -> list[str]:
    """Render the validation prompts with the current slice; log them as videos when W&B is the tracker."""
    model = accelerator.unwrap_model(transformer)
    paths = render_validation(model, vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                              scheduler=comps.scheduler, prompts=args.validation_prompts, output_dir=args.output_dir,
                              step=step, settings=settings, device=accelerator.device,
                              expand_timesteps=comps.expand_timesteps, autocast=accelerator.autocast)
    log_videos(accelerator, paths, args.validation_prompts, step)
    logger.info(f"validation samples: {', '.join(map(str, paths))}")
    return [str(p) for p in paths]


def tracker_dir(accelerator) -> str | None:
    """Where the tracker writes (the W&B run folder, or the TensorBoard log dir)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "wandb":
            return str(Path(tracker.run.dir).parent)
        if tracker.name == "tensorboard":
            return str(tracker.logging_dir)
    return None


def print_outputs(outputs: dict, output_dir: Path) -> None:
    print(f"\nslice-ft: outputs in {output_dir}")
    for name, path in outputs.items():
        print(f"  {name:<12} {path}")


if __name__ == "__main__":
    exit_on_input_error(main, ARGS, debug=ARGS.debug)
