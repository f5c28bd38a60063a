"""Low-VRAM training of large Wan transformers: block swap and an fp8 frozen base.

Block swap (`enable_block_swap`)
--------------------------------
The last ``blocks_to_swap`` entries of ``transformer.blocks`` keep their *frozen* tensors (base weights, biases,
norms, ``scale_shift_table``, fp8 scales) in CPU memory (pinned when CUDA is available). Each of them is copied to
``device`` just before it runs and dropped right after, and the same happens again when gradient checkpointing
recomputes the block inside backward. The last blocks are the swapped ones, as in musubi-tuner (its offloader starts
with the last ``blocks_to_swap`` blocks on the CPU): they are the first ones backward needs, so the last block can stay
loaded across the forward/backward turn. Unlike musubi, the swapped set is fixed (no rotation): block ``i`` is either
always resident or always swapped, so peak memory is ``num_blocks - blocks_to_swap`` resident blocks plus two swapped
blocks in flight (the one running and the one being prefetched). Frozen weights never change, so their CPU copy
stays valid and a block is never copied back: each load is one host-to-device copy, where musubi-tuner's
``swap_weight_devices`` moves one block to the CPU and another to the GPU on every swap.

* Prefetch: the pre-hook of block ``i`` starts copying block ``i + 1`` (forward) or ``i - 1`` (backward recompute)
  on a side CUDA stream; an event makes the compute stream wait before the block uses it. The direction comes from
  the autograd engine: checkpoint recompute runs inside backward, where the engine's graph-task id is set.
* Adapter tensors (any attribute path component starting with ``slice_``) and every tensor with
  ``requires_grad=True`` never move: they stay on ``device`` so the optimizer (bitsandbytes 8-bit included) and its
  state never see a CPU tensor.
* Autograd safety: loading and evicting *replace* the module's ``Parameter``/buffer objects instead of mutating
  ``.data``. Tensors autograd saved (``F.linear`` saves the weight for the input gradient) keep pointing at the
  device copy, which is freed only when autograd drops it; eviction can therefore never change or free a tensor a
  pending backward needs.
* Training requires gradient checkpointing (``transformer.enable_gradient_checkpointing()``): without it autograd
  would hold every swapped block's device copy until backward, which saves no memory. A swapped block called with
  gradients but without checkpointing raises a ``ValueError``; under ``torch.no_grad()`` (inference) blocks just swap.
* Only plain tensors can be swapped (bf16/fp16/fp32 or the fp8 buffers of `Fp8Linear`); tensor subclasses such as
  bitsandbytes 4-bit weights are refused.

Order in a training script: load on CPU -> ``add_adapter`` -> ``quantize_base_to_fp8`` (optional) ->
``enable_gradient_checkpointing`` -> ``enable_block_swap`` -> build the optimizer -> ``accelerator.prepare`` with
``device_placement=False`` for the transformer (a later ``transformer.to(device)`` would load every block).

Activation offload (`offload_saved_activations`)
-----------------------------------------------
With gradient checkpointing the activations autograd keeps between forward and backward are the blocks' inputs
(the hidden states: 40 x 32,760 tokens x 5,120 x bf16 = 12.5 GiB on Wan 14B at 480x832x81), more than all-blocks-swapped
weights need. Inside this context every tensor autograd saves outside a checkpointed block (the checkpoint inputs
among them; inside a block checkpoint's own hooks take over) is copied to pinned CPU memory at once and copied back
when backward unpacks it: musubi-tuner's ``--gradient_checkpointing_cpu_offload``.

fp8 base (`quantize_base_to_fp8`)
---------------------------------
Frozen ``nn.Linear`` weights of the blocks are stored as ``float8_e4m3fn`` with one float32 scale per tensor
(``scale = amax / 448``) and upcast to their original dtype in the layer's own forward, so a PEFT-style tuner that
calls ``self.base_layer(x)`` keeps working. Norms, biases and modulation tables keep their dtype. The fp8 copy is
only for training: merging a trained slice always starts from the original full-precision checkpoint file.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BlockSwapper",
    "FP8_DTYPE",
    "FP8_MAX",
    "Fp8Linear",
    "dequantize_weight",
    "disable_block_swap",
    "enable_block_swap",
    "get_block_swap",
    "offload_saved_activations",
    "quantize_base_to_fp8",
]

_SWAP_ATTR = "_slice_ft_block_swap"
ADAPTER_PREFIX = "slice_"

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def _is_adapter_name(qualified_name: str) -> bool:
    return any(part.startswith(ADAPTER_PREFIX) for part in qualified_name.split("."))


def _in_backward() -> bool:
    # The autograd engine sets a graph-task id while it runs backward (checkpoint recompute included); -1 outside.
    return torch._C._current_graph_task_id() != -1


def _get_blocks(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"{type(transformer).__name__} has no non-empty `blocks` ModuleList; block swap and fp8 need a "
            "WanTransformer3DModel-like model (pass the transformer itself, not a pipeline or a wrapper)."
        )
    return blocks


# --------------------------------------------------------------------------------------------------------------------
# Block swap
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One frozen tensor of a swapped block and every (module, attribute) that holds it."""

    name: str
    is_param: bool
    home: torch.Tensor  # CPU copy; for parameters the original Parameter object, re-pointed at CPU storage
    owners: list = field(default_factory=list)


