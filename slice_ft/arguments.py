"""The trainer's command line: every flag with its help, YAML configs (`--config`), and the checks that need no
model. Imports nothing heavy: `train_slice_ft.py --help` and flag errors answer before the model stack loads.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .choices import (COMPILE_MODES, LR_SCHEDULERS, OPTIMIZERS, PRESERVATION_LOSSES, SAMPLING_METHODS, TINY,
                      TINY_MAX_SEQUENCE_LENGTH, WEIGHTING_SCHEMES)
from .concepts import check_concept_args, slice_id_arg
from .config import parse_args_with_config

DESCRIPTION = """Fully fine-tune a deterministic slice of a Wan video transformer (diffusers' `WanTransformer3DModel`).

    accelerate launch train_slice_ft.py --config configs/wan2.1_t2v_1.3b.yaml [--flag value ...]
    python train_slice_ft.py --config configs/demo.yaml        # tiny embedded Wan, generated corpus, CPU, offline
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None,
                   help="YAML file whose keys are flag names (e.g. configs/demo.yaml); flags on the command line win.")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Required. Local diffusers Wan pipeline folder (transformer/, vae/, text_encoder/, tokenizer/, "
                        "scheduler/), or 'tiny' for tiny random Wan components built in memory (tests and the demo; "
                        "never a default).")
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
                        "the GPU on use (needs --gradient_checkpointing; one process only, not under FSDP).")
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
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Autocast dtype for the forward pass (the slice values stay float32). Default: the accelerate "
                        "config's mixed_precision (accelerate launch), else no.")

    g = p.add_argument_group("slice")
    g.add_argument("--slice_fraction", "--ff", type=float, default=0.001,
                   help="Share of the block weights to train, in (0, 1] (musubi's --ff).")
    g.add_argument("--slice_id", "--ffid", type=slice_id_arg, default=0,
                   help="Which disjoint slice to train, in [0, floor(1/fraction)) (musubi's --ffid), or 'auto': the "
                        "lowest id that shares no weight with a slice merged into the base (from its concept ledger). "
                        "On a base with slices merged in, the new slice takes their tile order, so ids stay disjoint.")
    g.add_argument("--slice_seed", type=int, default=0,
                   help="Selection seed: the same model, fraction, id and seed always select the same weights.")
    g.add_argument("--lossless_for", choices=["comfy", "wan2gp", "musubi", "diffusers"], default=None,
                   help="Leave out the parameters this program cannot take from a LoRA file (comfy/wan2gp: the "
                        "modulation table; musubi: all but the blocks' Linear weights; diffusers: norms, modulation), "
                        "so scripts/export_lora.py --format X is lossless. Merged outputs carry everything anyway.")

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
    g.add_argument("--timestep_sampling", type=str, default="shift", choices=SAMPLING_METHODS,
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
    g.add_argument("--weighting_scheme", type=str, default="none", choices=WEIGHTING_SCHEMES,
                   help="Per-sample loss weighting (SD3's sigma_sqrt, cosmap).")

    g = p.add_argument_group("concepts and preservation (stacking concepts: README 'Stacking concepts')")
    g.add_argument("--concept_prompts", type=str, nargs="+", default=None,
                   help="What this slice learns, recorded in its folder's concept ledger (concept.json) and in every "
                        "file it is merged into: a text file with one prompt per line, or the prompts. Default: up "
                        "to 32 of the training captions, sampled deterministically.")
    g.add_argument("--preserve_prompts", type=str, nargs="+", default=None,
                   help="Keep these earlier concepts while training (a text file with one prompt per line, or the "
                        "prompts): before the first step the frozen model samples --preserve_samples latent clips "
                        "for them, and every step adds a preservation batch of those clips.")
    g.add_argument("--preserve_previous", action="store_true",
                   help="Preserve every concept the base's ledger records (a file merged by slice-ft), with no data: "
                        "the usual way to stack a concept on a merged model (with --ffid auto).")
    g.add_argument("--preserve_dataset", type=str, nargs="+", default=None,
                   help="Real clips of earlier concepts (folders or dataset names, as --dataset_name), encoded once "
                        "and used as a separate preservation batch (not mixed into the main batch).")
    g.add_argument("--preserve_samples", type=int, default=32,
                   help="How many clips to generate for the preservation prompts (cycled over the prompts), at the "
                        "first bucket resolution and the largest bucket frame count.")
    g.add_argument("--preserve_batch_size", type=int, default=None,
                   help="Preservation clips per micro-batch and process (default: --train_batch_size).")
    g.add_argument("--preserve_weight", type=float, default=1.0, help="Weight of the preservation loss.")
    g.add_argument("--preserve_loss", type=str, default="distill", choices=PRESERVATION_LOSSES,
                   help="distill: match the frozen model's prediction (the same transformer with the slice disabled; "
                        "no second copy); flow: the plain flow-matching loss on the clips (no teacher forward).")
    g.add_argument("--preserve_num_inference_steps", type=int, default=20,
                   help="Euler steps of the preservation clips' sampling (latents only, no VAE, no guidance).")

    g = p.add_argument_group("checkpoints and outputs")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save OUTPUT_DIR/checkpoint-N (slice, optimizer, scheduler, RNG, data position) every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest' (the newest complete checkpoint in OUTPUT_DIR, or a fresh start) or a checkpoint "
                        "folder. A checkpoint written with other training settings (data, model, slice, optimizer, "
                        "seed, ...) is refused, naming the differences. Without it, checkpoints of an earlier run in "
                        "OUTPUT_DIR are moved to OUTPUT_DIR/previous_runs/ (never deleted).")
    g.add_argument("--force_resume", action="store_true",
                   help="Resume even from a checkpoint whose recorded training settings differ from this run's (the "
                        "differences are logged).")
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
    g.add_argument("--debug", action="store_true",
                   help="Show the Python traceback of an error (default: one line `error: ...`, exit status 2).")

    args = parse_args_with_config(p, argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Errors that need no model: each names the flag, its value and the fix."""
    if not args.pretrained_model_name_or_path:
        raise ValueError(
            "no model: pass --pretrained_model_name_or_path DIR (a local diffusers Wan pipeline folder, e.g. "
            "models/Wan2.1-T2V-1.3B-Diffusers; its VAE and text encoder are used), optionally with --transformer_file "
            "FILE for the transformer weights; '--pretrained_model_name_or_path tiny' trains a tiny random model "
            "(tests and demo only)")
    check_concept_args(args)  # prompt flags, the base's ledger, --ffid auto: before any model is loaded
    check_slice_flags(args.slice_fraction, args.slice_id)
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
    if args.mixed_precision is None:  # accelerate's own default: the launch config's, exported by accelerate launch
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if args.base_dtype is None:
        args.base_dtype = "bf16" if args.mixed_precision == "bf16" else "fp32"
    if args.max_sequence_length is None:
        args.max_sequence_length = TINY_MAX_SEQUENCE_LENGTH if args.pretrained_model_name_or_path == TINY else 512
    from . import distributed  # imports torch: only once the flags themselves are valid

    if (conflict := distributed.engine_conflicts(args, distributed.requested_engine())):
        raise ValueError(conflict)


# Flags that do not change what a run trains (memory, speed, logging, when to save or stop, where to write): a
# checkpoint's run identity is every other flag, so a new flag counts as part of it unless it is listed here.
NOT_RUN_IDENTITY = frozenset({
    "config", "blocks_to_swap", "gradient_checkpointing", "gradient_checkpointing_cpu_offload", "decode_threads",
    "dataloader_num_workers", "compile", "compile_backend", "compile_mode",
    "cache_dir", "output_dir", "max_train_steps", "num_train_epochs", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "force_resume", "save_merged", "report_to", "tracker_project_name", "tracker_run_name",
    "wandb_mode", "logging_dir", "validation_prompts", "validation_steps", "validation_num_frames",
    "validation_height", "validation_width", "validation_num_inference_steps", "validation_guidance_scale",
    "validation_fps", "debug", "optimizer_kwargs", "base_ledger", "slice_id_auto",
})
_PATH_FLAGS = ("pretrained_model_name_or_path", "transformer_file", "transformer_config", "dataset_name")


def run_settings(args: argparse.Namespace) -> dict:
    """The run's identity, recorded in each checkpoint: the settings that change what is trained (data, model,
    slice, optimizer, schedule, seeds), local paths made absolute, as JSON values."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in NOT_RUN_IDENTITY:
            continue
        if key in _PATH_FLAGS and value is not None:
            value = [_absolute(v) for v in value] if isinstance(value, (list, tuple)) else _absolute(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))  # tuples -> lists, as they come back from run.json


