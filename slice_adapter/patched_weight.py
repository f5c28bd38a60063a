"""A sliced Linear's matmuls on its weight with the slice's tiles written in: `x @ (W + dW).T` in forward and
`grad_out @ (W + dW)` for the input gradient, one matmul each, as the merged model computes them.

The weight is either a copy made for the matmul (autocast's cast, an fp8 base's dequantized weight), patched, or the
base weight itself, patched in place and restored exactly after the matmul (through `.data`, so autograd's version
checks of other users of W are not tripped).

Under torch.compile they run inside custom ops (`slice_adapter::linear` here, `slice_adapter::linear_backward` in
`layer.py`). Why: the compiler cannot patch a parameter in place, and the alternatives it can trace each cost
activation memory (measured in benchmarks/bench_train_step.py): a patched clone of W in forward and another in
backward are merged into one that is kept from forward to backward (a weight-sized tensor per sliced Linear), and
`grad_out @ W` plus the tiles' part materializes that part, a tokens x in_features tensor per Linear. Opaque to the
compiler, the ops do what eager does.
"""

from __future__ import annotations

from typing import Optional

import torch


def linear_with_slice(x2d, weight, bias, owned, base_dtype, slices, values):
    """`x @ (W + dW).T + (b + db)` without autograd (inference calls it directly: no node, nothing saved):
    (output, x in the matmul's dtype, the patched cast copy of the weight (autocast, fp8) if one was made, else None:
    backward then patches the weight again). Under torch.compile: the custom op, and no copy is returned."""
    if torch.compiler.is_compiling():
        out2d = _linear_op(x2d, weight, bias, base_dtype, *op_args(slices), list(values))
        return out2d, x2d.to(base_dtype), None
    w = weight.to(base_dtype)
    owned = owned or w.dtype != weight.dtype  # a cast copy
    merged, originals = merged_weight(weight, w, owned, slices, values)
    x_base = x2d.to(base_dtype)
    try:
        b = None if bias is None else patched_bias(bias, base_dtype, slices, values)
        out2d = torch.nn.functional.linear(x_base, merged, b)
    finally:
        restore_weight(merged, originals)
    return out2d, x_base, (merged if owned else None)


def input_grad(grad_out, weight, base_dtype, x_dtype, input_columns, slices, values, merged=None):
    """`grad_out @ (W + dW)` in `x_dtype`; `merged`: forward's patched copy of W where it kept one. With
    `input_columns`, only those columns are computed (`modulation.py`); the rest stay zero. Runs eagerly (under
    torch.compile, inside `slice_adapter::linear_backward`)."""
    originals = None
    if merged is None:
        w = weight.to(base_dtype)
        merged, originals = merged_weight(weight, w, w.dtype != weight.dtype, slices, values)
    try:
        if input_columns is None:
            return grad_out.to(merged.dtype).mm(merged).to(x_dtype)
        part = grad_out.to(merged.dtype).mm(merged.index_select(1, input_columns))
        grad_x = grad_out.new_zeros((grad_out.shape[0], merged.shape[1]), dtype=x_dtype)
        return grad_x.index_copy_(1, input_columns, part.to(x_dtype))
    finally:
        restore_weight(merged, originals)


def merged_weight(source, w, owned, slices, values):
    """(the weight to run the matmul with, the tiles' previous values for `restore_weight` or None): `w` (`source`
    or a copy of it made for this matmul, `owned`) with the tiles written in. The base weight itself is patched in
    place through `.data` (autograd's version checks of other users of W are not tripped) and must be restored."""
    target = w if owned else w.data
    originals = _patch(target, source, slices, values, keep_originals=not owned)
    return target, (None if owned else originals)


def _patch(target, source, slices, values, keep_originals, kind="weight"):
    """Write round(W + dW) into the entries of `target` (the matmul's weight or bias: `source` itself, or a copy of it
    in another dtype) that the slices of `kind` hold, adapter after adapter as merging one by one does. W is read
    from `source` (its own dtype), later adapters add to the entries already written. Returns what `restore_weight`
    needs when `keep_originals`.

    A few tiny ops per sliced layer and call, whatever the clip: no cast is dispatched to a dtype a tensor already
    has."""
    originals = []
    first = True
    for (k, index, scale, _), v in zip(slices, values):
        if k != kind:
            continue
        v = v.detach()
        # weight: tile t (row * segments + segment) is row t of the (-1, width) view; bias: one element per entry
        rows, at = ((target.view(-1, v.shape[1]), index["tiles"]) if kind == "weight" else (target, index["flat"]))
        current = (source.view(rows.shape) if first else rows).index_select(0, at)
        first = False
        if keep_originals:
            originals.append((at, current))
        acc = torch.float64 if current.dtype == torch.float64 else torch.float32
        delta = v if v.dtype == acc else v.to(acc)
        merged = (current if current.dtype == acc else current.to(acc)) + (delta if scale == 1.0 else delta * scale)
        rows.index_copy_(0, at, merged if merged.dtype == rows.dtype else merged.to(rows.dtype))
    return originals


def restore_weight(target, originals):
    """Undo the patch of a weight patched in place: the exact previous values, last adapter first."""
    for at, original in reversed(originals or ()):
        target.view(-1, original.shape[1]).index_copy_(0, at, original)


def patched_bias(bias, dtype, slices, values):
    """b + db in `dtype` (a new tensor: biases are small)."""
    if not any(kind == "bias" for kind, _, _, _ in slices):
        return bias if bias.dtype == dtype else bias.to(dtype)
    patched = bias.detach().to(dtype, copy=True)
    _patch(patched, bias, slices, values, keep_originals=False, kind="bias")
    return patched


# -- the same under torch.compile, as a custom op --------------------------------------------------------------------
_WEIGHT_INDEX = ("tiles", "seg_ids", "slot", "rows_padded")  # what a weight slice's ops read of its index


def op_args(slices) -> tuple[list[bool], list[torch.Tensor], list[float], list[int]]:
    """A slices tuple as custom-op arguments (an op takes tensors, lists and scalars): (is a weight slice, the index
    tensors of every slice in a row, scale, nmax). `slices_of` turns them back."""
    return ([kind == "weight" for kind, *_ in slices],
            [index[key] for kind, index, *_ in slices for key in (_WEIGHT_INDEX if kind == "weight" else ("flat",))],
            [scale for _, _, scale, _ in slices], [nmax for *_, nmax in slices])


def slices_of(is_weight, index, scales, nmax) -> tuple:
    """The slices tuple `op_args` was made from."""
    at = iter(index)
    return tuple(("weight" if w else "bias", {key: next(at) for key in (_WEIGHT_INDEX if w else ("flat",))}, s, n)
                 for w, s, n in zip(is_weight, scales, nmax))


@torch.library.custom_op("slice_adapter::linear", mutates_args=())
def _linear_op(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], base_dtype: torch.dtype,
               is_weight: list[bool], index: list[torch.Tensor], scales: list[float], nmax: list[int],
               values: list[torch.Tensor]) -> torch.Tensor:
    # runs eagerly (is_compiling() is False here); W is patched in place and restored before returning: no input is
    # changed when the op ends
    return linear_with_slice(x2d, weight, bias, False, base_dtype, slices_of(is_weight, index, scales, nmax), values)[0]


@_linear_op.register_fake
def _(x2d, weight, bias, base_dtype, is_weight, index, scales, nmax, values):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]), dtype=base_dtype)
