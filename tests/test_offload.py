"""Block swap and fp8 base (slice_ft.offload) on a tiny Wan transformer, CPU only.

On CPU the swap "device" is a second CPU copy: loads allocate fresh storage and copy into it, so the tests can tell
a loaded copy from the home copy by storage pointer. A dispatch-mode guard fails the test if any compute op (forward,
checkpoint recompute or backward) touches a home tensor of a swapped block.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import pathlib
import sys
import weakref

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from slice_ft.offload import (
    FP8_DTYPE,
    Fp8Linear,
    dequantize_weight,
    disable_block_swap,
    enable_block_swap,
    get_block_swap,
    offload_saved_activations,
    quantize_base_to_fp8,
)
from slice_ft.offload import _in_backward  # the swapper's own test for "inside backward"

from conftest import TINY_WAN  # noqa: E402

NUM_LAYERS = 4
CONFIG = dict(TINY_WAN, num_layers=NUM_LAYERS)
TOL = 1e-6


def make_model(seed: int = 0, dtype=torch.float32):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**CONFIG).to(dtype).eval()
    model.requires_grad_(False)
    return model


def make_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, 4, 3, 8, 8, generator=g).to(dtype),
        torch.tensor([500]),
        torch.randn(1, 8, 32, generator=g).to(dtype),
    )


def add_emulated_adapter(model, blocks=range(NUM_LAYERS)):
    """Stand-in for a slice adapter: `slice_test` delta parameters, a `slice_index_test` buffer, trainable biases."""
    for i in blocks:
        block = model.blocks[i]
        out = block.attn1.to_out[0]
        g = torch.Generator().manual_seed(100 + i)
        out.slice_test = nn.Parameter(torch.randn(out.out_features, generator=g) * 0.1)
        out.register_buffer("slice_index_test", torch.arange(out.out_features) % 3)
        out.register_forward_hook(lambda m, a, y: y + m.slice_test * m.slice_index_test)
        block.attn1.to_q.bias.requires_grad_(True)
        block.ffn.net[2].bias.requires_grad_(True)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run_step(model, inputs=None):
    x, t, e = inputs or make_inputs()
    out = model(x, t, e, return_dict=False)[0]
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in trainable(model).items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def storage_ptr(t):
    return t.untyped_storage().data_ptr()


class HomeGuard(TorchDispatchMode):
    """Records every op (except the swapper's own copy-in) that reads the storage of a swapped block's home copy."""

    ALLOWED = {torch.ops.aten.copy_.default, torch.ops.aten.empty_like.default}

    def __init__(self, swapper):
        super().__init__()
        self.home = {storage_ptr(t) for i in swapper.swapped for t in swapper.home_tensors(i).values()}
        self.violations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.ALLOWED:
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, torch.Tensor) and a.device.type == "cpu" and storage_ptr(a) in self.home:
                    self.violations.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def emulated():
    """(base model with the emulated adapter and checkpointing, reference output and grads without swap)."""
    model = make_model()
    add_emulated_adapter(model)
    model.enable_gradient_checkpointing()
    out, grads = run_step(copy.deepcopy(model))
    return model, out, grads


@pytest.mark.parametrize("n_swap", [0, 1, NUM_LAYERS - 1])
def test_block_swap_matches_no_swap_and_evicts(emulated, n_swap):
    base, ref_out, ref_grads = emulated
    model = copy.deepcopy(base)
    frozen_before = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    train_before = {n: (p, p.data_ptr()) for n, p in trainable(model).items()}
    idx_before = {n: b.data_ptr() for n, b in model.named_buffers() if "slice_" in n}
    swapper = enable_block_swap(model, n_swap, "cpu")
    swapper.trace = []
    assert swapper.swapped == tuple(range(NUM_LAYERS - n_swap, NUM_LAYERS))  # the last N blocks swap

    # Every Linear of a swapped block must compute with a loaded copy, in forward and in the backward recompute.
    seen = []
    for i in swapper.swapped:
        home = {storage_ptr(t) for t in swapper.home_tensors(i).values()}
        for lin in (model.blocks[i].attn1.to_q, model.blocks[i].ffn.net[2]):
            lin.register_forward_pre_hook(lambda m, a, home=home, i=i: seen.append((i, storage_ptr(m.weight) in home)))
    with HomeGuard(swapper) as guard:
        out, grads = run_step(model)
    assert guard.violations == []
    assert all(not on_home for _, on_home in seen)
    assert len(seen) == 2 * 2 * n_swap  # 2 layers x (forward + recompute) per swapped block

    assert (out - ref_out).abs().max().item() <= TOL
    assert grads.keys() == ref_grads.keys() and max_diff(grads, ref_grads) <= TOL

    # After forward + backward every swapped block is back on its home copy and nothing stays loaded.
    assert swapper.loaded_blocks() == []
    for i in swapper.swapped:
        assert swapper.is_home(i)
        names = swapper.home_tensors(i)
        assert f"blocks.{i}.attn1.to_q.weight" in names and f"blocks.{i}.scale_shift_table" in names
        assert not any("slice_" in n for n in names)
        assert model.get_parameter(f"blocks.{i}.attn1.to_q.weight") is frozen_before[f"blocks.{i}.attn1.to_q.weight"]
    # Trainable parameters and adapter buffers never moved (same object, same storage).
    for n, (p, ptr) in train_before.items():
        q = model.get_parameter(n)
        assert q is p and q.data_ptr() == ptr
    assert {n: b.data_ptr() for n, b in model.named_buffers() if "slice_" in n} == idx_before

    if n_swap == NUM_LAYERS - 1:
        loads = [(what, i, d) for what, i, d in swapper.trace if what in ("load", "prefetch")]
        fwd = [i for _, i, d in loads if d == "forward"]
        bwd = [i for _, i, d in loads if d == "backward"]
        assert fwd == [1, 2, 3]  # ascending, each prefetched by the block before it
        assert bwd == [2, 1]  # descending: block 3 stayed loaded across the turn, the rest prefetched in reverse
        assert ("hit", 3, "backward") in swapper.trace
        assert swapper.num_prefetch_hits == 2 * n_swap


def slice_model(fp8: bool = False):
    # Built fresh each time, never deep-copied: a copy's ParamSlice would still point at the original block.
    from slice_adapter import SliceConfig

    model = make_model()
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=0, init_weights=False))
    if fp8:
        quantize_base_to_fp8(model)
    model.enable_gradient_checkpointing()
    return model


def test_block_swap_with_slice_adapter():
    ref_out, ref_grads = run_step(slice_model())
    assert len(ref_grads) > 0 and all(".slice_values." in n for n in ref_grads)
    assert any("scale_shift_table" in n for n in ref_grads)  # the block-level ParamSlice is in play
    for n_swap in (1, NUM_LAYERS - 1):
        model = slice_model()
        ptrs = {n: p.data_ptr() for n, p in trainable(model).items()}
        swapper = enable_block_swap(model, n_swap, "cpu")
        with HomeGuard(swapper) as guard:  # also covers the adapter's own pre-hook on the block (scale_shift_table)
            out, grads = run_step(model)
        assert guard.violations == []
        assert (out - ref_out).abs().max().item() <= TOL and max_diff(grads, ref_grads) <= TOL
        assert {n: p.data_ptr() for n, p in trainable(model).items()} == ptrs
        assert swapper.loaded_blocks() == [] and all(swapper.is_home(i) for i in swapper.swapped)


def test_side_stream_protocol_orders_every_copy_before_its_use(monkeypatch):
    """The CUDA branch of block swap with recording stand-ins for streams and events (CPU tensors underneath).

    Every load must be issued on the side stream after it waited for the compute stream (memory reuse), and the
    compute stream must wait on that copy's event before the block computes; a prefetch that is never used must be
    waited on before its memory is dropped. Outputs and gradients still match the unswapped run.
    """
    log = []
    ids = iter(range(10**6))

    class FakeEvent:
        def __init__(self):
            self.id = next(ids)

        def record(self, stream):
            log.append(("record", stream.name, self.id))

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait_stream", self.name, other.name))

        def wait_event(self, event):
            log.append(("wait_event", self.name, event.id))

        def synchronize(self):
            pass

    compute, side = FakeStream("compute"), FakeStream("side")
    current = [compute]

    @contextlib.contextmanager
    def on_stream(stream):
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on_stream)

    model = make_model()
    add_emulated_adapter(model, blocks=[NUM_LAYERS - 1])  # backward stops early: block 2's prefetch goes unused
    model.enable_gradient_checkpointing()
    ref_out, ref_grads = run_step(copy.deepcopy(model))
    swapper = enable_block_swap(model, NUM_LAYERS - 1, "cpu")
    swapper.stream = side  # what enable_block_swap creates on a CUDA device
    issue = swapper._issue_copy

    def logged_issue(blk):
        log.append(("issue_start", blk.index))
        issue(blk)
        log.append(("issued", blk.index, blk.event.id))

    swapper._issue_copy = logged_issue
    for i in swapper.swapped:
        model.blocks[i].attn1.to_q.register_forward_pre_hook(lambda m, a, i=i: log.append(("use", i)))

    class CopyStreams(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                log.append(("copy", current[-1].name))
            return func(*args, **(kwargs or {}))

    with CopyStreams():
        out, grads = run_step(model)
    assert (out - ref_out).abs().max().item() <= TOL and max_diff(grads, ref_grads) <= TOL

    issued = [(k, e) for k, e in enumerate(log) if e[0] == "issued"]
    uses = [(k, e[1]) for k, e in enumerate(log) if e[0] == "use"]
    assert len(uses) == NUM_LAYERS - 1 + 1  # forward of blocks 1..3, recompute of block 3 (the one that trains)
    for k, (_, i, event) in issued:
        start = max(j for j in range(k) if log[j] == ("issue_start", i))
        between = log[start:k]
        assert ("wait_stream", "side", "compute") in between  # ordered after the compute that freed the memory
        copies = [e for e in between if e[0] == "copy"]
        assert copies and all(e == ("copy", "side") for e in copies)  # the copies run on the side stream
        assert between[-1] == ("record", "side", event)
    for u, i in uses:
        _, (_, _, event) = max((k, e) for k, e in issued if e[1] == i and k < u)
        assert ("wait_event", "compute", event) in log[:u]  # compute waits for the copy before the block runs
    unused = [(k, e) for k, e in issued if not any(i == e[1] and u > k for u, i in uses)]
    assert unused and all(("wait_event", "compute", e[2]) in log[k:] for k, e in unused)  # waited before freeing
    assert swapper.loaded_blocks() == []


def test_home_guard_catches_compute_on_home_copy(emulated):
    # Negative control: running a swapped block's layer outside the hooks uses the home copy and must be caught.
    model = copy.deepcopy(emulated[0])
    swapper = enable_block_swap(model, 1, "cpu")
    with HomeGuard(swapper) as guard, torch.no_grad():
        model.blocks[NUM_LAYERS - 1].attn1.to_q(torch.randn(2, 32))
    assert guard.violations


def test_backward_that_stops_early_releases_prefetch():
    # Only the last block trains: backward never reaches block 2, whose prefetch must still be dropped at the end.
    model = make_model()
    add_emulated_adapter(model, blocks=[NUM_LAYERS - 1])
    model.enable_gradient_checkpointing()
    ref_out, ref_grads = run_step(copy.deepcopy(model))
    swapper = enable_block_swap(model, NUM_LAYERS - 1, "cpu")
    swapper.trace = []
    out, grads = run_step(model)
    assert max_diff(grads, ref_grads) <= TOL
    assert ("prefetch", NUM_LAYERS - 2, "backward") in swapper.trace
    assert ("hit", NUM_LAYERS - 2, "backward") not in swapper.trace
    assert swapper.loaded_blocks() == [] and all(swapper.is_home(i) for i in swapper.swapped)


def test_training_without_checkpointing_is_refused_inference_swaps(emulated):
    base, _, _ = emulated
    model = copy.deepcopy(base)
    model.disable_gradient_checkpointing()
    with torch.no_grad():
        ref = model(*make_inputs(), return_dict=False)[0]
    swapper = enable_block_swap(model, 2, "cpu")
    with pytest.raises(ValueError, match="enable_gradient_checkpointing"):
        model(*make_inputs(), return_dict=False)
    with torch.no_grad():
        out = model(*make_inputs(), return_dict=False)[0]
    assert (out - ref).abs().max().item() <= TOL
    assert swapper.loaded_blocks() == [] and all(swapper.is_home(i) for i in swapper.swapped)


def test_disable_restores_one_device_and_parameter_identity(emulated):
    model = copy.deepcopy(emulated[0])
    params = dict(model.named_parameters())
    with torch.no_grad():
        ref = model(*make_inputs(), return_dict=False)[0]
    swapper = enable_block_swap(model, 3, "cpu")
    home_ptr = storage_ptr(swapper.home_tensors(3)["blocks.3.attn1.to_q.weight"])
    disable_block_swap(model)
    assert get_block_swap(model) is None
    assert all(len(b._forward_pre_hooks) == len(b._forward_hooks) == 0 for b in model.blocks)  # hooks removed
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(model.get_parameter(n) is p for n, p in params.items())
    assert storage_ptr(model.blocks[3].attn1.to_q.weight) != home_ptr  # a fresh copy, not the old home
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    with torch.no_grad():
        assert (model(*make_inputs(), return_dict=False)[0] - ref).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="not enabled"):
        disable_block_swap(model)


@pytest.mark.parametrize("bad", [-1, NUM_LAYERS, NUM_LAYERS + 5, 1.5, True, "2"])
def test_bad_blocks_to_swap(bad):
    model = make_model()
    with pytest.raises(ValueError, match=rf"blocks_to_swap.*{NUM_LAYERS - 1}") as err:
        enable_block_swap(model, bad, "cpu")
    assert repr(bad) in str(err.value) or str(bad) in str(err.value)
    assert get_block_swap(model) is None


def test_double_enable_is_refused():
    model = make_model()
    enable_block_swap(model, 1, "cpu")
    with pytest.raises(ValueError, match="already enabled"):
        enable_block_swap(model, 2, "cpu")


# ----------------------------------------------------------------------------------------------------------------------
# activation offload and 8-bit optimizers under block swap
# ----------------------------------------------------------------------------------------------------------------------


def forward_keeping_block_inputs(model, offload: bool):
    """Forward + loss (under `offload_saved_activations` when `offload`); weak refs to each block's forward input."""
    refs, handles = [], []
    for block in model.blocks:
        def grab(module, args, kwargs):
            if not _in_backward():  # the forward call, not the checkpoint recompute
                refs.append(weakref.ref(args[0]))
        handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
    ctx = offload_saved_activations() if offload else contextlib.nullcontext()
    with ctx:
        out = model(*make_inputs(), return_dict=False)[0]
        loss = out.float().square().mean()
    for h in handles:
        h.remove()
    return out.detach(), loss, refs, ctx


@pytest.mark.parametrize("n_swap", [0, NUM_LAYERS - 1])
def test_activation_offload_frees_every_block_input_and_keeps_gradients(n_swap):
    ref_out, ref_grads = run_step(slice_model())

    # Control: without offload, autograd holds every block's input (checkpoint saves them) until backward.
    model = slice_model()
    enable_block_swap(model, n_swap, "cpu")
    _, loss, refs, _ = forward_keeping_block_inputs(model, offload=False)
    assert len(refs) == NUM_LAYERS and all(r() is not None for r in refs)
    del loss

    model = slice_model()
    swapper = enable_block_swap(model, n_swap, "cpu")
    out, loss, refs, hooks = forward_keeping_block_inputs(model, offload=True)
    # Offloaded: autograd keeps CPU copies only, so the block inputs themselves are already freed before backward.
    assert len(refs) == NUM_LAYERS and all(r() is None for r in refs)
    hidden = math.prod(ref_out.shape) // CONFIG["out_channels"] * CONFIG["num_attention_heads"] * \
        CONFIG["attention_head_dim"] // math.prod(CONFIG["patch_size"]) * 4  # float32 tokens x dim per block input
    assert hooks.packed_bytes >= NUM_LAYERS * hidden
    # The text states and timestep projection every block takes are copied once, not once per block; the weights
    # saved outside the blocks (proj_out's, for the input gradient) stay where they are.
    assert hooks.num_reused >= 2 * (NUM_LAYERS - 1) and hooks.num_kept >= 1
    loss.backward()
    grads = {n: p.grad for n, p in trainable(model).items()}
    assert (out - ref_out).abs().max().item() <= TOL and max_diff(grads, ref_grads) <= TOL
    assert swapper.loaded_blocks() == []


def test_activation_offload_reuses_only_the_same_live_unchanged_tensor():
    a = torch.randn(4, 3, requires_grad=True)
    shared, v = torch.randn(4, 3), torch.randn(4, 3)
    weight = nn.Parameter(torch.randn(3, 3), requires_grad=False)
    v0 = v.clone()
    with offload_saved_activations() as hooks:
        y = (a * shared).sum() + (shared * a).sum()  # `shared` saved twice: copied once
        y = y + (a * v).sum()
        v.mul_(2)  # a new version: the next save must copy again, not reuse the old values
        y = y + (a * v).sum()
        y = y + (a @ weight).sum()  # saves the frozen parameter: left where it is
        y = y + (a @ weight.t()).sum()  # and a view of it
    assert (hooks.num_packed, hooks.num_reused, hooks.num_kept) == (3, 1, 2)
    assert hooks.packed_bytes == 3 * 4 * 3 * 4
    y.backward()
    assert torch.allclose(a.grad, 2 * shared + v0 + 2 * v0 + weight.sum(dim=1) + weight.sum(dim=0))


def test_adamw8bit_steps_under_block_swap_match_no_swap_and_the_state_never_moves():
    # The musubi-tuner pull request failed here: bitsandbytes' update_step assigns p.grad = p.grad.contiguous() and
    # its parameters had been swapped to the CPU. Slice values never move, so 8-bit AdamW sees one device throughout.
    import bitsandbytes  # noqa: F401  (a test dependency: this path must not go untested)
    from slice_ft.training import build_optimizer

    def train(n_swap, steps=3):
        model = slice_model()
        swapper = enable_block_swap(model, n_swap, "cpu") if n_swap else None
        homes = {k: v.clone() for i in (swapper.swapped if swapper else ()) for k, v in swapper.home_tensors(i).items()}
        params = list(trainable(model).values())
        ptrs = [p.data_ptr() for p in params]
        opt = build_optimizer(params, "adamw8bit", learning_rate=1e-2, optimizer_args={"min_8bit_size": 0})
        for _ in range(steps):
            with offload_saved_activations():
                loss = model(*make_inputs(), return_dict=False)[0].float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert type(opt).__name__ == "AdamW8bit"
        for p, ptr in zip(params, ptrs):
            state = opt.state[p]
            assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8  # 8-bit moments
            assert all(t.device == p.device for t in state.values() if isinstance(t, torch.Tensor))
            assert p.data_ptr() == ptr  # updated in place, never re-homed
        if swapper:
            assert swapper.loaded_blocks() == []
            assert all(torch.equal(v, swapper.home_tensors(int(k.split(".")[1]))[k]) for k, v in homes.items())
        return {n: p.detach().clone() for n, p in trainable(model).items()}

    before = {n: p.detach().clone() for n, p in trainable(slice_model()).items()}
    plain, swapped = train(0), train(NUM_LAYERS - 1)
    assert plain.keys() == swapped.keys() == before.keys()
    assert max((plain[n] - before[n]).abs().max().item() for n in plain) > 1e-3  # it trained
    assert max_diff(plain, swapped) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# fp8 base
# ----------------------------------------------------------------------------------------------------------------------


def test_fp8_round_trip_error_and_names():
    ref_model = make_model()
    model = copy.deepcopy(ref_model)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    keys, pnames = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    done = quantize_base_to_fp8(model)
    assert len(done) == NUM_LAYERS * 10 and all(n.startswith("blocks.") for n in done)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == pnames
    assert type(model.proj_out) is nn.Linear and model.proj_out.weight.dtype == torch.float32  # outside blocks
    for name in done:
        layer = model.get_submodule(name)
        assert isinstance(layer, Fp8Linear) and layer.weight.dtype == FP8_DTYPE and layer.weight.element_size() == 1
        assert layer.bias.dtype == torch.float32 and not layer.weight.requires_grad
        w = originals[name]
        scale = layer.weight_scale.item()
        assert scale == pytest.approx(w.abs().max().item() / 448.0, rel=1e-6)
        deq = dequantize_weight(layer)
        assert deq.dtype == torch.float32
        normal = w.abs() >= scale * 2.0**-6  # e4m3 normal range: 3 mantissa bits -> relative error <= 2^-4
        rel = ((deq - w).abs() / w.abs())[normal]
        assert rel.max().item() <= 2.0**-4 * (1 + 1e-6) <= 2.0**-3
        sub_err = (deq - w)[~normal].abs()
        assert sub_err.numel() == 0 or sub_err.max().item() <= scale * 2.0**-10 * (1 + 1e-6)  # half a subnormal step
        assert (deq - w).abs().max().item() > 0  # it really was rounded
    for block in model.blocks:
        assert block.scale_shift_table.dtype == torch.float32 and block.norm2.weight.dtype == torch.float32
    inputs = make_inputs()
    with torch.no_grad():
        ref = ref_model(*inputs, return_dict=False)[0]
        out = model(*inputs, return_dict=False)[0]
        rel_out = ((out - ref).norm() / ref.norm()).item()
        assert 0 < rel_out < 0.05

        # Loading the full-precision state dict back re-quantizes instead of casting raw values to fp8.
        fresh = copy.deepcopy(model)
        for layer in fresh.modules():
            if isinstance(layer, Fp8Linear):
                layer.weight.zero_()
                layer.weight_scale.fill_(3.0)
        fresh.load_state_dict(ref_model.state_dict())
        assert (fresh(*inputs, return_dict=False)[0] - out).abs().max().item() == 0


def test_fp8_elementwise_error_bounds():
    # Magnitudes spread over 2^-24..2^0 of amax (normal threshold ~2^-14.8): normals, subnormals and flush to zero.
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 96)
    with torch.no_grad():
        exps = torch.rand(96, 64, generator=g) * -24
        signs = torch.where(torch.rand(96, 64, generator=g) < 0.5, -1.0, 1.0)
        lin.weight.copy_(signs * 2.0**exps * 0.37)
    w = lin.weight.detach().clone()
    Fp8Linear.convert_(lin)
    scale = lin.weight_scale.item()
    err = (dequantize_weight(lin) - w).abs()
    normal = w.abs() >= scale * 2.0**-6
    assert normal.sum() > 1000 and (~normal).sum() > 1000
    assert (err / w.abs())[normal].max().item() <= 2.0**-4 * (1 + 1e-6)  # 3 mantissa bits, round to nearest
    assert err[~normal].max().item() <= scale * 2.0**-10 * (1 + 1e-6)  # half of the 2^-9 subnormal step
    assert (err / w.abs())[w.abs() >= scale * 2.0**-3].max().item() <= 2.0**-3  # the issue's bound, with headroom
    x = torch.randn(5, 64, generator=g)
    assert torch.allclose(lin(x), x @ dequantize_weight(lin).T + lin.bias, atol=1e-6)
    with pytest.raises(ValueError, match="plain nn.Linear"):
        Fp8Linear.convert_(lin)


