"""Inputs of sliced Linears that backward recomputes from a tensor other autograd nodes keep anyway.

The tiles' gradient reads the Linear's input x, which the frozen base never keeps (its input gradient needs W
alone): kept, x is one more activation per sliced input, tokens x width (on Wan 1.3B's width, three of a block's
eighteen kept activations; measured on the CPU sweep, the step's tensor peak fell from 1.14-1.16x the frozen base's
to 1.03-1.06x once they were recomputed). Where x is a cheap function of a tensor autograd keeps for another node,
that tensor is kept instead and x is computed again in backward, bit for bit (the same kernels on the same inputs):
- x = gelu(h), the input of a Wan FFN's `net.2`: gelu's node keeps h;
- x = norm2(h), attn2's q input, and x = norm1(h) * (1 + scale) + shift, attn1's q/k/v input (norm3 and its rows
  for the FFN's input): the LayerNorm's node keeps h; scale and shift are rows of the block's modulation, one per
  sample and channel.
The norm rules are read from diffusers' `WanTransformerBlock.forward`: they apply to blocks that run it, while they
run it (block hooks set `Linear.norm_input` for the call), and each layer checks once per dtype that the recomputed
x equals its input bit for bit before it relies on it. Where the norm's input carries no gradient (the first block
when nothing before it trains), no node keeps it and x is kept as before. Nothing is recomputed under saved-tensor
hooks (checkpointing and offloading decide what is kept). Under torch.compile no autograd node can be read: there
the FFN's layout says x = gelu(h) (`install_ffn_hooks`: net.0.proj hands h to net.2 within the call), and the
compiler's partitioner recomputes the norm-fed inputs (in blocks compiled by `slice_ft.compile`).

Why by hand: autograd keeps what each op's own backward needs and cannot be told that a tensor is a cheap function
of another node's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .saved_columns import saved_tensor_hooks_active

logger = logging.getLogger(__name__)

# The Linears a Wan block feeds from a norm: (the norm, the modulation rows (shift, scale) applied after it or None)
NORM_INPUTS = {
    "attn1.to_q": ("norm1", (0, 1)),
    "attn1.to_k": ("norm1", (0, 1)),
    "attn1.to_v": ("norm1", (0, 1)),
    "attn2.to_q": ("norm2", None),
    "ffn.net.0.proj": ("norm3", (3, 4)),
}


@dataclass(frozen=True)
class Recompute:
    """What a Linear keeps for its tiles' gradient instead of its input x, and how x is made from it again."""

    source: torch.Tensor  # another node keeps it anyway
    redo: Callable[[torch.Tensor], torch.Tensor]  # x, bit for bit, from `source`
    rowwise: bool = False  # whether `redo` of some of source's rows (tokens) gives those rows of x
    gelu: Optional[str] = None  # x = gelu(source, approximate=gelu): what a custom op can be told instead of `redo`


def gelu_recompute(h: torch.Tensor, approximate: str) -> Recompute:
    """x = gelu(h), made again from h a chunk of tokens at a time if need be."""
    return Recompute(h, lambda kept: torch.nn.functional.gelu(kept, approximate=approximate), rowwise=True,
                     gelu=approximate)


def _recomputing_allowed() -> bool:
    # the compiler check comes first: reading grad_fn under the compiler would split its graph
    return not torch.compiler.is_compiling() and not saved_tensor_hooks_active()


def gelu_input(x: torch.Tensor) -> Optional[Recompute]:
    """x = gelu(h) as autograd recorded it (a Wan FFN's hidden activation, the widest of a block): keep h."""
    if not _recomputing_allowed():
        return None
    node = x.grad_fn
    if node is None or node.name() != "GeluBackward0":
        return None
    h = node._saved_self
    if h.shape != x.shape or h.dtype != x.dtype:
        return None
    return gelu_recompute(h.detach(), node._saved_approximate)


class _BlockCall:
    """One call of a Wan block: its modulation `scale_shift_table + temb`, computed when a layer first asks (by
    then a slice of the table has put W + delta in its place, as the block's own forward reads it)."""

    def __init__(self, block: nn.Module, temb: torch.Tensor):
        self.block, self.temb, self._modulation = block, temb, None

    def modulation(self) -> torch.Tensor:
        if self._modulation is None:
            with torch.no_grad():
                self._modulation = self.block.scale_shift_table + self.temb.float()
        return self._modulation