@dataclass
class _SwapBlock:
    index: int
    slots: list
    copies: Optional[list] = None  # device copies while loaded or in flight
    event: Optional[object] = None  # CUDA event of an in-flight copy
    alloc_stream: Optional[object] = None  # stream the copies were allocated on
    installed: bool = False


class BlockSwapper:
    """State and hooks of block swap on one transformer; created by `enable_block_swap`."""

    def __init__(self, transformer: nn.Module, blocks_to_swap: int, device: torch.device, stream: bool):
        self.transformer = transformer
        self.blocks = _get_blocks(transformer)
        self.num_blocks = len(self.blocks)
        self.blocks_to_swap = blocks_to_swap
        self.device = device
        self.swapped = tuple(range(self.num_blocks - blocks_to_swap, self.num_blocks))
        self.pin = torch.cuda.is_available()
        self.stream = torch.cuda.Stream(device=device) if (stream and device.type == "cuda") else None
        self.state: dict[int, _SwapBlock] = {}
        self.handles: list = []
        self.trace: Optional[list] = None  # set to [] to record ("load"/"prefetch"/"hit"/"evict", index, direction)
        self.num_loads = 0
        self.num_prefetch_hits = 0
        self._callback_task: Optional[int] = None
        self._block_trainable: dict[int, bool] = {}

    # -- setup ------------------------------------------------------------------------------------------------------

    def _place(self) -> None:
        # Validate before moving anything, so a refusal leaves the model as it was.
        for qual, t in (*self.transformer.named_parameters(), *self.transformer.named_buffers()):
            if t.is_meta:
                raise ValueError(
                    f"{qual} is on the meta device: load or materialize the weights before enable_block_swap."
                )
        swapped_modules: dict[int, int] = {}
        for i in self.swapped:
            for m in self.blocks[i].modules():
                swapped_modules[id(m)] = i
        slots: dict[int, _Slot] = {}
        per_block: dict[int, list] = {i: [] for i in self.swapped}
        for mod_name, module in self.transformer.named_modules():
            block_idx = swapped_modules.get(id(module))
            for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    qual = f"{mod_name}.{name}" if mod_name else name
                    frozen = not t.requires_grad and not _is_adapter_name(qual)
                    if block_idx is None or not frozen:
                        self._to_device(module, table, name, t, kind == "param")
                        continue
                    if type(t) not in (torch.Tensor, nn.Parameter):
                        raise ValueError(
                            f"block swap cannot move {qual} of type {type(t).__name__}: only plain tensors swap. "
                            "Fix: lower blocks_to_swap, or use quantize_base_to_fp8 instead of a tensor-subclass "
                            "quantization."
                        )
                    slot = slots.get(id(t))
                    if slot is None:
                        slot = _Slot(qual, kind == "param", self._make_home(t))
                        slots[id(t)] = slot
                        per_block[block_idx].append(slot)
                    slot.owners.append((table, name))
                    table[name] = slot.home
        for i in self.swapped:
            self.state[i] = _SwapBlock(i, per_block[i])
        for i, block in enumerate(self.blocks):
            self._block_trainable[i] = any(p.requires_grad for p in block.parameters())

    def _to_device(self, module, table, name, t, is_param) -> None:
        if t.device == self.device:
            return
        with torch.no_grad():
            if is_param:
                t.data = t.data.to(self.device)  # same Parameter object: optimizers built earlier stay valid
            else:
                table[name] = t.to(self.device)

    def _make_home(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            src = t.detach()
            if self.pin and not (src.device.type == "cpu" and src.is_pinned()):
                # one copy straight into pinned memory (no pageable intermediate)
                data = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True)
                data.copy_(src)
            else:
                data = src.to("cpu")
        if isinstance(t, nn.Parameter):
            t.data = data  # keep the Parameter identity: disable_block_swap gives the same object back
            return t
        return data

    def _install_hooks(self) -> None:
        for i, block in enumerate(self.blocks):
            # prepend: adapter pre-hooks on the block (slice ParamSlice's W + delta) must see the loaded weights
            self.handles.append(
                block.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True, prepend=True)
            )
            if i in self.state:
                # always_call: runs even when checkpoint's early stop aborts a recompute with an exception
                self.handles.append(block.register_forward_hook(self._make_post_hook(i), always_call=True))

    # -- copies -----------------------------------------------------------------------------------------------------

    def _log(self, what: str, index: int, backward: bool) -> None:
        if self.trace is not None:
            self.trace.append((what, index, "backward" if backward else "forward"))

    def _issue_copy(self, blk: _SwapBlock) -> None:
        # Copies are plain (non-inference) tensors even under inference_mode, so a kept block can serve a backward.
        with torch.no_grad(), torch.inference_mode(False):
            if self.stream is None:
                blk.copies = [torch.empty_like(s.home, device=self.device) for s in blk.slots]
                for c, s in zip(blk.copies, blk.slots):
                    c.copy_(s.home, non_blocking=self.device.type == "cuda")
                self.num_loads += 1
                return
            # Allocate on the compute stream (memory is then ordered with compute), copy on the side stream after
            # the compute stream reached this point, so the copy overlaps the block that is about to run.
            compute = torch.cuda.current_stream(self.device)
            blk.copies = [torch.empty_like(s.home, device=self.device) for s in blk.slots]
            blk.alloc_stream = compute
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                for c, s in zip(blk.copies, blk.slots):
                    c.copy_(s.home, non_blocking=True)
                blk.event = torch.cuda.Event()
                blk.event.record(self.stream)
        self.num_loads += 1

    def _set(self, blk: _SwapBlock, tensors: Sequence[torch.Tensor]) -> None:
        for slot, t in zip(blk.slots, tensors):
            for table, name in slot.owners:
                table[name] = t

    def _prefetch(self, index: int, backward: bool) -> None:
        blk = self.state[index]
        if blk.copies is None:
            self._issue_copy(blk)
            self._log("prefetch", index, backward)

    def _ensure(self, index: int, backward: bool) -> None:
        blk = self.state[index]
        if blk.copies is None:
            self._issue_copy(blk)
            self._log("load", index, backward)
        else:
            self.num_prefetch_hits += 1
            self._log("hit", index, backward)
        if blk.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(blk.event)
            if current != blk.alloc_stream:  # used on another stream than allocated: keep the allocator honest
                for c in blk.copies:
                    c.record_stream(current)
            blk.event = None
        if not blk.installed:
            self._set(blk, [nn.Parameter(c, requires_grad=False) if s.is_param else c for c, s in zip(blk.copies, blk.slots)])
            blk.installed = True

    def _evict(self, index: int, backward: bool = False) -> None:
        blk = self.state[index]
        if blk.copies is None:
            return
        if blk.event is not None:
            # A copy may still be writing: the freed memory must not be reused before it finishes.
            blk.alloc_stream.wait_event(blk.event)
            blk.event = None
        if blk.installed:
            self._set(blk, [s.home for s in blk.slots])
        # Dropping our references frees nothing autograd still holds (it keeps its own references).
        blk.copies, blk.installed = None, False
        self._log("evict", index, backward)

    def _evict_all(self) -> None:
        for i in self.swapped:
            self._evict(i)

    # -- hooks ------------------------------------------------------------------------------------------------------

    def _gradient_checkpointing(self) -> bool:
        return bool(getattr(self.transformer, "gradient_checkpointing", False))

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args, kwargs):
            backward = _in_backward()
            if backward:
                self._queue_end_of_backward()
            elif index in self.state and torch.is_grad_enabled() and not self._gradient_checkpointing():
                needs_grad = self._block_trainable[index] or any(
                    isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())
                )
                if needs_grad:
                    raise ValueError(
                        f"block swap is on (blocks_to_swap={self.blocks_to_swap}) but block {index} runs with "
                        "gradients and gradient checkpointing is off: autograd would keep every swapped block on "
                        "the device. Fix: call transformer.enable_gradient_checkpointing() before training, or run "
                        "inference under torch.no_grad()."
                    )
            nxt = index - 1 if backward else index + 1
            for j in self.swapped:
                if j != index and j != nxt:
                    self._evict(j, backward)
            if index in self.state:
                self._ensure(index, backward)
            if nxt in self.state:
                self._prefetch(nxt, backward)
            return None

        return pre_hook

    def _make_post_hook(self, index: int):
        last = self.num_blocks - 1

        def post_hook(module, args, output):
            backward = _in_backward()
            if (
                not backward
                and index == last
                and torch.is_grad_enabled()
                and self._gradient_checkpointing()
            ):
                return None  # backward recomputes the last block first: keep it (evicted at the end of backward)
            self._evict(index, backward)
            return None

        return post_hook

    def _queue_end_of_backward(self) -> None:
        task = torch._C._current_graph_task_id()
        if task == self._callback_task:
            return
        self._callback_task = task
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._callback_task = None
        self._evict_all()

    # -- queries (tests, logging) -----------------------------------------------------------------------------------

    def loaded_blocks(self) -> list[int]:
        """Swapped blocks whose device copy is currently referenced by the swapper (loaded or in flight)."""
        return [i for i in self.swapped if self.state[i].copies is not None]

    def home_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Qualified name -> CPU home tensor of swapped block `index`'s frozen tensors."""
        return {s.name: s.home for s in self.state[index].slots}

    def is_home(self, index: int) -> bool:
        """True when every frozen tensor of swapped block `index` is its CPU home copy (not loaded on the device)."""
        blk = self.state[index]
        return all(table[name] is s.home for s in blk.slots for table, name in s.owners)

    # -- teardown ---------------------------------------------------------------------------------------------------

    def remove(self, device: torch.device) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._evict_all()
        with torch.no_grad():
            for blk in self.state.values():
                for slot in blk.slots:
                    moved = slot.home.detach().to(device, copy=True)
                    if slot.is_param:
                        slot.home.data = moved
                        new = slot.home
                    else:
                        new = moved
                    for table, name in slot.owners:
                        table[name] = new
        if self.stream is not None:
            self.stream.synchronize()
        if device != self.device:  # the resident part sits on the swap device: bring it along
            self.transformer.to(device)