def test_fp8_bf16_model_and_exclude():
    ref_model = make_model(dtype=torch.bfloat16)
    model = copy.deepcopy(ref_model)
    done = quantize_base_to_fp8(model, exclude=[r"\.ffn\."])
    assert len(done) == NUM_LAYERS * 8 and not any(".ffn." in n for n in done)
    assert type(model.blocks[0].ffn.net[2]) is nn.Linear
    assert dequantize_weight(model.blocks[0].attn1.to_q).dtype == torch.bfloat16
    inputs = make_inputs(torch.bfloat16)
    with torch.no_grad():
        ref = ref_model(*inputs, return_dict=False)[0].float()
        out = model(*inputs, return_dict=False)[0].float()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    with pytest.raises(ValueError, match="exclude pattern"):
        quantize_base_to_fp8(copy.deepcopy(ref_model), exclude=["("])


def test_fp8_under_slice_adapter_with_block_swap():
    model = slice_model(fp8=True)  # fp8 after add_adapter: converts the base_layer inside each slice tuner layer
    assert isinstance(model.blocks[0].attn1.to_q.base_layer, Fp8Linear)
    assert dequantize_weight(model.blocks[0].attn1.to_q).dtype == torch.float32  # via the tuner's base layer
    ref_out, ref_grads = run_step(slice_model(fp8=True))
    assert len(ref_grads) > 0 and all(g.abs().sum() > 0 for g in ref_grads.values())
    swapper = enable_block_swap(model, NUM_LAYERS - 1, "cpu")
    homes = swapper.home_tensors(NUM_LAYERS - 1)
    assert homes[f"blocks.{NUM_LAYERS - 1}.attn1.to_q.base_layer.weight"].dtype == FP8_DTYPE
    assert f"blocks.{NUM_LAYERS - 1}.attn1.to_q.base_layer.weight_scale" in homes  # the scale travels too
    with HomeGuard(swapper) as guard:
        out, grads = run_step(model)
    assert guard.violations == []
    assert (out - ref_out).abs().max().item() <= TOL and max_diff(grads, ref_grads) <= TOL
    with pytest.raises(ValueError, match="before enable_block_swap"):
        quantize_base_to_fp8(model)


