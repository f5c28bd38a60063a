"""`--compile`: torch.compile of each transformer block's forward (musubi-tuner's flag), eager by default.

Each block's `forward` is compiled in place (`block.forward = torch.compile(block.forward)`): module names,
state-dict keys, the slice's parameters and hooks stay as they are, so checkpoints, exact resume, gradient
checkpointing (which calls the block) and block swap (whose hooks run around the call) see the same modules. The
slice's own hooks on a block (`scale_shift_table`) run outside the compiled region too. Each call runs with the
partitioner setting below, so a block compiles to keep for backward what the frozen base's block keeps.
"""

from __future__ import annotations

import torch
import torch._functorch.config as functorch_config
from torch import nn

from .choices import COMPILE_MODES

# The partitioner (which decides, when a block compiles, what forward keeps for backward) bans recomputing any
# activation that backward reads whole, so a sliced Linear's input (gelu's output, the modulated norms), which the
# tiles' gradient reads, was kept per block beside what it is made from: 1.5x the frozen base's saved activations.
# Recomputed instead, the slice keeps what the frozen base keeps (measured in benchmarks/bench_train_step.py).
# (a torch without the option, older than this project's own, keeps its default)
_RECOMPUTE_INPUTS = functorch_config.patch({
    k: v for k, v in {"ban_recompute_materialized_backward": False}.items() if hasattr(functorch_config, k)})


class CompileUnavailable(RuntimeError):
    """torch.compile cannot build kernels on this machine (no C++ compiler, broken inductor, ...)."""


def check_compile_works(device: torch.device | str = "cpu", backend: str = "inductor") -> None:
    """Compile and run one tiny function on `device` now, so a machine that cannot compile fails before loading
    a model, with a message instead of an inductor traceback in the first training step."""
    def probe(x):
        return torch.nn.functional.gelu(x) * 2 + 1

    try:
        torch._dynamo.reset()
        x = torch.randn(8, device=device)
        out = torch.compile(probe, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(out, probe(x))
    except Exception as exc:  # inductor raises many types (CppCompileError, BackendCompilerFailed, OSError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CompileUnavailable(
            f"--compile: torch.compile ({backend}) cannot build kernels on this machine ({type(exc).__name__}: {first}). "
            "The CPU backend needs a C++ compiler (e.g. `apt-get install g++`, or set CXX), the GPU backend needs "
            "triton. Fix that, or train without --compile (eager, the default)."
        ) from exc
    finally:
        torch._dynamo.reset()


def compile_blocks(transformer: nn.Module, *, mode: str | None = None, backend: str = "inductor",
                   dynamic: bool | None = None, fullgraph: bool = False) -> int:
    """Compile the forward of every block in `transformer.blocks` in place; returns how many were compiled."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"compile_blocks needs a transformer with a `blocks` ModuleList, got {type(transformer).__name__}")
    for block in blocks:
        if "forward" in block.__dict__:
            continue  # compiled already
        compiled = torch.compile(block.forward, mode=mode, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
        block.forward = _RECOMPUTE_INPUTS(compiled)
    # each block is its own code object: the same graph serves them all, so allow one cache entry per block
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 8 * len(blocks))
    return len(blocks)
