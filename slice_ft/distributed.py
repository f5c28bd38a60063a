"""Multi-process engines: which one `accelerate launch` asked for, and FSDP2 sharding of the frozen base.

- `single` / `ddp`: accelerate's own `prepare` (DDP all-reduces only the slice gradients; every process holds the
  whole base).
- `fsdp2` (`configs/accelerate/fsdp.yaml`, `fsdp_version: 2`): the trainer shards the frozen base itself with
  `torch.distributed.fsdp.fully_shard`, one unit per `WanTransformerBlock` plus the root, on the CPU (gloo) as on
  GPUs. accelerate (1.15) selects FSDP only on accelerators: without a GPU it would silently run DDP, and its FSDP2
  `prepare` moves the whole model to each device before wrapping. So accelerate is built as a plain multi-process
  accelerator (process group, device, autocast, accumulation, checkpoint files) and never wraps the model.
  The slice values (0.1% of the model at `--ff 0.001`) are left out of the shards (`ignored_params`): every process
  holds them whole, their gradients are averaged over the processes before clipping, so clipping and the logged
  grad norm are global, and the saved slice and checkpoints are exactly the single-process ones.
- DeepSpeed is refused (see the README): ZeRO-2 would not shard the frozen base, DeepSpeed casts the whole module to
  one dtype, and it is not a dependency of this project; FSDP2 is the sharded engine.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

FSDP = "fsdp2"
DDP = "ddp"
SINGLE = "single"
BLOCK_CLASS = "WanTransformerBlock"


@dataclass(frozen=True)
class Engine:
    """The engine `accelerate launch` asked for (from the environment its config file sets)."""

    name: str = SINGLE
    fsdp_version: Optional[int] = None
    reshard_after_forward: bool = True
    world_size: int = 1

    @property
    def sharded(self) -> bool:
        return self.name == FSDP

    def describe(self) -> str:
        if self.sharded:
            return f"FSDP2 ({self.world_size} process(es), frozen base sharded per {BLOCK_CLASS} + root)"
        return f"DDP ({self.world_size} processes)" if self.name == DDP else "one process"


def _flag(environ, name: str) -> bool:
    return str(environ.get(name, "false")).lower() in ("1", "true", "yes")


def requested_engine(environ: Optional[dict] = None) -> Engine:
    """The engine in `environ` (default `os.environ`): accelerate launch exports a config's distributed_type."""
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if _flag(environ, "ACCELERATE_USE_DEEPSPEED"):
        return Engine("deepspeed", world_size=world_size)
    if _flag(environ, "ACCELERATE_USE_FSDP"):
        return Engine(FSDP if environ.get("FSDP_VERSION", "1") == "2" else "fsdp1",
                      fsdp_version=int(environ.get("FSDP_VERSION", "1")),
                      reshard_after_forward=str(environ.get("FSDP_RESHARD_AFTER_FORWARD", "true")).lower()
                      in ("true", "full_shard", "1"),
                      world_size=world_size)
    return Engine(DDP if world_size > 1 else SINGLE, world_size=world_size)


def engine_conflicts(args, engine: Engine, environ: Optional[dict] = None) -> Optional[str]:
    """The first flag/config combination `engine` cannot run, as one message naming the conflict and the fix."""
    environ = os.environ if environ is None else environ
    if engine.name == "deepspeed":
        return ("the accelerate config asks for DeepSpeed, which slice-ft does not support (ZeRO-2 keeps the whole "
                "frozen base on every GPU, and DeepSpeed casts the whole module, slice values and fp8 base included, "
                "to one dtype); use configs/accelerate/fsdp.yaml (FSDP2 shards the frozen base) or "
                "configs/accelerate/multi_gpu_ddp.yaml")
    if engine.name == "fsdp1":
        base = f"a {args.base_dtype} base" if getattr(args, "base_dtype", None) else "this base"
        return (f"fsdp_version: {engine.fsdp_version} (FSDP1) cannot train a slice: it flattens each unit into one "
                f"tensor, so {base} with float32 slice values fails ('Must flatten tensors with uniform dtype'), "
                "and its norm slices never get a gradient; set fsdp_version: 2 in the accelerate config "
                "(configs/accelerate/fsdp.yaml)")
    if not engine.sharded:
        return None
    if getattr(args, "blocks_to_swap", 0):
        return (f"--blocks_to_swap {args.blocks_to_swap} cannot run under FSDP: block swap streams whole blocks from "
                "CPU memory, FSDP already keeps only a shard of each block per GPU and gathers it on use; drop "
                "--blocks_to_swap (more processes shard the base finer) or train in one process without FSDP")
    if getattr(args, "validation_prompts", None):
        return (f"--validation_prompts under FSDP: a sharded transformer renders only with every process in step, "
                "which WanPipeline does not do; drop --validation_prompts and render OUTPUT_DIR/slice afterwards in "
                "one process (or train with configs/accelerate/multi_gpu_ddp.yaml)")
    if _flag(environ, "FSDP_OFFLOAD_PARAMS"):
        return ("fsdp_offload_params: true is not supported by the trainer's FSDP2 sharding; set it to false "
                "(more processes shard the base finer)")
    if _flag(environ, "FSDP_ACTIVATION_CHECKPOINTING"):
        return ("fsdp_activation_checkpointing: true: use the trainer's --gradient_checkpointing instead (it "
                "checkpoints each WanTransformerBlock, also under FSDP) and set it to false in the accelerate config")
    wrap = environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if wrap and wrap != BLOCK_CLASS:
        return (f"fsdp_transformer_layer_cls_to_wrap: {wrap}: the trainer shards one unit per {BLOCK_CLASS}; set "
                f"fsdp_transformer_layer_cls_to_wrap: {BLOCK_CLASS}")
    return None


