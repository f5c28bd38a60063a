#!/usr/bin/env python
"""Fully fine-tune a deterministic slice of a Wan video transformer (diffusers' `WanTransformer3DModel`).

    accelerate launch train_slice_ft.py --config configs/wan2.1_t2v_1.3b.yaml [--flag value ...]
    python train_slice_ft.py --config configs/demo.yaml        # tiny embedded Wan, generated corpus, CPU, offline

The recipe, in diffusers' order: accelerator -> frozen models -> slice adapter -> optimizer -> data -> lr scheduler
-> accelerator.prepare -> loop under accelerator.accumulate -> checkpoints / validation -> final save.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, gather_object, set_seed,
)
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

import slice_adapter
from slice_adapter import SliceConfig
from slice_adapter.report import format_bytes
from slice_ft import flow_matching as fm
from slice_ft.checkpointing import (
    TrainingProgress, full_parameters, list_checkpoints, register_slice_hooks, resolve_resume, save_checkpoint,
)
from slice_ft.compile import COMPILE_MODES, check_compile_works, compile_blocks
from slice_ft.components import TINY, DTYPES, load_components, spatial_multiple
from slice_ft.config import parse_args_with_config
from slice_ft.data import BucketConfig, BucketedLoader, build_dataset
from slice_ft.encoding import LatentCache, free_encoders
from slice_ft.offload import offload_saved_activations
from slice_ft.outputs import save_merged, save_slice
from slice_ft.training import (
    OPTIMIZERS, BatchEncoder, SigmaSampling, build_optimizer, draw_noise_and_sigmas, flow_matching_step,
    parse_optimizer_args, timestep_bounds, trainable_parameters,
)
from slice_ft.validation import ValidationSettings, log_videos, render_validation, validation_settings_check

logger = get_logger(__name__)

DEMO_CORPUS_SUBDIR = "demo_corpus"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None,
                   help="YAML file whose keys are flag names (e.g. configs/demo.yaml); flags on the command line win.")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=TINY,
                   help="Local diffusers Wan pipeline folder (transformer/, vae/, text_encoder/, tokenizer/, "
                        "scheduler/), or 'tiny' for tiny random Wan components built in memory (no download).")
    g.add_argument("--transformer_file", type=str, default=None,
                   help="Single-file transformer checkpoint (original Wan / ComfyUI keys, or diffusers keys, e.g. "
                        "a previous run's merged/ weights to stack another slice); VAE and text encoder still come "
                        "from --pretrained_model_name_or_path.")
    g.add_argument("--transformer_config", type=str, default=None,
                   help="Config for --transformer_file: a config.json, a folder holding one, or a published name "
                        "(wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.2-t2v-a14b, wan2.2-ti2v-5b). Default: the "
                        "pipeline folder's transformer config (tiny: the tiny config).")
    g.add_argument("--expert", type=str, default=None, choices=["high", "low"],
                   help="Wan 2.2 A14B: train the high-noise expert (transformer, t >= boundary) or the low-noise "
                        "expert (transformer_2, t < boundary); timesteps are restricted to that side.")
    g.add_argument("--boundary_ratio", type=float, default=None,
                   help="Expert boundary as a fraction of 1000 timesteps. Default: the pipeline's model_index.json "
                        "(tiny: 0.875).")
    g.add_argument("--base_dtype", type=str, default=None, choices=["bf16", "fp8", "fp32"],
                   help="dtype of the frozen base weights: fp8 stores block Linear weights as float8 e4m3 with a "
                        "per-tensor scale (computes in bf16). Default: bf16 under --mixed_precision bf16, else fp32. "
                        "The slice is float32 either way.")
    g.add_argument("--blocks_to_swap", type=int, default=0,
                   help="Keep the frozen weights of the last N transformer blocks in CPU memory and stream them to "
                        "the GPU on use (needs --gradient_checkpointing; one process only).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute block activations in backward to save memory.")
    g.add_argument("--gradient_checkpointing_cpu_offload", action="store_true",
                   help="Also keep the activations saved between forward and backward (each block's input) in "
                        "pinned CPU memory until backward (musubi-tuner's flag; needs --gradient_checkpointing). "
                        "On Wan 14B at 480x832x81 they are 12.5 GiB per sample.")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block's forward (musubi-tuner's flag); the first steps "
                        "are slow while kernels build. Checked up front: a machine that cannot compile (no C++ "
                        "compiler on CPU, no triton on GPU) stops with a message. Default: eager.")
    g.add_argument("--compile_backend", type=str, default="inductor", help="torch.compile backend (with --compile).")
    g.add_argument("--compile_mode", type=str, default=None, choices=list(COMPILE_MODES),
                   help="torch.compile mode (with --compile); default: torch's default.")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="Autocast dtype for the forward pass (the slice values stay float32).")

    g = p.add_argument_group("slice")
    g.add_argument("--slice_fraction", "--ff", type=float, default=0.001,
                   help="Share of the block weights to train, in (0, 1] (musubi's --ff).")
    g.add_argument("--slice_id", "--ffid", type=int, default=0,
                   help="Which disjoint slice to train, in [0, floor(1/fraction)) (musubi's --ffid).")
    g.add_argument("--slice_seed", type=int, default=0,
                   help="Selection seed: the same model, fraction, id and seed always select the same weights.")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, nargs="+", default=None,
                   help="Local folder of images/videos with captions (metadata.jsonl/.csv or sidecar .txt), or a "
                        "`datasets` hub name you have access to; streamed. Several are used together, e.g. the new "
                        "concept's clips plus some clips of a concept already merged into the model, which keeps "
                        "that one from being forgotten (see the quality study in BENCHMARKS.md).")
    g.add_argument("--generate_demo_corpus", action="store_true",
                   help="Generate a small captioned corpus of images and short videos under "
                        "OUTPUT_DIR/demo_corpus and train on it (when --dataset_name is not given).")
    g.add_argument("--image_column", type=str, default="image", help="Image column of a hub dataset.")
    g.add_argument("--video_column", type=str, default="video", help="Video column of a hub dataset.")
    g.add_argument("--caption_column", type=str, default=None,
                   help="Caption column (default: the first of caption, text, prompt).")
    g.add_argument("--bucket_resolutions", type=str, default="832x480,480x832",
                   help="Aspect-ratio buckets 'WxH,WxH'; each item goes to the nearest aspect ratio, is resized "
                        "and center-cropped. Sizes must be multiples of the VAE stride times the patch size.")
    g.add_argument("--bucket_frame_counts", type=str, default="1,17,33",
                   help="Allowed frame counts (4k+1); a video takes the largest that fits, an image is 1 frame.")
    g.add_argument("--frame_stride", type=int, default=None,
                   help="Take frames this many apart from the middle of a clip (default: spread over the clip).")
    g.add_argument("--shuffle_buffer_size", type=int, default=1000,
                   help="Streaming shuffle buffer; 0 keeps the dataset order.")
    g.add_argument("--decode_threads", type=int, default=0, help="Threads decoding the items of a batch.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="DataLoader worker processes decoding batches ahead of the training step (diffusers' "
                        "flag); resume stays exact. 0: decode in the training process.")
    g.add_argument("--cache_dir", type=str, default=None,
                   help="Precompute VAE latents and text embeddings once into this folder (reused across runs), "
                        "then free the VAE and text encoder; cached media are hashed, not decoded.")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="Text tokens kept (zero-padded), as WanPipeline's max_sequence_length. Default 512 (tiny: 16).")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default="outputs/slice-ft",
                   help="Where checkpoints, samples, logs, the slice and the merged model go.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the data order, noise and timesteps.")
    g.add_argument("--train_batch_size", type=int, default=1, help="Batch size per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Batches accumulated per optimizer step.")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Optimizer steps to run; overrides --num_train_epochs.")
    g.add_argument("--num_train_epochs", type=int, default=1,
                   help="Epochs to run when --max_train_steps is not given.")
    g.add_argument("--optimizer", type=str, default="adamw", choices=OPTIMIZERS,
                   help="adamw (torch), adamw8bit (bitsandbytes) or adafactor (transformers).")
    g.add_argument("--optimizer_args", type=str, nargs="*", default=[],
                   help="Extra optimizer keyword arguments as key=value (values are Python literals), as in "
                        "musubi-tuner: e.g. --optimizer_args min_8bit_size=0 \"betas=(0.9,0.99)\" (in a YAML config, a "
                        "mapping works too).")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="Peak learning rate.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=0.0,
                   help="Weight decay (decays the slice delta towards the base weights).")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                   help="diffusers.optimization.get_scheduler name.")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps of the lr scheduler.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0: no clipping).")

    g = p.add_argument_group("timesteps and loss")
    g.add_argument("--timestep_sampling", type=str, default="shift", choices=fm.SAMPLING_METHODS,
                   help="How sigmas are drawn (musubi-tuner's names).")
    g.add_argument("--discrete_flow_shift", type=float, default=3.0,
                   help="Shift s of sigma' = s*sigma / (1 + (s-1)*sigma) for shift and logit_normal sampling.")
    g.add_argument("--sigmoid_scale", type=float, default=1.0, help="Scale of the normal draw of sigmoid/shift.")
    g.add_argument("--logit_mean", type=float, default=0.0, help="Mean of logit_normal sampling.")
    g.add_argument("--logit_std", type=float, default=1.0, help="Std of logit_normal sampling.")
    g.add_argument("--min_timestep", type=float, default=0, help="Lowest timestep trained, in [0, 1000].")
    g.add_argument("--max_timestep", type=float, default=1000, help="Highest timestep trained, in [0, 1000].")
    g.add_argument("--preserve_distribution_shape", action="store_true",
                   help="Restrict to [min, max] timesteps by rejection instead of rescaling (musubi's flag).")
    g.add_argument("--weighting_scheme", type=str, default="none", choices=fm.WEIGHTING_SCHEMES,
                   help="Per-sample loss weighting (SD3's sigma_sqrt, cosmap).")

    g = p.add_argument_group("checkpoints and outputs")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save OUTPUT_DIR/checkpoint-N (slice, optimizer, scheduler, RNG, data position) every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest' (the newest checkpoint in OUTPUT_DIR, or a fresh start) or a checkpoint folder.")
    g.add_argument("--save_merged", action="store_true",
                   help="Also write OUTPUT_DIR/merged: the full transformer with the slice baked in, in the input's "
                        "key format.")

    g = p.add_argument_group("logging and validation")
    g.add_argument("--report_to", type=str, default="none", choices=["wandb", "tensorboard", "none"],
                   help="accelerate tracker for config, loss, lr, grad norm, step time, samples/s and samples.")
    g.add_argument("--tracker_project_name", type=str, default="slice-ft", help="W&B project / tracker name.")
    g.add_argument("--tracker_run_name", type=str, default=None, help="W&B run name.")
    g.add_argument("--wandb_mode", type=str, default=None, choices=["online", "offline", "disabled"],
                   help="W&B mode when WANDB_MODE is not set in the environment (the demo uses offline).")
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to OUTPUT_DIR.")
    g.add_argument("--validation_prompts", type=str, nargs="*", default=[],
                   help="Prompts rendered to OUTPUT_DIR/samples/step-N-k.mp4 with the current slice.")
    g.add_argument("--validation_steps", type=int, default=0,
                   help="Render the validation prompts every N steps (0: only at the end).")
    g.add_argument("--validation_num_frames", type=int, default=33, help="Frames of a sample (4k+1).")
    g.add_argument("--validation_height", type=int, default=480, help="Sample height.")
    g.add_argument("--validation_width", type=int, default=832, help="Sample width.")
    g.add_argument("--validation_num_inference_steps", type=int, default=30, help="Denoising steps of a sample.")
    g.add_argument("--validation_guidance_scale", type=float, default=5.0, help="Classifier-free guidance scale.")
    g.add_argument("--validation_fps", type=int, default=16, help="Frame rate of the sample mp4s.")

    args = parse_args_with_config(p, argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Errors that need no model: each names the flag, its value and the fix."""
    if not args.dataset_name and not args.generate_demo_corpus:
        raise ValueError("no training data: pass --dataset_name FOLDER_OR_HUB_NAME (or --generate_demo_corpus)")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "num_train_epochs"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.blocks_to_swap and not args.gradient_checkpointing:
        raise ValueError(f"--blocks_to_swap {args.blocks_to_swap} needs --gradient_checkpointing (otherwise every "
                         "swapped block stays loaded until backward and nothing is saved)")
    if args.gradient_checkpointing_cpu_offload and not args.gradient_checkpointing:
        raise ValueError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing (the offloaded "
                         "activations are the checkpointed blocks' inputs); add --gradient_checkpointing")
    args.optimizer_kwargs = parse_optimizer_args(args.optimizer_args)
    if args.base_dtype is None:
        args.base_dtype = "bf16" if args.mixed_precision == "bf16" else "fp32"
    if args.max_sequence_length is None:
        from slice_ft.tiny import TINY_MAX_SEQUENCE_LENGTH

        args.max_sequence_length = TINY_MAX_SEQUENCE_LENGTH if args.pretrained_model_name_or_path == TINY else 512


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
    output_dir = Path(args.output_dir)
    if args.wandb_mode and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = args.wandb_mode

    # --- accelerator -------------------------------------------------------------------------------------------
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        # Every block parameter takes part in a T2V forward (I2V models are refused), so DDP needs no graph search.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        # Without a GPU, accelerate joins the launched processes (gloo) only when told to run on the CPU.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if args.blocks_to_swap and accelerator.num_processes > 1:
        raise ValueError(f"--blocks_to_swap {args.blocks_to_swap} runs in one process only (got "
                         f"{accelerator.num_processes}); drop it or use FSDP (configs/accelerate/fsdp.yaml)")
    if args.validation_prompts and accelerator.distributed_type == DistributedType.FSDP:
        logger.warning("no validation samples under FSDP (a sharded model renders only with every process): render "
                       "them afterwards from OUTPUT_DIR/slice")
        args.validation_prompts = []
    if args.compile:  # before loading anything: a machine that cannot compile says so now
        check_compile_works(accelerator.device, args.compile_backend)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

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
    slice_config = SliceConfig(fraction=args.slice_fraction, slice_id=args.slice_id, seed=args.slice_seed)
    plan = slice_adapter.plan(transformer, slice_config)
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
    transformer, optimizer, lr_scheduler = accelerator.prepare(
        transformer, optimizer, lr_scheduler, device_placement=[not args.blocks_to_swap, True, True]
    )
    register_slice_hooks(accelerator)
    progress = TrainingProgress(loader, process_index=accelerator.process_index,
                                num_processes=accelerator.num_processes, gather=gather_object)
    accelerator.register_for_checkpointing(progress)
    if accelerator.is_main_process and args.report_to != "none":
        init_kwargs = {"wandb": {"dir": str(output_dir), "name": args.tracker_run_name}} if args.report_to == "wandb" else {}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args), init_kwargs=init_kwargs)

    resume = resolve_resume(output_dir, args.resume_from_checkpoint)
    if resume is not None:
        logger.info(f"resuming from {resume}")
        accelerator.load_state(str(resume))
    elif args.resume_from_checkpoint:
        logger.info(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint in {output_dir}, starting fresh")
    global_step = progress.global_step

    # --- training loop -----------------------------------------------------------------------------------------
    offload_activations = offload_saved_activations if args.gradient_checkpointing_cpu_offload else nullcontext
    progress_start = global_step
    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"training {max_train_steps} steps from step {global_step}: {global_batch} samples per step "
                f"({accelerator.num_processes} process(es) x batch {args.train_batch_size} x "
                f"{args.gradient_accumulation_steps} accumulation)")
    validation = ValidationSettings(args.validation_num_frames, args.validation_height, args.validation_width,
                                    args.validation_num_inference_steps, args.validation_guidance_scale,
                                    args.max_sequence_length, args.seed, args.validation_fps)
    result = {"losses": [], "timesteps": [], "samples": [], "output_dir": str(output_dir)}
    batches = infinite_batches(loader)
    bar = tqdm(total=max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    while global_step < max_train_steps:
        start = time.perf_counter()
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(args.gradient_accumulation_steps):
            epoch, batch = next(batches)
            with accelerator.accumulate(transformer):
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
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
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
        result["losses"].append(logs["loss"])
        accelerator.log(logs, step=global_step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")

        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, logger)
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
    with full_parameters(accelerator, transformer):
        if accelerator.is_main_process:
            outputs["slice"] = str(save_slice(accelerator.unwrap_model(transformer), output_dir))
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
    accelerator.free_memory()
    gc.collect()
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
    main(parse_args())
