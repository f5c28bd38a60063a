"""The CUDA side on a real GPU (issue 14): block swap with a real side stream, pinned copies and events; the fp8 base;
activation offload to pinned memory; bitsandbytes AdamW8bit under block swap; the slice layer under bf16 autocast;
the trainer with every low-VRAM flag and a validation sample; exact resume.

benchmarks/gpu_check.py runs this file on the device machine. Without CUDA every CUDA test skips with the reason
"needs a CUDA device" (the one skip allowed here); the checks whose logic is device-independent also run a CPU
variant (parametrized device), so their arithmetic and bounds are proven on every machine. tests/test_offload.py and
tests/test_train.py prove the same mechanisms on CPU in depth.

Equality claims on CUDA ("identical", "exact") run under `torch.use_deterministic_algorithms` with the math SDPA
kernel: index_add_ (the slice layer) and the fused attention kernels otherwise sum in a run-dependent order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from pathlib import Path

# cuBLAS is deterministic only with a fixed workspace, read when its first handle is made: before any CUDA work.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import TINY_WAN  # noqa: E402
from slice_ft.offload import (  # noqa: E402
    FP8_DTYPE,
    Fp8Linear,
    dequantize_weight,
    enable_block_swap,
    offload_saved_activations,
    quantize_base_to_fp8,
)
from slice_ft.offload import _in_backward  # noqa: E402  (the swapper's own test for "inside backward")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

NUM_LAYERS = 4
# Wider than the CPU tests' model (width 256, ffn 1024: ~2 MiB of bf16 weights per block), so that a swapped block's
# weights are a measurable share of torch.cuda.memory_allocated.
CONFIG = dict(TINY_WAN, num_layers=NUM_LAYERS, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024)


def make_model(dtype=torch.float32, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**CONFIG).to(dtype).eval()
    model.requires_grad_(False)
    return model


def slice_model(dtype=torch.float32, fp8: bool = False):
    """A tiny Wan with a random slice (fraction 0.1), fp8 base optionally, gradient checkpointing; on the CPU."""
    from slice_adapter import SliceConfig

    model = make_model(dtype)
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=0, init_weights=False))
    if fp8:
        quantize_base_to_fp8(model)
    model.enable_gradient_checkpointing()
    return model


def make_inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 3, 8, 8, generator=g).to(device, dtype), torch.tensor([500], device=device),
            torch.randn(1, 8, 32, generator=g).to(device, dtype))


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run_step(model, device, autocast: bool, offload: bool = False):
    """Forward (bf16 autocast on request), loss, backward: (output, gradients of the trainable tensors)."""
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp, (offload_saved_activations() if offload else contextlib.nullcontext()):
        out = model(*make_inputs(device), return_dict=False)[0]
        loss = out.float().square().mean()
    loss.backward()
    return out.detach().float(), {n: p.grad.detach().clone() for n, p in trainable(model).items()}


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def deterministic():
    """Deterministic kernels and the math attention kernel for the duration of a test (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ----------------------------------------------------------------------------------------------------------------------
# block swap with a real side stream
# ----------------------------------------------------------------------------------------------------------------------


@needs_cuda
def test_block_swap_with_real_streams_matches_no_swap_and_keeps_swapped_weights_off_the_gpu():
    ref_model = slice_model(torch.bfloat16).to("cuda")
    ref_out, ref_grads = run_step(ref_model, "cuda", autocast=True)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())
    del ref_model
    torch.cuda.synchronize()

    model = slice_model(torch.bfloat16)
    n_swap = NUM_LAYERS - 1
    block_bytes = sum(p.numel() * p.element_size() for n, p in model.blocks[NUM_LAYERS - 1].named_parameters()
                      if not p.requires_grad)
    total_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    before = torch.cuda.memory_allocated()
    swapper = enable_block_swap(model, n_swap, "cuda")
    assert swapper.stream is not None  # a real side stream, not the CPU emulation
    resident = torch.cuda.memory_allocated() - before
    # The swapped blocks' frozen tensors stay in pinned host memory: the GPU holds the rest only.
    assert resident <= total_bytes - n_swap * block_bytes + (1 << 20)
    for i in swapper.swapped:
        homes = swapper.home_tensors(i)
        assert homes and all(t.device.type == "cpu" and t.is_pinned() for t in homes.values())

    # Between uses a swapped block's weights are not on the GPU: when block i starts (forward or the checkpoint
    # recompute in backward), only i and its neighbour (prefetch, or the block kept across the forward/backward
    # turn) may hold device copies.
    seen = []

    def check(i):
        def hook(module, args, kwargs):
            loaded = set(swapper.loaded_blocks())
            far = [j for j in swapper.swapped if abs(j - i) > 1]
            on_gpu = [j for j in far if not swapper.is_home(j)
                      or model.blocks[j].attn1.to_q.get_base_layer().weight.device.type != "cpu"]
            seen.append((i, _in_backward(), loaded, on_gpu))
        return hook

    handles = [b.register_forward_pre_hook(check(i), with_kwargs=True) for i, b in enumerate(model.blocks)]
    out, grads = run_step(model, "cuda", autocast=True)
    for h in handles:
        h.remove()
    torch.cuda.synchronize()
    assert {(i, back) for i, back, _, _ in seen} >= {(i, False) for i in range(NUM_LAYERS)}
    assert any(back for _, back, _, _ in seen)  # the recompute ran through the hooks too
    for i, _, loaded, on_gpu in seen:
        assert loaded <= {i - 1, i, i + 1} and on_gpu == [], (i, loaded, on_gpu)
    assert swapper.num_prefetch_hits > 0  # copies were issued ahead on the side stream and used

    # Same outputs and gradients as without swap (bf16 tolerance), and nothing stays loaded afterwards.
    assert rel(out, ref_out) <= 1e-2
    assert grads.keys() == ref_grads.keys()
    assert all(rel(grads[k], ref_grads[k]) <= 1e-2 for k in grads), {k: rel(grads[k], ref_grads[k]) for k in grads}
    assert swapper.loaded_blocks() == [] and all(swapper.is_home(i) for i in swapper.swapped)
    # ... and no device copy of a swapped block outlives the step: what the GPU holds now is the resident part,
    # the gradients (twice: .grad and the copies above), the output and the slice's index tensors (under 1 MiB).
    grad_bytes = sum(g.numel() * g.element_size() for g in grads.values())
    assert torch.cuda.memory_allocated() - before <= resident + 2 * grad_bytes + (4 << 20) < resident + n_swap * block_bytes + 2 * grad_bytes


