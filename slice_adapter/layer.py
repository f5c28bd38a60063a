"""Slice tuner layers: the base weights stay untouched; the slice's values are added by the layer's forward.

- `Linear` wraps an `nn.Linear`: the matmul runs on the weight with the slice's tiles written in (in place and
  restored, or into the copy autocast or an fp8 base makes anyway: `patched_weight.py`), so forward and input
  gradient cost what the base costs; the tiles' gradient is a batched matmul over the segments of x the tiles read
  (one per chunk of tokens where x is wider than the output), which are all autograd keeps of x: one band of its
  columns for a banded slice (`selection.py`); where x is gelu(h) or a Wan block's (modulated) norm of h, x is
  recomputed in backward from h, which gelu's or the norm's node keeps anyway (`recompute.py`; in a block compiled
  by `slice_ft.compile`, the compiler's partitioner recomputes the norms'). Under torch.compile forward and backward
  are custom ops (`slice_adapter::linear`, `slice_adapter::linear_backward`). A call that needs no gradient runs
  without an autograd node. A base layer that cannot be computed that way (one with its own forward) is called as it
  is and the tiles are added to its output (gather, batched matmul, `index_add`).
- `Elementwise` wraps a leaf module with small parameters (norms): it runs the base module with W + delta; the
  activations that W + delta multiplies are kept for backward in the held columns only (`saved_columns.py`).
- `ParamSlice` serves raw parameters of a container module (`scale_shift_table` on a Wan block): it is attached to
  that module as the child `sliced_params` and shadows the parameter with W + delta for the duration of its forward.
  On a Wan block it also tells attn1's q/k/v which input gradient columns the modulation's slice reads
  (`modulation.py`); the activations the table multiplies are kept in the held columns only (`saved_columns.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import _module_imported
from .modulation import modulation_input_grad
from .patched_weight import input_grad, linear_with_slice, op_args, slices_of
from .recompute import compiled_gelu_input, gelu_input, gelu_recompute, norm_input
from .saved_columns import held_columns, keep_held_columns
from .selection import ParamLayout, _hash64

INIT_STD = 0.02  # spread of the random deltas `init_weights=False` draws (tests)


class TileIndex:
    """Index data of one parameter's slice, built from its layout and tiles; cached per device."""

    def __init__(self, layout: ParamLayout, tiles: np.ndarray):
        self.layout = layout
        self.num_tiles = len(tiles)
        self.tile_width = layout.tile_width
        tiles_t = torch.from_numpy(tiles)
        if layout.tiled_rows:
            segs = layout.segments_per_row
            rows, seg = tiles_t // segs, tiles_t % segs
            seg_ids, group = torch.unique(seg, return_inverse=True)
            if 2 * len(seg_ids) >= segs:
                # most segments hold a tile: the tiles' batched matmul runs over every segment (a strided view of
                # x, the empty ones padded with zero tiles) instead of copying the held segments out of x
                seg_ids, group = torch.arange(segs), seg
            counts = torch.bincount(group, minlength=len(seg_ids))
            nmax = int(counts.max())
            # slot of each tile inside its segment's group: tiles are sorted by (row, seg), so rank within group
            order = torch.argsort(group, stable=True)
            starts = torch.cumsum(counts, 0) - counts
            within = torch.empty_like(group)
            within[order] = torch.arange(len(group)) - starts[group[order]]
            slot = group * nmax + within
            rows_padded = torch.zeros(len(seg_ids) * nmax, dtype=torch.long)
            rows_padded[slot] = rows
            self._cpu = {"tiles": tiles_t, "seg_ids": seg_ids, "slot": slot, "rows_padded": rows_padded}
            self.nmax = nmax
        else:
            self._cpu = {"flat": tiles_t}
        self._by_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device.type == "cpu":
            return self._cpu
        if device not in self._by_device:
            self._by_device[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._by_device[device]

    def value_shape(self) -> tuple:
        return (self.num_tiles, self.tile_width) if self.layout.tiled_rows else (self.num_tiles,)


def _padded_deltas(w_values, slot, groups, nmax, dtype, scale):
    """The tiles as (groups, nmax, width) in `dtype`, scaled; padding slots are zero."""
    width = w_values.shape[1]
    deltas = w_values.new_zeros(groups * nmax, width).index_copy_(0, slot, w_values).view(groups, nmax, width)
    return (deltas * scale).to(dtype) if scale != 1.0 else deltas.to(dtype)


def _gather(x2d, seg_ids, width, dtype):
    """(groups, T, width) view of x's columns in the slice's segments, in `dtype`.

    bmm takes this transposed layout as a strided view, so no copy is made unless a segment is missing (one
    `index_select` of the held segments only) or the dtype differs.
    """
    xs = x2d.reshape(x2d.shape[0], -1, width)
    if seg_ids.numel() != xs.shape[1]:  # the slice runs over some segments only: copy those out
        xs = xs.index_select(1, seg_ids)
    return xs.transpose(0, 1).to(dtype)


def _keeps_segments(seg_ids, in_features: int, width: int) -> bool:
    """Whether the tiles' gradient keeps their gathered segments of x rather than x: they are a copy of part of x
    (a banded slice holds one band of the input), not a view of all of it."""
    return seg_ids.numel() < in_features // width


def _add_slice_forward(out2d, xs, w_values, b_values, slot, rows_padded, bias_idx, nmax, dtype, scale):
    """`out[:, row] += x[:, seg] @ tile` for every tile (`xs`: `_gather` of x; one bmm, one index_add), plus bias
    elements."""
    if w_values is not None:
        tokens, groups = xs.shape[1], xs.shape[0]
        part = torch.bmm(xs, _padded_deltas(w_values, slot, groups, nmax, dtype, scale).transpose(1, 2))
        out2d.index_add_(1, rows_padded, part.transpose(0, 1).reshape(tokens, groups * nmax).to(out2d.dtype))
    if b_values is not None:
        out2d.index_add_(1, bias_idx, (b_values * scale).to(out2d.dtype).expand(out2d.shape[0], -1))


def _tiles_grad_part(grad_out, rows_padded, groups, nmax, dtype, scale):
    """(groups, T, nmax): the output gradient at the rows each segment's tiles write to, times `scale`."""
    grad_part = grad_out.to(dtype).index_select(1, rows_padded).view(grad_out.shape[0], groups, nmax).transpose(0, 1)
    return grad_part * scale if scale != 1.0 else grad_part


def _tiles_input_grad(grad_part, w_values, slot, nmax, dtype):
    """(T, groups, width): the tiles' part of the input gradient, per segment they hold."""
    deltas = _padded_deltas(w_values, slot, grad_part.shape[0], nmax, dtype, 1.0)
    return torch.bmm(grad_part, deltas).transpose(0, 1)


def _slice_backward(grad_out, xs, in_features, x_dtype, w_values, seg_ids, slot, rows_padded, bias_idx, nmax, dtype,
                    scale, need_x, need_w, need_b):
    """Gradients of the slice's own part: (grad_x, grad_w, grad_b); `xs`: `_gather` of x (read for grad_w only)."""
    grad_w = grad_b = grad_x = None
    if w_values is not None and (need_x or need_w):
        tokens, width = grad_out.shape[0], w_values.shape[1]
        groups = seg_ids.numel()
        grad_part = _tiles_grad_part(grad_out, rows_padded, groups, nmax, dtype, scale)
        if need_w:
            weight_slice = ("weight", {"seg_ids": seg_ids, "slot": slot}, scale, nmax)
            grad_w = _tiles_weight_grads(xs, GATHERED, None, (grad_out.shape[1], in_features), (weight_slice,),
                                         [(0, grad_part)], [w_values])[0]
        if need_x:
            grad_xs = _tiles_input_grad(grad_part, w_values, slot, nmax, dtype).to(x_dtype)
            if groups == in_features // width:
                grad_x = grad_xs.reshape(tokens, in_features)
            else:
                grad_x = torch.zeros(tokens, in_features, dtype=x_dtype, device=grad_out.device)
                grad_x.view(tokens, -1, width).index_add_(1, seg_ids, grad_xs)
    if need_b and bias_idx is not None:
        grad_b = _bias_grad(grad_out, bias_idx, scale)
    return grad_x, grad_w, grad_b


def _bias_grad(grad_out, flat, scale):
    return grad_out.index_select(1, flat).float().sum(0) * scale


class _SliceLinearDelta(torch.autograd.Function):
    """Adds a Linear's slice to an output the base layer computed itself, in place (a base that cannot run as a
    plain matmul on a patched weight: its own forward, a trainable weight, extra arguments).

    The output is not a view and the producer does not save it, so autograd adds no copy. For the tiles' gradient
    the held segments of x are kept where they are a part of x (`_keeps_segments`), else x itself (its gather is a
    view, redone in backward).
    """

    @staticmethod
    def forward(ctx, result, x2d, w_values, b_values, seg_ids, slot, rows_padded, bias_idx, nmax, dtype, scale):
        out2d = result.view(-1, result.shape[-1])
        xs = _gather(x2d, seg_ids, w_values.shape[1], dtype) if w_values is not None else None
        _add_slice_forward(out2d, xs, w_values, b_values, slot, rows_padded, bias_idx, nmax, dtype, scale)
        ctx.mark_dirty(result)
        ctx.gathered = w_values is not None and _keeps_segments(seg_ids, x2d.shape[1], w_values.shape[1])
        ctx.save_for_backward(xs if ctx.gathered else x2d, w_values, seg_ids, slot, rows_padded, bias_idx)
        ctx.nmax, ctx.dtype, ctx.scale, ctx.x_dtype, ctx.in_features = nmax, dtype, scale, x2d.dtype, x2d.shape[1]
        return result

    @staticmethod
    def backward(ctx, grad_result):
        x_kept, w_values, seg_ids, slot, rows_padded, bias_idx = ctx.saved_tensors
        grad_out = grad_result.reshape(-1, grad_result.shape[-1])
        xs = x_kept
        if w_values is not None and not ctx.gathered and ctx.needs_input_grad[2]:
            xs = _gather(x_kept, seg_ids, w_values.shape[1], ctx.dtype)
        grad_x, grad_w, grad_b = _slice_backward(
            grad_out, xs, ctx.in_features, ctx.x_dtype, w_values, seg_ids, slot, rows_padded, bias_idx, ctx.nmax,
            ctx.dtype, ctx.scale, ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        return grad_result, grad_x, grad_w, grad_b, None, None, None, None, None, None, None


VALUES_AT = 9  # position of the first slice value among `_LinearWithSlice.apply`'s arguments


class _LinearWithSlice(torch.autograd.Function):
    """A frozen Linear computed with its slices merged into the weight: `x @ (W + dW).T + (b + db)`, one matmul.

    Why (measured in benchmarks/bench_train_step.py): the slice's own matmuls read the activations once more per
    pass (forward, and twice in backward), which costs a few percent of the step at every clip size, while writing
    the tiles into the weight for the matmul and back costs time proportional to the tiles alone. Only the tiles'
    gradient still reads x (one small batched matmul, as LoRA's A gradient does). The arithmetic is the merged
    model's: the patched entries are round(W + dW) in the matmul's dtype, computed from W in its own dtype (under
    autocast that is what autocast's `F.linear` of the merged fp32 weight computes, bit for bit).

    How the weight is patched for each matmul, and why those matmuls are custom ops under torch.compile:
    `patched_weight.py`.
    """

    @staticmethod
    def forward(ctx, x2d, weight, bias, owned, base_dtype, dtype, slices, input_columns, recompute, *values):
        out2d, x_base, merged = linear_with_slice(x2d, weight, bias, owned, base_dtype, slices, values)
        wants_w = any(ctx.needs_input_grad[VALUES_AT:])
        x_src = x_base if base_dtype == dtype else x2d  # the tiles' gradient reads the cast input when it can
        ctx.x_from = None
        if wants_w and recompute is not None:  # keep what x is made from (another node keeps it), not x as well
            x_src, ctx.x_from = recompute.source, dataclasses.replace(recompute, source=None)  # kept once: saved
        elif wants_w and [kind for kind, *_ in slices].count("weight") == 1:
            index, v = next((s[1], v) for s, v in zip(slices, values) if s[0] == "weight")
            if _keeps_segments(index["seg_ids"], x2d.shape[1], v.shape[1]):
                x_src, ctx.x_from = _gather(x_src, index["seg_ids"], v.shape[1], dtype), GATHERED
        # a copy made for this matmul is kept for the input gradient (autocast's linear keeps its cast too); the
        # base weight itself is patched again in backward
        ctx.save_for_backward(x_src if wants_w else None, merged, input_columns, *values)
        ctx.weight, ctx.slices, ctx.dtype, ctx.x_dtype, ctx.base_dtype = weight, slices, dtype, x2d.dtype, base_dtype
        return out2d

    @staticmethod
    def backward(ctx, grad_out):
        x_src, merged, input_columns, *values = ctx.saved_tensors
        x_from, need = ctx.x_from, ctx.needs_input_grad
        if torch.compiler.is_compiling():
            gelu = None if x_from is None or x_from is GATHERED else x_from.gelu
            out = _linear_backward_op(grad_out, ctx.weight, x_src, input_columns, need[0], list(need[VALUES_AT:]),
                                      ctx.base_dtype, ctx.dtype, ctx.x_dtype, x_from is GATHERED, gelu,
                                      *op_args(ctx.slices), list(values))
            grad_x = out[0] if need[0] else None
            grads = [g if n else None for g, n in zip(out[1:], need[VALUES_AT:])]
        else:
            grad_x, grads = linear_backward(grad_out, ctx.weight, x_src, merged, input_columns, need[0],
                                            need[VALUES_AT:], ctx.base_dtype, ctx.dtype, ctx.x_dtype, ctx.slices,
                                            values, x_from)
        ctx.weight = ctx.x_from = None
        return (grad_x, *([None] * (VALUES_AT - 1)), *grads)


GATHERED = "gathered"  # `_LinearWithSlice` kept the segments of x its tiles read, not x


def linear_backward(grad_out, weight, x_src, merged, input_columns, need_x, need_values, base_dtype, dtype, x_dtype,
                    slices, values, x_from):
    """(grad of x or None, grad of each slice value or None) of `_LinearWithSlice`. `x_src`: what forward kept for
    the tiles' gradient: x (cast), its gathered segments (`x_from` is GATHERED) or what x is made from (`x_from`:
    a `recompute.Recompute`)."""
    grad_x = None
    if need_x:
        grad_x = input_grad(grad_out, weight, base_dtype, x_dtype, input_columns, slices, values, merged)
    grads = [None] * len(slices)
    tiles = []  # (k, the output gradient at the rows its tiles write to) per weight slice wanting a gradient
    for k, (kind, index, scale, nmax) in enumerate(slices):
        if not need_values[k]:
            continue
        if kind == "weight":
            groups = index["seg_ids"].numel()
            tiles.append((k, _tiles_grad_part(grad_out, index["rows_padded"], groups, nmax, dtype, scale)))
        else:
            grads[k] = _bias_grad(grad_out, index["flat"], scale)
    if tiles:
        cast_to = base_dtype if base_dtype == dtype else None  # forward's x_src was the cast input
        for k, grad_w in _tiles_weight_grads(x_src, x_from, cast_to, weight.shape, slices, tiles, values).items():
            grads[k] = grad_w
    return grad_x, grads


def _tiles_weight_grads(x_src, x_from, cast_to, shape, slices, tiles, values) -> dict:
    """The tiles' gradients of a Linear of weight `shape`, summed over chunks of tokens where x is wider than the
    output.

    Why chunks: where x is made again for this gradient from a tensor kept per token (gelu's input, `recompute.py`)
    and is wider than the output (a Wan FFN's hidden activation, 5.8x a block's width), whole it was a transient the
    frozen base's backward never holds (1.15x the frozen base's peak at 2 compiled blocks, 768 tokens); a chunk of
    tokens at a time, it is never larger than the Linear's output. The same chunks wherever x comes from (kept,
    gathered, made again), so the arithmetic does not depend on it; not wider: the one batched matmul of before.
    """
    out_features, in_features = shape
    tokens = tiles[0][1].shape[1]
    chunks = min(-(-in_features // out_features), tokens) if in_features > out_features else 1
    gathered = x_from is GATHERED
    redo = None if x_from is None or gathered else x_from.redo

    def redone(kept):  # x, or some of its tokens, again, bit for bit: the same kernels on the same inputs
        x = redo(kept).reshape(-1, in_features)
        return x.to(cast_to) if cast_to is not None else x

    if redo is not None and not x_from.rowwise:  # made from every token at once
        x_src, redo = redone(x_src), None
    x_chunks = (x_src.reshape(-1, in_features) if redo is not None else x_src).tensor_split(chunks, int(gathered))
    grads = {}
    for c, x_chunk in enumerate(x_chunks):
        if redo is not None:
            x_chunk = redone(x_chunk)
        for k, grad_part in tiles:
            index, width = slices[k][1], values[k].shape[1]
            xs = x_chunk if gathered else _gather(x_chunk, index["seg_ids"], width, grad_part.dtype)
            part = grad_part.tensor_split(chunks, 1)[c] if chunks > 1 else grad_part
            grad_deltas = torch.bmm(part.transpose(1, 2), xs)
            if chunks > 1:  # summed in float32, as one matmul accumulates
                grad_deltas = grad_deltas.float() if c == 0 else grads[k].add_(grad_deltas)
            grads[k] = grad_deltas
    return {k: grads[k].reshape(-1, values[k].shape[1]).index_select(0, slices[k][1]["slot"]).to(values[k].dtype)
            for k, _ in tiles}


# -- the same under torch.compile, as one custom op ------------------------------------------------------------------
# Why one op: inductor schedules the tiles' gradient matmuls late in backward (they feed nothing but the optimizer),
# which kept the FFN's hidden activation (what x is made from) alive past the frozen base's last use of it; one op for
# the input gradient and the tiles' gradients runs them where the input gradient is needed, as eager does.
@torch.library.custom_op("slice_adapter::linear_backward", mutates_args=())
def _linear_backward_op(grad_out: torch.Tensor, weight: torch.Tensor, x_src: Optional[torch.Tensor],
                        input_columns: Optional[torch.Tensor], need_x: bool, need_values: list[bool],
                        base_dtype: torch.dtype, dtype: torch.dtype, x_dtype: torch.dtype, gathered: bool,
                        gelu: Optional[str], is_weight: list[bool], index: list[torch.Tensor], scales: list[float],
                        nmax: list[int], values: list[torch.Tensor]) -> list[torch.Tensor]:
    # runs eagerly; returns [grad of x] + [grad of each value], empty where not wanted (an op returns tensors)
    x_from = GATHERED if gathered else (gelu_recompute(x_src, gelu) if gelu else None)
    grad_x, grads = linear_backward(grad_out, weight, x_src, None, input_columns, need_x, need_values, base_dtype,
                                    dtype, x_dtype, slices_of(is_weight, index, scales, nmax), values, x_from)
    empty = grad_out.new_empty(0)
    return [empty if grad_x is None else grad_x] + [empty if g is None else g for g in grads]


@_linear_backward_op.register_fake
def _(grad_out, weight, x_src, input_columns, need_x, need_values, base_dtype, dtype, x_dtype, gathered, gelu,
      is_weight, index, scales, nmax, values):
    empty = grad_out.new_empty(0)
    grad_x = grad_out.new_empty((grad_out.shape[0], weight.shape[1]), dtype=x_dtype) if need_x else empty
    return [grad_x] + [(v.new_empty(v.shape) if w else v.new_empty(v.shape, dtype=torch.float32)) if n else empty
                       for v, w, n in zip(values, is_weight, need_values)]


def _frozen_linear_weight(base: nn.Module) -> Optional[torch.Tensor]:
    """The weight `_LinearWithSlice` may compute the base with: a frozen plain `nn.Linear`'s, or what a Linear
    subclass returns from `frozen_linear_weight()` (fp8 storage dequantized); None: call the base layer itself."""
    if type(base) is nn.Linear:
        weight = base.weight
    elif callable(getattr(base, "frozen_linear_weight", None)):
        weight = base.frozen_linear_weight()
    else:
        return None
    if (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad) or "forward" in base.__dict__
            or not weight.is_contiguous()):
        return None
    return weight


def _shadow_parameters(module: nn.Module, values: dict) -> None:
    """Make `module.<name>` read `values[name]` instead of its parameter: an instance attribute wins over
    `module._parameters` in attribute access (torch.func.functional_call does the same for a call, at about the cost
    of a small norm itself). Undone by `_unshadow_parameters`."""
    module.__dict__.update(values)


def _unshadow_parameters(module: nn.Module, names) -> None:
    for name in names:
        module.__dict__.pop(name, None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the slice's contribution is computed in: autocast's when active, else float32."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.float32


class SliceLayer(BaseTunerLayer):
    """State and merge logic shared by every slice layer: per adapter, the values of each sliced parameter."""

    adapter_layer_names = ("slice_values",)
    other_param_names = ("slice_index", "slice_scale")

    def __init__(self, base_layer: Optional[nn.Module], **kwargs) -> None:
        if base_layer is not None:
            self.base_layer = base_layer
        self.slice_values = nn.ModuleDict({})
        self.slice_index: dict[str, dict[str, TileIndex]] = {}
        self.slice_scale: dict[str, float] = {}
        self._merge_originals: dict[str, dict[str, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

    # -- PEFT's layer attributes ----------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self._features()[0]

    @property
    def out_features(self) -> int:
        return self._features()[1]

    def _features(self) -> tuple:
        """(in, out) of the base Linear, as PEFT's layers give them; for norms and raw parameters (weights acting
        per feature: (dim,), (1, 6, dim)) the feature size both ways, the size the module maps to itself."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        params = self.sliced_parameters()
        name = next((n for n in params if any(n in v for v in self.slice_values.values())), next(iter(params)))
        return params[name].shape[-1], params[name].shape[-1]

    # -- the parameters this layer slices ------------------------------------------------------------------
    def sliced_parameters(self) -> dict[str, nn.Parameter]:
        """The base parameters this layer may slice, by their name on the base module: what
        `named_parameters(recurse=False)` gives, read from `_parameters` directly (every patched call asks; the
        generator is a fixed cost per call)."""
        return {name: p for name, p in self.get_base_layer()._parameters.items() if p is not None}

    def update_layer(self, adapter_name: str, entries: dict, init_weights: bool = True, inference_mode: bool = False):
        """Add an adapter: `entries` maps a base parameter name to (ParamLayout, sorted tile indices)."""
        base_params = self.sliced_parameters()
        values = nn.ParameterDict({})
        index = {}
        for pname, (layout, tiles) in entries.items():
            idx = TileIndex(layout, tiles)
            base = base_params[pname]
            device = None if base.device.type == "meta" else base.device
            data = torch.zeros(idx.value_shape(), dtype=torch.float32, device=device)
            if not init_weights:
                gen = torch.Generator().manual_seed(_hash64("init", adapter_name, layout.name) % (2**63))
                data = (torch.randn(idx.value_shape(), generator=gen) * INIT_STD).to(data.device)
            values[pname] = nn.Parameter(data)
            index[pname] = idx
        self.slice_values[adapter_name] = values
        self.slice_index[adapter_name] = index
        self.slice_scale[adapter_name] = 1.0
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # PEFT's helper also casts adapters to the base dtype; slice values stay float32 whatever the base dtype
        if adapter_name not in self.slice_values:
            return
        params = self.sliced_parameters()
        for pname, value in self.slice_values[adapter_name].items():
            target = device if device is not None else params[pname].device
            if target.type != "meta" and value.device.type != "meta" and value.device != target:
                self.slice_values[adapter_name][pname] = nn.Parameter(value.to(target), requires_grad=value.requires_grad)

    # -- scale (diffusers' set_adapters weights, fuse_lora(lora_scale)) -----------------------------------
    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.slice_scale:
            self.slice_scale[adapter] = float(scale)

    def scale_layer(self, scale: float) -> None:
        for adapter in self.active_adapters:
            if adapter in self.slice_scale:
                self.slice_scale[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for adapter in self.active_adapters:
            if adapter in self.slice_scale:
                self.slice_scale[adapter] = 1.0 if scale is None else self.slice_scale[adapter] / scale

    # -- deltas ---------------------------------------------------------------------------------------------
    def _adapters_to_apply(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.slice_values]

    def _keep_held_columns(self, output, patched: dict) -> None:
        """Autograd keeps, of each activation multiplied by a patched parameter, the held columns only
        (`saved_columns.py`)."""
        keep_held_columns(output, patched, lambda name, t: held_columns(self, name, t.shape[-1], t.device))

    def _selected(self, adapter: str, pname: str, tensor: torch.Tensor):
        """(flat view, index) of `tensor` (shaped like parameter `pname`) such that `view[index]` are the entries the
        adapter's values hold, in the values' shape: tile t (row * segments + segment) is row t of the (-1, width)
        view, else element t of the flat view. One index along dim 0: `index_select`/`index_copy` serve it."""
        index = self.slice_index[adapter][pname]
        idx = index.on(tensor.device)
        if index.layout.tiled_rows:
            return tensor.view(-1, index.tile_width), idx["tiles"]
        return tensor.view(-1), idx["flat"]

    def dense_delta(self, adapter: str, pname: str, like: torch.Tensor) -> torch.Tensor:
        """The adapter's delta of parameter `pname` as a dense float32 tensor shaped like `like` (norms, tests)."""
        values = self.slice_values[adapter][pname] * self.slice_scale[adapter]
        view, at = self._selected(adapter, pname, torch.zeros(like.shape, dtype=torch.float32, device=like.device))
        return view.index_copy(0, at, values.float()).view(like.shape)

    def get_delta_weight(self, adapter: str) -> dict[str, torch.Tensor]:
        """Dense deltas of every parameter the adapter slices in this layer."""
        params = self.sliced_parameters()
        return {p: self.dense_delta(adapter, p, params[p]) for p in self.slice_values[adapter]}

    def patched_parameters(self) -> dict[str, torch.Tensor]:
        """W + delta of every parameter the active adapters slice here, in the base parameter's dtype.

        Only the selected entries change: round(W + delta) there, W elsewhere (what a dense float32 delta added
        everywhere and rounded gives). One gather and one out-of-place copy into a flat view per parameter, and no
        cast dispatched to a dtype a tensor already has: every call of a sliced norm pays this, whatever the clip."""
        params = self.sliced_parameters()
        patched = {}
        for adapter in self._adapters_to_apply():
            scale = self.slice_scale[adapter]
            for pname, values in self.slice_values[adapter].items():
                base = patched.get(pname, params[pname])
                flat, at = self._selected(adapter, pname, base)
                current = flat.index_select(0, at)
                delta = values if scale == 1.0 else values * scale
                merged = ((current if current.dtype == torch.float32 else current.float())
                          + (delta if delta.dtype == torch.float32 else delta.float()))
                merged = merged if merged.dtype == base.dtype else merged.to(base.dtype)
                patched[pname] = flat.index_copy(0, at, merged).view(base.shape)
        return patched

    # -- merge / unmerge ------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        params = self.sliced_parameters()
        for adapter in adapter_names:
            if adapter not in self.slice_values:
                continue
            originals, updates = {}, []
            for pname, values in self.slice_values[adapter].items():
                view, key = self._selected(adapter, pname, params[pname].data)
                original = view[key]  # advanced indexing: already a copy
                merged = (original.float() + values.detach().float() * self.slice_scale[adapter]).to(original.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs detected in the merged weights of adapter {adapter!r} ({pname}): "
                                     "the slice is broken, nothing was merged")
                originals[pname] = original
                updates.append((view, key, merged))
            for view, key, merged in updates:
                view[key] = merged
            self._merge_originals[adapter] = originals
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the base weights exactly (the touched originals were kept at merge time)."""
        params = self.sliced_parameters()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            for pname, original in self._merge_originals.pop(adapter, {}).items():
                view, key = self._selected(adapter, pname, params[pname].data)
                view[key] = original

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._merge_originals.pop(adapter_name, None)


class Linear(nn.Module, SliceLayer):
    """Slice of an `nn.Linear`: row tiles of the weight, elements of the bias.

    `input_grad_columns`: None (the whole input gradient), or the only input columns whose gradient anything reads,
    set for one call of its block by `modulation.ModulationInputGrad`. `norm_input`: None, or where a Wan block's
    norm fed this call's input, set for one call of its block by `recompute.py`'s block hooks. `ffn_hidden`: None,
    or where a FeedForward hands this layer gelu's input under torch.compile (`recompute.install_ffn_hooks`).
    """

    ffn_hidden = None

    def __init__(self, base_layer: nn.Linear, adapter_name: str, entries: dict, init_weights=True, **kwargs):
        super().__init__()
        SliceLayer.__init__(self, base_layer, **kwargs)
        self.input_grad_columns: Optional[torch.Tensor] = None
        self.norm_input = None
        self._norm_input_checked: dict = {}  # (dtypes, rows): whether the recomputed input matched bit for bit
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, entries, init_weights=init_weights)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = [] if self.merged else self._adapters_to_apply()
        if not adapters or x.numel() == 0:
            return self.base_layer(x, *args, **kwargs)
        dtype = _compute_dtype(x)
        x2d = x.reshape(-1, x.shape[-1])
        base = self.base_layer
        weight = _frozen_linear_weight(base) if not args and not kwargs else None
        autocast = torch.is_autocast_enabled(x.device.type)
        if weight is not None and not autocast and weight.dtype != x.dtype:
            weight = None  # the base layer raises its own dtype error (or casts, for subclasses that do)
        if weight is not None:
            slices, values = [], []
            for adapter in adapters:
                scale = self.slice_scale[adapter]
                for kind, v in self.slice_values[adapter].items():
                    index = self.slice_index[adapter][kind]
                    slices.append((kind, index.on(x.device), scale, index.nmax if kind == "weight" else 0))
                    values.append(v)
            base_dtype = dtype if autocast else weight.dtype
            owned = weight is not base.weight
            if torch.is_grad_enabled() and (x2d.requires_grad or any(v.requires_grad for v in values)):
                recompute = (gelu_input(x) or norm_input(x, self.norm_input, self._norm_input_checked)
                             or compiled_gelu_input(x, self.ffn_hidden))
                result = _LinearWithSlice.apply(x2d, weight, base.bias, owned, base_dtype, dtype, tuple(slices),
                                                self.input_grad_columns, recompute, *values)
            else:
                result = linear_with_slice(x2d, weight, base.bias, owned, base_dtype, tuple(slices), values)[0]
            return result.view(*x.shape[:-1], result.shape[-1])
        result = base(x2d, *args, **kwargs)  # 2-D in: the output is not a view, so it can take the slice in place
        if result._base is not None or not result.is_contiguous():
            result = result.clone()
        for adapter in adapters:
            values, index = self.slice_values[adapter], self.slice_index[adapter]
            w_values, b_values = values["weight"] if "weight" in values else None, values["bias"] if "bias" in values else None
            w_index = index["weight"].on(x.device) if w_values is not None else {}
            nmax = index["weight"].nmax if w_values is not None else 0
            bias_idx = index["bias"].on(x.device)["flat"] if b_values is not None else None
            result = _SliceLinearDelta.apply(result, x2d, w_values, b_values, w_index.get("seg_ids"),
                                             w_index.get("slot"), w_index.get("rows_padded"), bias_idx, nmax, dtype,
                                             self.slice_scale[adapter])
        return result.view(*x.shape[:-1], result.shape[-1])

    def __repr__(self) -> str:
        return "slice." + super().__repr__()


class Elementwise(nn.Module, SliceLayer):
    """Slice of a leaf module with small parameters (LayerNorm, RMSNorm, ...): runs it with W + delta."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, entries: dict, init_weights=True, **kwargs):
        super().__init__()
        SliceLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, entries, init_weights=init_weights)

    def forward(self, *args: Any, **kwargs: Any):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if self.merged:
            return self.base_layer(*args, **kwargs)
        patched = self.patched_parameters()
        if not patched:
            return self.base_layer(*args, **kwargs)
        _shadow_parameters(self.base_layer, patched)  # W + delta, for this call
        try:
            output = self.base_layer(*args, **kwargs)
        finally:
            _unshadow_parameters(self.base_layer, patched)
        self._keep_held_columns(output, patched)
        return output

    def __repr__(self) -> str:
        return "slice." + super().__repr__()


class ParamSlice(nn.Module, SliceLayer):
    """Slice of raw parameters owned by a container module (e.g. a Wan block's `scale_shift_table`).

    Attached to the owner as its child `sliced_params`; the owner's forward sees W + delta through the instance
    attribute that shadows the parameter between a forward pre-hook and a forward hook.
    """

    def __init__(self, owner: nn.Module, adapter_name: str, entries: dict, init_weights=True, **kwargs):
        super().__init__()
        SliceLayer.__init__(self, None, **kwargs)
        # a plain (unregistered) reference: not a child module, and deepcopy maps it to the copied owner
        object.__setattr__(self, "_owner", owner)
        self._active_adapter = adapter_name
        self._hooks = [
            owner.register_forward_pre_hook(self._shadow_parameters),
            owner.register_forward_hook(self._remove_shadows, always_call=True),
        ]
        object.__setattr__(self, "_modulation", modulation_input_grad(owner))
        self.update_layer(adapter_name, entries, init_weights=init_weights)

    @property
    def owner(self) -> nn.Module:
        return self._owner

    def get_base_layer(self) -> nn.Module:
        return self.owner

    def _shadow_parameters(self, owner, args):
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return
        if self.merged:
            return
        _shadow_parameters(owner, self.patched_parameters())
        if self._modulation is not None:
            self._modulation.enter(args, self)

    def _remove_shadows(self, owner, args, output):
        names = self.sliced_parameters()
        patched = {name: owner.__dict__[name] for name in names if name in owner.__dict__}
        if patched and output is not None:
            self._keep_held_columns(output, patched)
        _unshadow_parameters(owner, names)
        if self._modulation is not None:
            self._modulation.leave()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names):
        """PEFT's unload: merge if asked, drop the hooks; the model tuner then removes this child."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self.remove_hooks()
        return None

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        owner = self.owner
        if owner is not None:
            self._remove_shadows(owner, None, None)

    def forward(self, *args, **kwargs):
        raise RuntimeError("sliced_params is applied through hooks on its owner module and is never called directly")

    def extra_repr(self) -> str:
        return f"owner={type(self.owner).__name__}"


_module_imported(__name__)
