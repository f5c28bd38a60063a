"""The gradient of a Wan block's self-attention modulation, at the cost of the columns the slice holds.

A Wan block feeds `norm1(x) * (1 + scale_msa) + shift_msa` to attn1's q, k and v, where shift and scale are rows 0
and 1 of `scale_shift_table` (plus the time embedding). Where nothing before the block trains (the first block: its
input and the time embedding carry no gradient), the only reader of the q/k/v input gradient is the slice of those
two rows, and it reads only the columns of the entries it holds. Computing the full input gradient there costs three
tokens x dim x dim matmuls per step that neither a Linear-only slice nor a LoRA pays (4 % of a 2-block step at 192
tokens, measured with a FLOP counter); computing those columns alone costs tokens x dim x columns.

Why by hand: autograd asks a function for its whole input gradient and cannot say which part anything reads; the
rule that only these columns are read comes from the block's structure, which this module checks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .saved_columns import held_columns

MODULATION_ROWS = 2  # scale_shift_table rows read before attn1: shift_msa (0) and scale_msa (1)
QKV = ("to_q", "to_k", "to_v")


class ModulationInputGrad:
    """Set, for one call of a Wan block, the input columns whose gradient attn1's sliced q/k/v must compute.

    Built by the block's `ParamSlice` when its owner has a Wan block's structure (`modulation_input_grad`); `enter` runs in
    that slice's forward pre-hook, `leave` in its forward hook. The columns are read by each layer's forward and kept
    with its autograd node, so a backward after `leave` (and a checkpointed recompute, which calls the hooks again)
    sees the same columns.
    """

    def __init__(self, owner: nn.Module):
        self.norm1, self.attn1 = owner.norm1, owner.attn1
        self.dim = owner.scale_shift_table.shape[-1]

    def enter(self, args: tuple, param_slice) -> None:
        columns = None
        if torch.is_grad_enabled() and self._upstream_has_no_gradient(args):  # no graph: nothing reads columns
            columns = self.columns(param_slice, args[0].device)
        for layer in self._qkv_slice_layers():
            layer.input_grad_columns = columns

    def leave(self) -> None:
        for layer in self._qkv_slice_layers():
            layer.input_grad_columns = None

    def _upstream_has_no_gradient(self, args: tuple) -> bool:
        """The block was called as diffusers calls it, (hidden_states, encoder_hidden_states, temb, rotary_emb), and
        neither the input, the time embedding nor norm1 carries a gradient."""
        if len(args) < 3 or not all(isinstance(a, torch.Tensor) for a in (args[0], args[2])):
            return False
        if args[0].requires_grad or args[2].requires_grad:
            return False
        return not any(p.requires_grad for p in self.norm1.parameters())

    def columns(self, param_slice, device: torch.device) -> torch.Tensor:
        """Sorted input columns of the entries the active adapters hold in rows 0 and 1 of `scale_shift_table`."""
        return held_columns(param_slice, "scale_shift_table", self.dim, device, rows=MODULATION_ROWS)

    def _qkv_slice_layers(self):
        for name in QKV:
            layer = getattr(self.attn1, name, None)
            if hasattr(layer, "input_grad_columns"):  # a slice `Linear` (layer.py imports this module, not back)
                yield layer


def runs_wan_block_forward(module: nn.Module) -> bool:
    """Whether `module` runs diffusers' `WanTransformerBlock.forward` itself (the structure this package's block
    rules are read from), not a forward of its own."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    return getattr(type(module), "forward", None) is WanTransformerBlock.forward and "forward" not in module.__dict__


def modulation_input_grad(owner: nn.Module) -> Optional[ModulationInputGrad]:
    """A `ModulationInputGrad` for `owner` if it runs diffusers' `WanTransformerBlock.forward` (the structure the
    rule above is read from) with a (1, 6, dim) `scale_shift_table`, else None."""
    if not runs_wan_block_forward(owner):
        return None
    table = getattr(owner, "scale_shift_table", None)
    if table is None or tuple(table.shape[:2]) != (1, 6):
        return None
    return ModulationInputGrad(owner)