def enable_block_swap(
    transformer: nn.Module,
    blocks_to_swap: int,
    device: Union[str, torch.device],
    *,
    stream: bool = True,
) -> BlockSwapper:
    """Keep the frozen tensors of the last `blocks_to_swap` blocks on the CPU and stream them to `device` on use.

    Everything else (the other blocks, embeddings, output head, adapter and trainable tensors) is moved to `device`
    now and stays there. Call it after ``add_adapter`` (and ``quantize_base_to_fp8``), and before building the
    optimizer and ``accelerator.prepare`` (with ``device_placement=False`` for the transformer). ``stream=False``
    turns off the side-stream prefetch overlap on CUDA (copies then run in order on the compute stream); CPU devices
    never use a stream and emulate the device with a second CPU copy.
    """
    blocks = _get_blocks(transformer)
    n = len(blocks)
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int):
        raise ValueError(
            f"blocks_to_swap must be an integer in [0, {n - 1}], got {blocks_to_swap!r}; pass e.g. --blocks_to_swap 20."
        )
    if not 0 <= blocks_to_swap <= n - 1:
        raise ValueError(
            f"blocks_to_swap={blocks_to_swap} is out of range: this transformer has {n} blocks, allowed values are "
            f"0..{n - 1} (at least one block stays on the device). Fix: pass a value in that range."
        )
    if getattr(transformer, _SWAP_ATTR, None) is not None:
        raise ValueError("block swap is already enabled on this transformer; call disable_block_swap(transformer) first.")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available; pass device='cpu' or run on a GPU.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    swapper = BlockSwapper(transformer, blocks_to_swap, device, stream)
    swapper._place()
    if blocks_to_swap > 0:
        swapper._install_hooks()
    object.__setattr__(transformer, _SWAP_ATTR, swapper)
    return swapper