# ----------------------------------------------------------------------------------------------------------------------
# fp8 base
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_base_forward_within_e4m3_bounds(device):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(256, 384)
    with torch.no_grad():  # magnitudes over 2^-20..2^0 of the max: normals and e4m3 subnormals both occur
        lin.weight.copy_(torch.randn(384, 256, generator=g).sign() * 2.0 ** (torch.rand(384, 256, generator=g) * -20))
    lin = lin.to(device)
    w = lin.weight.detach().clone()
    Fp8Linear.convert_(lin)
    assert lin.weight.dtype == FP8_DTYPE and lin.weight.device.type == device
    scale = lin.weight_scale.item()
    deq = dequantize_weight(lin)
    err = (deq - w).abs()
    normal = w.abs() >= scale * 2.0**-6
    assert normal.any() and (~normal).any()
    assert (err / w.abs())[normal].max().item() <= 2.0**-4 * (1 + 1e-6)  # 3 mantissa bits, round to nearest
    assert err[~normal].max().item() <= scale * 2.0**-10 * (1 + 1e-6)  # half the 2^-9 subnormal step

    # The forward: every output is within the weights' rounding bound of the full-precision Linear's.
    x = torch.randn(64, 256, generator=g).to(device)
    with torch.no_grad():
        y = lin(x)
        exact = (x.double() @ w.double().T + lin.bias.double())
        bound = (x.double().abs() @ (w.double().abs() * 2.0**-4 + scale * 2.0**-10).T)
    assert ((y.double() - exact).abs() <= bound * (1 + 1e-3) + 1e-4).all()
    assert (y.double() - exact).abs().max().item() > 0  # it really was rounded

    # A bf16 model with an fp8 base stays close to the bf16 model on this device.
    ref_model = make_model(torch.bfloat16).to(device)
    model = make_model(torch.bfloat16).to(device)
    assert len(quantize_base_to_fp8(model)) == NUM_LAYERS * 10
    with torch.no_grad():
        ref = ref_model(*make_inputs(device, torch.bfloat16), return_dict=False)[0]
        out = model(*make_inputs(device, torch.bfloat16), return_dict=False)[0]
    assert 0 < rel(out, ref) < 0.05


