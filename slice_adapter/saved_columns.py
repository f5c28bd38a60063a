"""What autograd keeps for a sliced elementwise parameter: only the activation columns the slice holds.

A norm weight or a Wan block's `scale_shift_table` multiplies an activation (`norm(x) * weight`, `norm1(x) * (1 +
scale_msa)`, `attn_output * gate_msa`, ...). Once the parameter trains, autograd keeps that activation whole for the
parameter's gradient, tokens x dim per product (measured: 7 of them per Wan block, the default slice's 1.43x the
frozen step's tensor peak against the Linear-only slice's 1.15x). The gradient of column j of the parameter reads
column j of the activation alone, and only the entries the slice holds are read at all; so after the forward each such
saved activation is packed down to the held columns and unpacked, in backward, as zeros elsewhere. The held entries'
gradients are bit for bit what they were: the same product and the same reduction over tokens, column by column.

It applies only where the parameter's gradient has no other reader: the path from the parameter to the product goes
through ops that keep columns apart (casts, adds of tensors that carry no gradient, splits and squeezes of other
dimensions). Where anything else on that path trains (a trained time embedding), the activation is kept whole.

Why by hand: autograd keeps what an op's whole gradient needs and cannot be told that only some columns are read;
`SavedTensor.register_hooks` lets the kept tensor be swapped after the fact.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

# autograd nodes a path from the parameter may cross: each maps column j to column j and has one input with a gradient
_COLUMN_PRESERVING = {"ToCopyBackward0", "AddBackward0", "AddBackward1", "SplitBackward0", "SplitWithSizesBackward0",
                      "UnsafeSplitBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
                      "UnsqueezeBackward0"}
_DIM_OPS = {"SplitBackward0", "SplitWithSizesBackward0", "UnsafeSplitBackward0", "SqueezeBackward1",
            "SqueezeBackward2"}  # ones that act on a dimension: it must not be the last


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (gradient checkpointing, activation offload) decide what autograd keeps now."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is None or top_hooks(False) is not None


def held_columns(layer, pname: str, width: int, device: torch.device, rows: Optional[int] = None
                 ) -> Optional[torch.Tensor]:
    """Sorted last-dimension columns of the entries the active adapters hold in parameter `pname` (of its first
    `rows` rows of `width` entries, or of all), cached; None where a slice of it holds row tiles (a matrix: its
    products are matmuls, not this module's business)."""
    indexes = tuple(layer.slice_index[a][pname] for a in layer._adapters_to_apply() if pname in layer.slice_index[a])
    cache = layer.__dict__.setdefault("_held_columns", {})
    key = (pname, indexes, torch.device(device), rows)  # the index objects themselves: a re-added adapter gets new ones
    if key not in cache:
        if any(index.layout.tiled_rows for index in indexes):
            cache[key] = None
        else:
            flat = [index.on("cpu")["flat"] for index in indexes]
            flat = torch.cat(flat) if flat else torch.empty(0, dtype=torch.long)
            if rows is not None:
                flat = flat[flat < rows * width]
            cache[key] = torch.unique(flat % width).to(device)
    return cache[key]


def keep_held_columns(output, patched: dict, columns_of: Callable[[str, torch.Tensor], Optional[torch.Tensor]]) -> int:
    """After a forward that read the patched tensors `patched` (name: W + delta), make each product of a patched tensor
    with an activation keep only the columns `columns_of(name, tensor)` of that activation (None: leave it whole).
    Returns how many kept activations were shrunk. Nothing is read under the compiler: it decides what to keep, and
    reading `grad_fn` or computing columns there would split the compiled graph."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or saved_tensor_hooks_active():
        return 0
    outputs = [t for t in (output if isinstance(output, (tuple, list)) else (output,))
               if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    columns = {name: columns_of(name, t) for name, t in patched.items() if t.grad_fn is not None}
    sources = {patched[name].grad_fn: name for name, c in columns.items() if c is not None}
    if not outputs or not sources:
        return 0
    start = min(node._sequence_nr() for node in sources)
    shrunk = 0
    for node, saved_name, name in _products_of(outputs, sources, start):
        if _shrink(getattr(node, saved_name), columns[name], patched[name].shape[-1]):
            shrunk += 1
    return shrunk


def _products_of(outputs, sources: dict, start: int) -> Iterable[tuple]:
    """(product node, name of its kept activation, parameter name) for every `MulBackward0` made after `start` with
    one factor computed from a patched tensor alone."""
    seen, stack = set(), [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in sources or node._sequence_nr() < start:
            continue
        seen.add(node)
        if node.name() == "MulBackward0":
            for side, kept in ((1, "_raw_saved_self"), (0, "_raw_saved_other")):
                name = _source_of(node.next_functions[side][0], sources)
                if name is not None:
                    yield node, kept, name
                    break
        stack.extend(edge[0] for edge in node.next_functions)


def _source_of(node, sources: dict, depth: int = 8) -> Optional[str]:
    """The patched tensor's name if `node` leads to it through column-preserving nodes with one graded input each."""
    for _ in range(depth):
        if node is None:
            return None
        if node in sources:
            return sources[node]
        if node.name() not in _COLUMN_PRESERVING:
            return None
        if node.name() in _DIM_OPS:
            sizes = getattr(node, "_saved_self_sym_sizes", None)
            dims = node._saved_dim if isinstance(node._saved_dim, tuple) else (node._saved_dim,)
            if sizes is None or any(d % len(sizes) == len(sizes) - 1 for d in dims):
                return None
        graded = [edge[0] for edge in node.next_functions if edge[0] is not None]
        if len(graded) != 1:
            return None
        node = graded[0]
    return None


def _shrink(saved, columns: torch.Tensor, width: int) -> bool:
    """Pack a kept activation down to `columns` of its last dimension; unpack as zeros elsewhere, same strides."""
    def pack(t):
        if t.shape[-1] != width or not t.is_contiguous():
            return t
        return t.index_select(-1, columns.to(t.device)), t.shape, t.stride()

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        part, shape, stride = packed
        full = torch.empty_strided(shape, stride, dtype=part.dtype, device=part.device).zero_()
        return full.index_copy_(-1, columns.to(part.device), part)

    if saved is None:
        return False
    try:
        saved.register_hooks(pack, unpack)
    except RuntimeError:  # already hooked, or freed: it stays as autograd kept it
        return False
    return True