def get_block_swap(transformer: nn.Module) -> Optional[BlockSwapper]:
    """The active `BlockSwapper` of `transformer`, or None."""
    return transformer.__dict__.get(_SWAP_ATTR)


def disable_block_swap(transformer: nn.Module, device: Union[str, torch.device, None] = None) -> None:
    """Remove the hooks and put every swapped tensor on `device` (default: the swap device), as one plain model."""
    swapper = get_block_swap(transformer)
    if swapper is None:
        raise ValueError("block swap is not enabled on this transformer; nothing to disable (call enable_block_swap first).")
    swapper.remove(torch.device(device) if device is not None else swapper.device)
    del transformer.__dict__[_SWAP_ATTR]


# --------------------------------------------------------------------------------------------------------------------
# Activation offload
# --------------------------------------------------------------------------------------------------------------------


class offload_saved_activations(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 (a context manager, as torch's)
    """Context manager: tensors autograd saves are kept in (pinned) CPU memory until backward needs them.

    Use it around the forward (and loss) of a model with gradient checkpointing on; backward runs outside it. Every
    saved tensor is copied, also when it already lives on the CPU (so the CPU tests see real copies), except
    parameters, which their modules hold anyway. Counters: `packed_bytes` (bytes copied to the CPU), `num_packed` /
    `num_reused` / `num_kept` (saves copied / served by an earlier copy / parameters left in place).

    Written here rather than using ``torch.autograd.graph.save_on_cpu`` because that copies every save, frozen
    weights included, and synchronously: a blocking copy per block stalls the GPU, and Wan hands the same text states
    and timestep projection to all 40 blocks' checkpoints. Here a tensor is copied once per context (recognised by
    identity and version while it is alive), parameters are not copied, and the copy is asynchronous on the compute
    stream, which keeps it ordered before any reuse of the source memory.
    """

    def __init__(self, pin_memory: Optional[bool] = None):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.packed_bytes = 0
        self.num_packed = 0
        self.num_reused = 0
        self.num_kept = 0
        self._copies: dict[int, tuple] = {}  # id(tensor) -> (weakref, version, packed), while the context is open
        copies = self._copies

        def pack(t: torch.Tensor):
            if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):  # (or a view of one, as W.t()):
                # the module keeps it in memory anyway, so a copy would only add traffic
                self.num_kept += 1
                return (None, t, False)
            hit = copies.get(id(t))
            if hit is not None and hit[0]() is t and hit[1] == t._version:
                self.num_reused += 1
                return hit[2]
            pin = self.pin_memory and t.device.type != "cpu"
            cpu = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device="cpu", pin_memory=pin)
            cpu.copy_(t.detach(), non_blocking=pin)
            packed = (t.device, cpu, pin)
            try:
                copies[id(t)] = (weakref.ref(t), t._version, packed)
            except TypeError:  # not weak-referenceable: just no reuse
                pass
            self.packed_bytes += cpu.numel() * cpu.element_size()
            self.num_packed += 1
            return packed

        def unpack(packed):
            device, cpu, pin = packed
            return cpu.to(device, non_blocking=pin) if device is not None and device.type != "cpu" else cpu

        super().__init__(pack, unpack)

    def __enter__(self) -> "offload_saved_activations":
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._copies.clear()  # autograd holds what backward needs; nothing packs after the forward