def _absolute(value: str) -> str:
    return os.path.abspath(value) if value != TINY and os.path.exists(value) else value


def check_inputs(args: argparse.Namespace) -> None:
    """Errors about the files and folders the flags name (before anything loads): a mistyped path is called a path
    that does not exist, not a model or dataset the Hub cannot find."""
    model = args.pretrained_model_name_or_path
    if model != TINY:
        if os.path.isfile(model):
            raise ValueError(f"--pretrained_model_name_or_path {model!r} is a file; pass the diffusers pipeline folder "
                             "(a single transformer file goes to --transformer_file, with the pipeline folder here for "
                             "the VAE and text encoder)")
        if not os.path.isdir(model):
            raise ValueError(f"--pretrained_model_name_or_path {model!r}: {_no_such_folder(model)}. Pass a local "
                             "diffusers Wan pipeline folder (training reads models from disk only; get one with e.g. "
                             "`hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir models/Wan2.1-T2V-1.3B-Diffusers`)")
    if args.transformer_file and not os.path.isfile(args.transformer_file):
        what = "is a folder" if os.path.isdir(args.transformer_file) else _no_such_file(args.transformer_file)
        raise ValueError(f"--transformer_file {args.transformer_file!r} {what}; pass a .safetensors (or .pt/.ckpt) "
                         "transformer checkpoint file")
    config = args.transformer_config
    if config and _looks_like_path(config) and not os.path.exists(config):
        raise ValueError(f"--transformer_config {config!r}: {_no_such_file(config)}; pass a config.json, a folder "
                         "holding one, or a published name (wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.2-t2v-a14b, "
                         "wan2.2-ti2v-5b)")
    for name in args.dataset_name or ():
        if os.path.isdir(name):
            continue
        if os.path.isfile(name):
            raise ValueError(f"--dataset_name {name!r} is a file; pass the folder holding the images/videos")
        if _looks_like_path(name):
            raise ValueError(f"--dataset_name {name!r}: {_no_such_folder(name)}; pass an existing folder of "
                             "captioned images/videos (or a `datasets` Hub name such as user/dataset)")
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ValueError(f"--dataset_name {name!r}: {_no_such_folder(name)}, and HF_HUB_OFFLINE is set, so it "
                             "cannot be a Hub dataset either; pass an existing folder (or unset HF_HUB_OFFLINE)")
    if os.path.isfile(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir!r} is a file; pass a folder (it is created if missing)")


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path: absolute, relative with ./ or ~, several folders deep, or inside an
    existing folder (a Hub name is `owner/name`)."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or ("/" in name and os.path.isdir(os.path.dirname(name))))