# ----------------------------------------------------------------------------------------------------------------------
# activation offload
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_activation_offload_keeps_gradients_identical_and_frees_block_inputs(device, deterministic):
    ref_model = slice_model().to(device)
    ref_out, ref_grads = run_step(ref_model, device, autocast=False)

    model = slice_model().to(device)
    refs = []

    def grab(module, args, kwargs):
        if not _in_backward():
            refs.append(weakref.ref(args[0]))

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in model.blocks]
    with offload_saved_activations() as hooks:
        out = model(*make_inputs(device), return_dict=False)[0]
        loss = out.float().square().mean()
    for h in handles:
        h.remove()
    assert hooks.pin_memory == CUDA  # pinned host copies on a GPU machine
    assert len(refs) == NUM_LAYERS and all(r() is None for r in refs)  # the block inputs are gone before backward
    assert hooks.packed_bytes >= NUM_LAYERS * 48 * 256 * 4  # each block's input (48 tokens x 256 x fp32) copied
    loss.backward()
    grads = {n: p.grad for n, p in trainable(model).items()}
    assert torch.equal(out.detach().float(), ref_out)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)


# ----------------------------------------------------------------------------------------------------------------------
# bitsandbytes AdamW8bit under block swap
# ----------------------------------------------------------------------------------------------------------------------


@needs_cuda
def test_adamw8bit_steps_under_block_swap_on_cuda(deterministic):
    # The musubi-tuner pull request failed here on CUDA: its trainable tensors were swapped to the CPU.
    from slice_ft.training import build_optimizer

    def train(n_swap, steps=3):
        model = slice_model(torch.bfloat16)
        if n_swap:
            swapper = enable_block_swap(model, n_swap, "cuda")
        else:
            swapper = None
            model.to("cuda")
        params = list(trainable(model).values())
        assert all(p.device.type == "cuda" for p in params)
        ptrs = [p.data_ptr() for p in params]
        opt = build_optimizer(params, "adamw8bit", learning_rate=1e-2, optimizer_args={"min_8bit_size": 0})
        assert type(opt).__name__ == "AdamW8bit"
        for _ in range(steps):
            run_step(model, "cuda", autocast=True, offload=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        for p, ptr in zip(params, ptrs):
            state = opt.state[p]
            assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8  # 8-bit moments
            assert all(t.device == p.device for t in state.values() if isinstance(t, torch.Tensor))
            assert p.data_ptr() == ptr  # updated in place on the GPU, never re-homed
        if swapper:
            assert swapper.loaded_blocks() == [] and all(swapper.is_home(i) for i in swapper.swapped)
        return {n: p.detach().float().cpu() for n, p in trainable(model).items()}

    before = {n: p.detach().float() for n, p in trainable(slice_model(torch.bfloat16)).items()}
    plain, swapped = train(0), train(NUM_LAYERS - 1)
    assert plain.keys() == swapped.keys() == before.keys()
    assert max((plain[n] - before[n]).abs().max().item() for n in plain) > 1e-3  # it trained
    assert max((plain[n] - swapped[n]).abs().max().item() for n in plain) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# the slice Linear under bf16 autocast
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_slice_linear_under_bf16_autocast_equals_the_merged_dense_weight(device):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = slice_model().to(device)
    layer = model.get_submodule("blocks.0.ffn.net.0.proj")
    assert isinstance(layer, BaseTunerLayer)  # the public slice layer: tested through its forward only
    adapter = layer.active_adapters[0]
    base = layer.get_base_layer()
    delta = layer.get_delta_weight(adapter)
    merged_w = base.weight.float() + delta["weight"]
    merged_b = base.bias.float() + delta.get("bias", torch.zeros_like(base.bias.float()))
    assert (delta["weight"] != 0).float().mean().item() > 0.05  # a real slice, not a zero delta

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 48, base.in_features, generator=g).to(device).requires_grad_(True)
    grad_y = torch.randn(2, 48, base.out_features, generator=g).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
        y_merged = F.linear(x, merged_w, merged_b)  # the dense merged weight, same autocast
        y_base = base(x)
    assert y.dtype == y_merged.dtype == torch.bfloat16
    exact = x.detach().double() @ merged_w.double().T + merged_b.double()
    # bf16 operands: a relative error between 1e-3 and 1e-2 for both; the slice's contribution is far above that
    assert rel(y.detach(), exact) <= 1e-2 and rel(y_merged.detach(), exact) <= 1e-2
    assert rel(y.detach(), y_merged.detach()) <= 1e-2
    assert rel(y_base.detach(), exact) > 0.1

    (gx,) = torch.autograd.grad(y, x, grad_y)
    exact_gx = grad_y.double() @ merged_w.double()
    assert gx.shape == x.shape and rel(gx, exact_gx) <= 1e-2