@contextlib.contextmanager
def _accelerate_without_fsdp(engine: Engine):
    """While accelerate builds its state: hide the FSDP request, so it runs as plain multi-process (we shard)."""
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    if engine.sharded:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def make_accelerator(engine: Engine, **kwargs):
    """accelerate's `Accelerator` for `engine`; on a machine without GPUs its processes join over gloo."""
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available() and (engine.world_size > 1 or engine.sharded)
    with _accelerate_without_fsdp(engine):
        accelerator = Accelerator(cpu=cpu, **kwargs)
    if engine.sharded and not torch.distributed.is_initialized():
        raise ValueError("FSDP needs a process group: start the trainer with accelerate launch --config_file "
                         "configs/accelerate/fsdp.yaml (or torchrun)")
    return accelerator


def slice_value_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every slice value of every adapter (what stays out of the FSDP shards)."""
    return [p for n, p in model.named_parameters() if ".slice_values." in n]


def shard_model(model: torch.nn.Module, engine: Engine, device: torch.device) -> torch.nn.Module:
    """FSDP2: shard the frozen base of `model` in place, one unit per WanTransformerBlock, then the root.

    Call it with the model still on the CPU: `fully_shard` moves one unit at a time to `device` and keeps only this
    process's shard, so no device ever holds more than its shard plus one block. The slice values are not sharded
    (moved whole to `device`; see `sync_slice_gradients`). Parameter names are unchanged (FSDP2 wraps nothing).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    values = slice_value_parameters(model)
    for p in values:
        p.data = p.data.to(device)  # the optimizer keeps the same Parameter objects
    ignored = set(values)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    blocks = [m for m in model.modules() if type(m).__name__ == BLOCK_CLASS]
    if not blocks:
        raise ValueError(f"FSDP: the transformer has no {BLOCK_CLASS} to shard ({type(model).__name__})")
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=engine.reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=engine.reshard_after_forward, ignored_params=ignored)
    # The transformer returns a view (unpatchify); the trainer only reads it (the loss), never edits it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


def prepare(accelerator, engine: Engine, model, optimizer, lr_scheduler, *, place_model: bool = True):
    """`accelerator.prepare` for the engine: FSDP2 shards the model here and prepares only optimizer and scheduler."""
    if not engine.sharded:
        return accelerator.prepare(model, optimizer, lr_scheduler, device_placement=[place_model, True, True])
    model = shard_model(model, engine, accelerator.device)
    # What accelerate's prepare_model would add: the forward under the mixed-precision autocast.
    model.forward = accelerator.autocast()(model.forward)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    return model, optimizer, lr_scheduler


def sync_slice_gradients(engine: Engine, params: Iterable[torch.nn.Parameter]) -> None:
    """FSDP2: average the slice gradients over the processes (they are outside the shards, so FSDP leaves them
    local). One all-reduce of all gradients flattened: the slice is small. A no-op for the other engines."""
    if not engine.sharded or torch.distributed.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_slice_gradients(accelerator, engine: Engine, params: list, max_norm: float) -> torch.Tensor:
    """Synchronize the slice gradients, clip them by their global norm (0 or None: no clipping) and return it."""
    sync_slice_gradients(engine, params)
    return accelerator.clip_grad_norm_(params, max_norm or float("inf"))


def local_base_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the frozen base this process holds, bytes of the whole frozen base): sharded or not."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for name, p in model.named_parameters():
        if ".slice_values." in name:
            continue
        size = p.element_size()
        total += p.numel() * size
        local += (p.to_local().numel() if isinstance(p, DTensor) else p.numel()) * size
    return local, total