@dataclass(frozen=True)
class NormInput:
    """Where one block call feeds a Linear from a norm: the call, the norm's eps, the modulation rows or None."""

    call: _BlockCall
    eps: float
    rows: Optional[tuple[int, int]]


def norm_input(x: torch.Tensor, site: Optional[NormInput], checked: dict) -> Optional[Recompute]:
    """x as the block's norm (and modulation) made it from the norm's input, which the LayerNorm's node keeps: keep
    that input. `checked`: the layer's record of which (dtypes, rows) were found to recompute x bit for bit."""
    if site is None or not _recomputing_allowed():
        return None
    node = x.grad_fn
    if node is not None and node.name() == "ToCopyBackward0":  # `.type_as(hidden_states)` in a low-precision block
        node = node.next_functions[0][0]
    if site.rows is not None:
        for expected in ("AddBackward0", "MulBackward0"):  # `+ shift`, then `* (1 + scale)`
            if node is None or node.name() != expected:
                return None
            node = node.next_functions[0][0]
    if node is None or node.name() != "NativeLayerNormBackward0":
        return None
    h = node._saved_input
    if h.shape != x.shape:
        return None
    shape, weight, bias = tuple(node._saved_normalized_shape), node._saved_weight, node._saved_bias
    dtype, eps = x.dtype, site.eps
    shift = one_plus_scale = None
    if site.rows is not None:
        modulation = site.call.modulation()
        if modulation.ndim != 3 or modulation.shape[0] != x.shape[0]:
            return None
        shift_row, scale_row = site.rows
        shift, one_plus_scale = modulation[:, shift_row:shift_row + 1], 1 + modulation[:, scale_row:scale_row + 1]

    def redo(kept: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.layer_norm(kept, shape, weight, bias, eps)
        if one_plus_scale is not None:
            out = out * one_plus_scale + shift
        return out.to(dtype)

    key = (dtype, h.dtype, x.device.type, torch.is_autocast_enabled(x.device.type), site.rows)
    if key not in checked:
        with torch.no_grad():
            checked[key] = torch.equal(redo(h.detach()), x.detach())
        if not checked[key]:
            logger.warning("a Wan block's norm input is not what diffusers' WanTransformerBlock.forward computes "
                           "(%s); the sliced Linear keeps its input for backward instead of recomputing it", key)
    return Recompute(h.detach(), redo) if checked[key] else None


def _enter_block(block: nn.Module, args: tuple, kwargs: dict) -> None:
    temb = args[2] if len(args) > 2 else kwargs.get("temb")
    if not isinstance(temb, torch.Tensor) or temb.ndim != 3:  # Wan 2.2 TI2V's per-token modulation: tokens wide
        return
    call = _BlockCall(block, temb)
    for layer, norm, rows in _norm_fed_layers(block):
        layer.norm_input = NormInput(call, _eps_of(norm), rows)


def _leave_block(block: nn.Module, args: tuple, kwargs: dict, output) -> None:
    for layer, _, _ in _norm_fed_layers(block):
        layer.norm_input = None


def _norm_fed_layers(block: nn.Module):
    """(slice Linear, norm, rows) for the Linears of `block` that a norm feeds and a slice wraps."""
    for path, (norm_name, rows) in NORM_INPUTS.items():
        try:
            layer, norm = block.get_submodule(path), block.get_submodule(norm_name)
        except AttributeError:
            continue
        if hasattr(layer, "norm_input"):  # a slice `Linear` (layer.py imports this module, not back)
            yield layer, norm, rows


def _eps_of(norm: nn.Module) -> float:
    base = norm.get_base_layer() if hasattr(norm, "get_base_layer") else norm  # a sliced norm wraps its base
    return base.eps


def install_block_hooks(model: nn.Module) -> int:
    """Hook every block of `model` that runs diffusers' `WanTransformerBlock.forward`, once; returns how many.
    The hooks are plain functions of the block (deepcopy and pickle keep them) and do nothing where no slice
    Linear is fed by a norm."""
    from .modulation import runs_wan_block_forward

    hooked = 0
    for module in model.modules():
        if not runs_wan_block_forward(module) or _enter_block in module._forward_pre_hooks.values():
            continue
        module.register_forward_pre_hook(_enter_block, with_kwargs=True)
        module.register_forward_hook(_leave_block, with_kwargs=True, always_call=True)
        hooked += 1
    return hooked


def remove_block_hooks(model: nn.Module) -> None:
    """Undo `install_block_hooks` and `install_ffn_hooks` (PEFT's unload leaves the model as it found it)."""
    for module in model.modules():
        module.__dict__.pop("ffn_hidden", None)
        for hooks, hook in ((module._forward_pre_hooks, _enter_block), (module._forward_hooks, _leave_block),
                            (module._forward_hooks, _keep_ffn_hidden), (module._forward_hooks, _drop_ffn_hidden)):
            for key in [k for k, fn in hooks.items() if fn is hook]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


# -- under torch.compile: x = gelu(h) read from the FFN's layout -----------------------------------------------------
class FfnHidden:
    """The pre-activation h of one call of a diffusers `FeedForward` (gelu's input), handed from `net.0.proj`'s
    output to `net.2` under torch.compile, where autograd's nodes cannot be read.

    Why: without h, the compiler's partitioner makes net.2's input again whole in backward for the tiles' gradient
    (inductor keeps a reused gelu whole on the CPU), a tokens x FFN-width transient the frozen base never holds
    (1.15x its peak at 2 compiled blocks, 768 tokens); with h, the tiles' gradient makes it chunk by chunk."""

    def __init__(self, approximate: str):
        self.approximate, self.h = approximate, None


def _keep_ffn_hidden(proj: nn.Module, args: tuple, output) -> None:
    if torch.compiler.is_compiling():  # eager reads gelu's node instead (`gelu_input`)
        proj.ffn_hidden.h = output


def _drop_ffn_hidden(ffn: nn.Module, *args) -> None:
    # after each call, also one that raised: h is never kept past the call (net.2 disabled or merged does not take it)
    ffn.ffn_hidden.h = None


def compiled_gelu_input(x: torch.Tensor, hidden: Optional[FfnHidden]) -> Optional[Recompute]:
    """Under torch.compile, x = gelu(h) of this FFN call (`install_ffn_hooks`): keep h."""
    if hidden is None or not torch.compiler.is_compiling():
        return None
    h, hidden.h = hidden.h, None
    if h is None or h.shape != x.shape or h.dtype != x.dtype:
        return None
    return gelu_recompute(h.detach(), hidden.approximate)


def install_ffn_hooks(model: nn.Module) -> int:
    """For every diffusers `FeedForward` whose `net` is (GELU with its `proj`, dropout 0, a slice Linear), hand gelu's
    input from net.0.proj to net.2 within each call under torch.compile; returns how many. Run after injection (the
    hook sits on the module now at net.0.proj) and again after each one; idempotent."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    hooked = 0
    for ffn in model.modules():
        net = getattr(ffn, "net", None)
        if type(ffn).forward is not FeedForward.forward or "forward" in ffn.__dict__ or len(net) < 3:
            continue
        gelu, dropout, out = net[0], net[1], net[2]
        if (type(gelu).forward is not GELU.forward or type(gelu).gelu is not GELU.gelu or "forward" in gelu.__dict__
                or not (isinstance(dropout, nn.Identity) or (type(dropout) is nn.Dropout and dropout.p == 0))
                or not hasattr(out, "norm_input")):  # net.2 is not a slice Linear
            continue
        hidden = ffn.__dict__.get("ffn_hidden") or FfnHidden(gelu.approximate)
        for module in (ffn, gelu.proj, out):
            module.ffn_hidden = hidden
        if _keep_ffn_hidden not in gelu.proj._forward_hooks.values():
            gelu.proj.register_forward_hook(_keep_ffn_hidden)
        if _drop_ffn_hidden not in ffn._forward_hooks.values():
            ffn.register_forward_hook(_drop_ffn_hidden, always_call=True)
        hooked += 1
    return hooked