# ----------------------------------------------------------------------------------------------------------------------
# the trainer on CUDA: every low-VRAM flag, a validation sample, exact resume
# ----------------------------------------------------------------------------------------------------------------------

LOW_VRAM = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--blocks_to_swap", "1", "--base_dtype", "fp8",
            "--gradient_checkpointing_cpu_offload", "--optimizer", "adamw8bit", "--optimizer_args", "min_8bit_size=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from slice_ft.corpus import generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, num_images=4, num_videos=2, size=[(48, 32), (32, 48)], num_frames=5, seed=3)
    return root


def train(output_dir, dataset, *flags):
    """The recipe in this process on the tiny model (explicit `--pretrained_model_name_or_path tiny`)."""
    import train_slice_ft
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    base = ["--pretrained_model_name_or_path", "tiny", "--output_dir", str(output_dir), "--report_to", "none",
            "--dataset_name", str(dataset), "--bucket_resolutions", "48x32,32x48", "--bucket_frame_counts", "1,5",
            "--ff", "0.25", "--ffid", "1", "--learning_rate", "1e-2", "--checkpointing_steps", "1000"]
    return train_slice_ft.main(train_slice_ft.parse_args(base + [str(f) for f in flags]))


def slice_values(output_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "slice" / "adapter_model.safetensors"))


@needs_cuda
def test_trainer_three_steps_with_every_low_vram_flag_and_a_validation_sample(tmp_path, corpus, caplog):
    import av

    torch.cuda.reset_peak_memory_stats()
    with caplog.at_level(logging.INFO):
        result = train(tmp_path / "out", corpus, "--max_train_steps", "3", *LOW_VRAM,
                       "--validation_prompts", "a red circle", "--validation_steps", "3",
                       "--validation_num_frames", "5", "--validation_height", "32", "--validation_width", "48",
                       "--validation_num_inference_steps", "2")
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "Device: cuda" in messages  # accelerate placed the run on the GPU
    assert torch.cuda.max_memory_allocated() > 0
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert "fp8 base: 20 block Linear weights" in messages
    assert "activation offload: " in messages and " 0.0 MiB" not in messages
    values = slice_values(tmp_path / "out")
    assert values and all(v.dtype == torch.float32 for v in values.values())
    assert any(v.abs().sum() > 0 for v in values.values())  # it trained
    assert result["samples"]
    with av.open(str(result["samples"][-1])) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape[:2] == (32, 48)


class _Stop(Exception):
    pass


@needs_cuda
def test_resume_on_cuda_ends_exactly_where_an_uninterrupted_run_does(tmp_path, corpus, monkeypatch, deterministic):
    import train_slice_ft

    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--train_batch_size", "2",
             "--lr_scheduler", "linear", "--lr_warmup_steps", "1", *LOW_VRAM]
    train(tmp_path / "straight", corpus, *flags)

    real_save = train_slice_ft.save_checkpoint

    def save_then_crash(*a, **kw):
        raise _Stop(real_save(*a, **kw))

    monkeypatch.setattr(train_slice_ft, "save_checkpoint", save_then_crash)
    with pytest.raises(_Stop):
        train(tmp_path / "resumed", corpus, *flags)
    monkeypatch.setattr(train_slice_ft, "save_checkpoint", real_save)
    result = train(tmp_path / "resumed", corpus, *flags, "--resume_from_checkpoint", "latest")
    assert len(result["losses"]) == 2  # steps 3 and 4 only
    straight, resumed = slice_values(tmp_path / "straight"), slice_values(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    diff = {k: (straight[k] - resumed[k]).abs().max().item() for k in straight}
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), diff
    assert any(v.abs().sum() > 0 for v in straight.values())