def _no_such_folder(path: str) -> str:
    return _no_such(path, "folder")


def _no_such_file(path: str) -> str:
    return _no_such(path, "file")


def _no_such(path: str, kind: str) -> str:
    """'no such folder', with the closest names of the parent folder when it exists."""
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    message = f"no such {kind}"
    if os.path.isdir(parent):
        close = difflib.get_close_matches(os.path.basename(os.path.normpath(path)), os.listdir(parent), n=3)
        if close:
            message += f" (in {parent!r}: did you mean {', '.join(map(repr, close))}?)"
    return message


def check_slice_flags(fraction: float, slice_id: int) -> None:
    """--ff and --ffid, checked as the selection reads them (exact rationals), with the flags named."""
    from slice_adapter.selection import num_slices_for

    try:
        count = num_slices_for(fraction)
    except ValueError:
        raise ValueError(f"--ff (--slice_fraction) must be in (0, 1], got {fraction!r}: the share of the block "
                         "weights to train, e.g. 0.001 for 0.1%") from None
    if not 0 <= slice_id < count:
        raise ValueError(f"--ffid (--slice_id) must be in [0, {count - 1}]: --ff {fraction} defines {count} disjoint "
                         f"slices, got {slice_id}")


def check_slice_selects(plan, fraction: float, slice_id: int, seed: int) -> None:
    """A slice that selects no weight of this model (--ff too small) is refused, with the smallest usable --ff."""
    if plan.selected:
        return
    import math

    from slice_adapter.selection import smallest_fraction

    least = smallest_fraction(plan.layouts.values(), seed)
    if least is None:
        raise ValueError("the model has no parameter the slice can target (no transformer blocks); pass a Wan model")
    exponent = math.floor(math.log10(least)) - 1  # two significant digits, rounded up so the value still selects
    usable = math.ceil(least / 10 ** exponent) * 10 ** exponent
    raise ValueError(f"--ff {fraction:g} (--ffid {slice_id}) selects no weight of this model ({plan.targeted:,} "
                     f"targeted weights): the smallest --ff that selects one is {usable:.2g} (for --ffid 0, "
                     f"--slice_seed {seed}); real runs use 0.001 or more")


def parse_optimizer_args(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (musubi-tuner's --optimizer_args) -> keyword arguments; values are Python literals,
    anything else is kept as a string. Mappings (from a YAML config) are taken as they are."""
    kwargs: dict[str, Any] = {}
    for item in items or ():
        if isinstance(item, Mapping):  # a YAML config may give a mapping
            kwargs.update(item)
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--optimizer_args item {item!r} is not key=value; write e.g. --optimizer_args "
                             "min_8bit_size=0 \"betas=(0.9,0.99)\"")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    return kwargs