# --------------------------------------------------------------------------------------------------------------------
# fp8 frozen base
# --------------------------------------------------------------------------------------------------------------------


def _quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w32 = w.detach().float()
    amax = w32.abs().amax()
    # An all-zero weight keeps scale 1 instead of dividing by zero.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(torch.float32)
    q = (w32 / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


class Fp8Linear(nn.Linear):
    """`nn.Linear` whose frozen `weight` is a float8_e4m3fn Parameter with a per-tensor float32 `weight_scale`.

    Made in place from an `nn.Linear` by `Fp8Linear.convert_` (the object keeps its identity, so tuner layers that
    hold it as `base_layer` and any hooks stay valid). State-dict names are unchanged: `weight` (fp8) and `bias`;
    `weight_scale` is not persistent. Loading a full-precision `weight` re-quantizes it.
    """

    compute_dtype: torch.dtype

    @classmethod
    def convert_(cls, linear: nn.Linear) -> "Fp8Linear":
        if type(linear) is not nn.Linear:
            raise ValueError(f"Fp8Linear.convert_ takes a plain nn.Linear, got {type(linear).__name__}.")
        w = linear.weight
        q, scale = _quantize_fp8(w)
        compute_dtype = w.dtype
        linear.__class__ = cls
        # Still a (frozen) Parameter: named_parameters(), and so slice layouts and fingerprints, stay the same.
        linear._parameters["weight"] = nn.Parameter(q, requires_grad=False)
        linear.register_buffer("weight_scale", scale.to(q.device), persistent=False)
        linear.compute_dtype = compute_dtype
        return linear

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, dequantize_weight(self), self.bias)

    def frozen_linear_weight(self) -> torch.Tensor:
        """The weight a slice layer's fused base-plus-slice function computes with (slice_adapter.layer)."""
        return dequantize_weight(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if isinstance(w, torch.Tensor) and w.dtype != FP8_DTYPE and w.shape == self.weight.shape:
            # A full-precision checkpoint: copying it raw into the fp8 buffer would ignore the scale.
            q, scale = _quantize_fp8(w)
            state_dict[key] = q
            with torch.no_grad():
                self.weight_scale.copy_(scale)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight=float8_e4m3fn, compute_dtype={self.compute_dtype}"


def dequantize_weight(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight of `layer` in its compute dtype (or `dtype`): upcast fp8 times scale for `Fp8Linear`, else as is.

    Accepts a PEFT-style tuner layer too (uses its `base_layer`).
    """
    get_base = getattr(layer, "get_base_layer", None)
    if callable(get_base):
        layer = get_base()
    if isinstance(layer, Fp8Linear):
        dtype = dtype or layer.compute_dtype
        return layer.weight.to(dtype) * layer.weight_scale.to(dtype)
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"dequantize_weight needs a layer with a `weight` tensor, got {type(layer).__name__}.")
    return w if dtype is None else w.to(dtype)


def quantize_base_to_fp8(transformer: nn.Module, *, exclude: Iterable[str] = ()) -> list[str]:
    """Store every frozen `nn.Linear` weight under `transformer.blocks` as fp8 e4m3 + per-tensor scale, in place.

    `exclude`: regexes searched in the qualified module name (e.g. ``r"\\.ffn\\."``) of layers to keep as they are.
    Trainable layers (weight with ``requires_grad``, e.g. LoRA matrices) and adapter modules (``slice_*``) are left
    alone; so are `nn.Linear` subclasses. Call it after ``add_adapter`` (the slice starts from full-precision values)
    and before ``enable_block_swap``. Returns the names of the converted layers. Merging never uses this copy: it
    always starts from the original full-precision checkpoint.
    """
    blocks = _get_blocks(transformer)
    if get_block_swap(transformer) is not None:
        raise ValueError("quantize_base_to_fp8 must run before enable_block_swap; call disable_block_swap first.")
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = []
    for p in exclude:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"exclude pattern {p!r} is not a valid regex ({e}); pass e.g. r'\\.ffn\\.'") from e
    done = []
    for name, module in blocks.named_modules(prefix="blocks"):
        if type(module) is not nn.Linear or _is_adapter_name(name) or module.weight.requires_grad:
            continue
        if any(p.search(name) for p in patterns):
            continue
        if module.weight.is_meta:
            raise ValueError(f"{name}.weight is on the meta device; load or materialize the weights before fp8.")
        Fp8Linear.convert_(module)
        done.append(name)
    return done