# ----------------------------------------------------------------------------------------------------------------------
# benchmark smoke mode (what CI runs of benchmarks/gpu_lowvram.py)
# ----------------------------------------------------------------------------------------------------------------------


def test_benchmark_smoke_writes_table(tmp_path):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_lowvram.py"
    spec = importlib.util.spec_from_file_location("gpu_lowvram", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    assert bench.main(["--smoke", "--output", str(out), "--steps", "1", "--warmup", "0"]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(bench.ROWS)
    for i, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row.strip("|").split("|")]
        s_per_step, command = cells[-3], cells[-1]
        assert math.isfinite(float(s_per_step)) and float(s_per_step) > 0, row
        assert command == f"`python benchmarks/gpu_lowvram.py --rows {i} --smoke --steps 1 --warmup 0`"
    assert "--smoke" in text and "torch" in text
    offloaded = [r for r in rows if "activation offload" in r.split("|")[1]]
    assert len(offloaded) == 1 and "| yes |" in offloaded[0]

    # --isolate: the row is measured in a child process (as GPU runs do by default) and reported the same way
    assert bench.main(["--smoke", "--isolate", "--rows", "3", "--output", str(out), "--steps", "1", "--warmup", "0"]) == 0
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| slice")]
    assert "activation offload" in row and math.isfinite(float(row.strip("|").split("|")[-3]))
    # a child that gives no result in time is reported as a timeout, and the exit status says the table is incomplete
    assert bench.main(["--smoke", "--isolate", "--rows", "1", "--output", str(out), "--row_timeout", "0.01"]) == 1
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| slice")]
    assert "| timeout | timeout | no result within --row_timeout 0.01 s |" in row

    # --plan_only runs nothing: every row says so and names the command that measures it
    assert bench.main(["--plan_only", "--output", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(bench.ROWS)
    assert all(r.count("not yet measured") == 2 and f"--rows {i}`" in r for i, r in enumerate(rows, start=1))
    assert "| 39 | yes |" in rows[2] and "| fp8 e4m3 |" in rows[4] and "(rank " in rows[5]
