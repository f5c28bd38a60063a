"""The streaming merge's fast paths (kernel copy of untouched runs, in-place patches of sparsely touched tensors, one
reused read buffer) give bit for bit what a plain dense reference gives, at several fractions and dtypes."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import slice_adapter.checkpoint as checkpoint_module
import slice_adapter.merge as merge_module
from slice_adapter.merge import merge_slices

from slice_adapter.deltas import slice_deltas
from slice_checkpoints import (load, raw_bytes, reference_merge, save_base, synthetic_shapes,
                               synthetic_slice)

REPO = Path(__file__).resolve().parents[1]

CONFIG = dict(num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=512, text_dim=64, freq_dim=32,
              in_channels=4, out_channels=4)


@pytest.fixture(scope="module")
def shapes():
    return synthetic_shapes(CONFIG)


def make_base(path, shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (k, s) in enumerate(shapes.items()):
        # mixed dtypes: every fifth tensor stays float32 (alignment of the reused buffer and the patches)
        dt = torch.float32 if i % 5 == 4 else dtype
        state[k] = (torch.randn(s, generator=g) * 0.05).to(dt)
    return state, save_base(state, path)


PATHS = {
    "patch": dict(PATCH_MIN_BYTES=0, PATCH_RANGE_COST=0),  # patch every touched tensor it can
    "dense": dict(PATCH_MIN_BYTES=1 << 62),  # read every touched tensor whole
    "auto": {},
}


def force(monkeypatch, path):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(merge_module, name, value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fraction", [0.001, 0.02, 0.3])
@pytest.mark.parametrize("path", list(PATHS))
def test_bit_exact_against_reference(tmp_path, monkeypatch, shapes, dtype, fraction, path):
    state, base = make_base(tmp_path / "base.safetensors", shapes, dtype)
    s0 = synthetic_slice(tmp_path / "s0", shapes, fraction, 0, value_seed=1)
    s1 = synthetic_slice(tmp_path / "s1", shapes, fraction, 1, value_seed=2)
    force(monkeypatch, path)
    out = tmp_path / "out.safetensors"
    result = merge_slices(base, [s0, s1], out, progress=False)
    merged, want = load(out), reference_merge(state, [s0, s1])
    assert list(merged) == list(load(base))
    touched = 0
    for k, v in want.items():
        assert merged[k].dtype == v.dtype
        assert torch.equal(merged[k].view(torch.uint8) if v.numel() else merged[k],
                           v.view(torch.uint8) if v.numel() else v), k
        if not torch.equal(state[k], v):
            touched += 1
        else:
            assert raw_bytes(out, k) == raw_bytes(base, k)
    assert result.touched_tensors >= touched > 0


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("out_dtype", ["bf16", "fp16", "fp32"])
def test_cast_and_overlap_bit_exact(tmp_path, monkeypatch, shapes, path, out_dtype):
    state, base = make_base(tmp_path / "base.safetensors", shapes, torch.bfloat16)
    a = synthetic_slice(tmp_path / "a", shapes, 0.02, 1, value_seed=1)
    b = synthetic_slice(tmp_path / "b", shapes, 0.05, 0, value_seed=2)  # shares weights with a
    force(monkeypatch, path)
    out = tmp_path / "out.safetensors"
    merge_slices(base, [a, b], out, allow_overlap=True, progress=False)
    merged, want = load(out), reference_merge(state, [a, b])
    for k, v in want.items():
        assert torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), k
    cast = tmp_path / "cast.safetensors"
    merge_slices(base, [a, b], cast, allow_overlap=True, dtype=out_dtype, progress=False)
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[out_dtype]
    merged, want = load(cast), reference_merge(state, [a, b], dtype=target)
    for k, v in want.items():
        assert merged[k].dtype == target
        assert torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), k


def test_without_kernel_copy(tmp_path, monkeypatch, shapes):
    """Where copy_file_range is refused (another file system, an old kernel), the buffer copy gives the same file."""
    state, base = make_base(tmp_path / "base.safetensors", shapes, torch.bfloat16)
    s0 = synthetic_slice(tmp_path / "s0", shapes, 0.01, 0, value_seed=1)
    force(monkeypatch, "patch")
    first = tmp_path / "first.safetensors"
    merge_slices(base, [s0], first, progress=False)

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(checkpoint_module, "COPY_CHUNK", 4096)  # many buffer rounds
    second = tmp_path / "second.safetensors"
    merge_slices(base, [s0], second, progress=False)
    assert first.read_bytes() == second.read_bytes()
    want = reference_merge(state, [s0])
    merged = load(second)
    for k, v in want.items():
        assert torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), k


@pytest.mark.parametrize("path", ["patch", "dense"])
def test_patches_wait_in_the_queue_behind_a_slow_background_copy(tmp_path, monkeypatch, shapes, path):
    """The copy runs in small pieces and the queue holds little: patches wait for the copying thread, still bit
    exact."""
    state, base = make_base(tmp_path / "base.safetensors", shapes, torch.bfloat16)
    s0 = synthetic_slice(tmp_path / "s0", shapes, 0.02, 0, value_seed=1)
    s1 = synthetic_slice(tmp_path / "s1", shapes, 0.02, 1, value_seed=2)
    force(monkeypatch, path)
    monkeypatch.setattr(checkpoint_module, "BACKGROUND_COPY_CHUNK", 4096)
    monkeypatch.setattr(checkpoint_module, "PATCH_QUEUE_BYTES", 8192)
    real = checkpoint_module.StreamWriter._write_patches
    queued = {"n": 0}

    def counting(self, dst):
        queued["n"] += len(self._patches)
        return real(self, dst)

    monkeypatch.setattr(checkpoint_module.StreamWriter, "_write_patches", counting)
    out = tmp_path / "out.safetensors"
    merge_slices(base, [s0, s1], out, progress=False)
    merged, want = load(out), reference_merge(state, [s0, s1])
    for k, v in want.items():
        assert torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), k
    assert queued["n"] > 0  # some patches went through the copying thread's queue


def test_writeback_starts_only_on_final_bytes_and_the_output_stays_exact(tmp_path, monkeypatch, shapes):
    """The copying thread asks the kernel to start writing the finished part of the output (sync_file_range) as it
    goes: each range starts where the last ended, on page boundaries, covers only bytes already copied with no patch
    still to come below its end, and together they reach the end of the file; the output is bit exact."""
    state, base = make_base(tmp_path / "base.safetensors", shapes, torch.bfloat16)
    s0 = synthetic_slice(tmp_path / "s0", shapes, 0.02, 0, value_seed=1)
    force(monkeypatch, "patch")
    monkeypatch.setattr(checkpoint_module, "BACKGROUND_COPY_CHUNK", 8192)
    monkeypatch.setattr(checkpoint_module, "WRITEBACK_MIN_BYTES", 4096)
    calls, seen = [], []
    real_patch = checkpoint_module.StreamWriter.patch

    def recording_patch(self, name, spans, data):
        seen.append([(self._position[name] + offset, hi - lo) for offset, lo, hi in spans])
        return real_patch(self, name, spans, data)

    def sync_file_range(fd, start, length, flags):
        assert flags == checkpoint_module.SYNC_FILE_RANGE_WRITE
        calls.append((start, length, [w for writes in seen for w in writes]))
        return 0

    monkeypatch.setattr(checkpoint_module.StreamWriter, "patch", recording_patch)
    monkeypatch.setattr(checkpoint_module, "_SYNC_FILE_RANGE", sync_file_range)
    out = tmp_path / "out.safetensors"
    merge_slices(base, [s0], out, progress=False)
    merged, want = load(out), reference_merge(state, [s0])
    for k, v in want.items():
        assert torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), k
    assert len(calls) > 2
    header_end = 8 + int.from_bytes(out.read_bytes()[:8], "little")
    assert calls[0][0] == header_end
    for (start, length, _), (next_start, _, _) in zip(calls, calls[1:]):
        assert next_start == start + length and length > 0
    assert calls[-1][0] + calls[-1][1] == out.stat().st_size
    patches = [w for writes in seen for w in writes]
    for start, length, handed in calls[:-1]:
        assert (start + length) % 4096 == 0
        # a patch handed over after this call lies above the range it flushed
        later = patches[len(handed):]
        assert all(at >= start + length for at, _ in later)


def test_a_failure_in_the_background_copy_is_raised_and_leaves_outputs_intact(tmp_path, monkeypatch, shapes):
    state, base = make_base(tmp_path / "base.safetensors", shapes, torch.bfloat16)
    s0 = synthetic_slice(tmp_path / "s0", shapes, 0.01, 0, value_seed=1)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"earlier output")
    monkeypatch.setattr(checkpoint_module, "BACKGROUND_COPY_CHUNK", 4096)
    real, calls = os.copy_file_range, {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", failing)
    with pytest.raises(OSError, match="Input/output error"):
        merge_slices(base, [s0], out, overwrite=True, progress=False)
    assert calls["n"] == 20
    assert out.read_bytes() == b"earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "out.safetensors", "s0"]


def test_failure_while_patching_leaves_outputs_intact(tmp_path, monkeypatch, shapes):
    state, base = make_base(tmp_path / "base.safetensors", shapes, torch.bfloat16)
    s0 = synthetic_slice(tmp_path / "s0", shapes, 0.01, 0, value_seed=1)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"earlier output")
    force(monkeypatch, "patch")
    calls = {"n": 0}
    real = checkpoint_module.StreamWriter.patch

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk vanished")
        return real(self, *args)

    monkeypatch.setattr(checkpoint_module.StreamWriter, "patch", failing)
    with pytest.raises(OSError, match="disk vanished"):
        merge_slices(base, [s0], out, overwrite=True, progress=False)
    assert out.read_bytes() == b"earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "out.safetensors", "s0"]


def test_truncated_base_after_the_header_check(tmp_path, monkeypatch, shapes):
    """A BASE cut short while the merge runs is reported, whichever path reads it."""
    state, base = make_base(tmp_path / "base.safetensors", shapes, torch.bfloat16)
    s0 = synthetic_slice(tmp_path / "s0", shapes, 0.01, 0, value_seed=1)
    ckpt = merge_module.open_checkpoint(base)
    monkeypatch.setattr(merge_module, "open_checkpoint", lambda p: ckpt)
    size = base.stat().st_size
    with open(base, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match="truncated"):
        merge_slices(base, [s0], tmp_path / "out.safetensors", progress=False)
    assert not (tmp_path / "out.safetensors").exists()


def edge_values() -> torch.Tensor:
    """float32 values that exercise rounding: random bit patterns (every exponent, subnormals), exact ties between
    bf16 and fp16 neighbours, the largest finite values and just past them, signed zeros and infinities."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2 ** 31), 2 ** 31, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    rand = bits.view(torch.float32)
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -8)])
    limits = torch.tensor([3.3895314e38, 3.39e38, -3.39e38, 65504.0, 65519.0, 65520.0, 448.0, 464.0, 57344.0, 61440.0,
                           1e-40, -1e-45, 6e-8, 0.0, -0.0, float("inf"), float("-inf")])
    return torch.cat([rand[~rand.isnan()], ties, limits])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_the_merge_rounds_like_torch_bit_for_bit(dtype):
    """The merge's numpy conversions (`files.dtypes`) round float32 and float64 values exactly as torch's `.to(dtype)`
    does, and read every stored value back exactly; a NaN stays a NaN."""
    from slice_adapter.files import dtypes

    code = dtypes.code_of(dtype)
    x = edge_values()
    want = x.to(dtype).view(torch.uint8).numpy()
    got = dtypes.from_float(x.numpy(), code)
    assert got.dtype == dtypes.numpy_dtype(code) and (got.view(np.uint8) == want).all()  # bits, so -0.0 != 0.0
    x64 = torch.randn(100_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x64 = x64 * 10.0 ** torch.randint(-10, 6, x64.shape, generator=torch.Generator().manual_seed(2))
    want64 = x64.to(dtype).view(torch.uint8).numpy()
    assert (dtypes.from_float(x64.numpy(), code).view(np.uint8) == want64).all()
    back = dtypes.to_float(want.view(dtypes.numpy_dtype(code)), code)
    ref = x.to(dtype).float().numpy()
    finite = ~torch.from_numpy(ref).isnan().numpy()
    assert (back[finite] == ref[finite]).all() and torch.from_numpy(back[~finite]).isnan().all()
    nan = dtypes.from_float(torch.tensor([float("nan"), -float("nan")]).numpy(), code)
    assert torch.from_numpy(dtypes.to_float(nan, code)).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float64])
def test_fp8_and_float64_bases_merge_exactly(tmp_path, shapes, dtype):
    """An fp8 base (the ComfyUI fp8_e4m3fn checkpoints) and a float64 one: touched weights are round(BASE + delta)
    computed in float32 (float64), untouched tensors bit-identical."""
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.05).to(dtype) for k, s in shapes.items()}
    base = save_base(state, tmp_path / "base.safetensors")
    s0 = synthetic_slice(tmp_path / "s0", shapes, 0.05, 0, value_seed=1)
    out = tmp_path / "out.safetensors"
    merge_slices(base, [s0], out, progress=False)
    # the reference, sparse: a dense one would add +0.0 to untouched -0.0 weights (fp8 underflows to -0.0 often)
    merged, want, acc = load(out), dict(state), torch.float64 if dtype == torch.float64 else torch.float32
    for name, (idx, values) in slice_deltas(s0).items():
        flat = state[name].flatten().clone()
        idx = torch.from_numpy(idx)
        flat[idx] = (flat[idx].to(acc) + torch.from_numpy(values).to(acc)).to(dtype)
        want[name] = flat.view(state[name].shape)
    changed = 0
    for k, v in want.items():
        assert merged[k].dtype == dtype and torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), k
        changed += int((merged[k].view(torch.uint8) != state[k].view(torch.uint8)).any())
    assert changed > 10


def test_the_merge_command_never_imports_torch(tmp_path, shapes):
    """scripts/merge_slices.py merges with numpy alone, so it starts in a fraction of a second instead of the ~2 s an
    import of torch takes: a run on a bf16/float32 base, with one slice's values stored in bf16, never loads torch,
    and its output equals torch's arithmetic bit for bit."""
    from safetensors.torch import load_file, save_file

    state, base = make_base(tmp_path / "base.safetensors", shapes, torch.bfloat16)
    s0 = synthetic_slice(tmp_path / "s0", shapes, 0.02, 0, value_seed=1)
    s1 = synthetic_slice(tmp_path / "s1", shapes, 0.02, 1, value_seed=2)
    values = s1 / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(values)).items()}, str(values),
              metadata={"format": "pt"})
    out = tmp_path / "out_bf16.safetensors"
    code = ("import runpy, sys\n"
            f"sys.argv = ['merge_slices.py', '--base', {str(base)!r}, '--slice', {str(s0)!r}, '--slice', {str(s1)!r}, "
            f"'--output', {str(out)!r}, '--no_progress']\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / 'scripts' / 'merge_slices.py')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'the merge command imported torch'\n"
            "assert 'ml_dtypes' not in sys.modules, 'a merge without fp8 imported ml_dtypes (0.7-1 s)'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout
    merged, want = load(out), reference_merge(state, [s0, s1])
    for k, v in want.items():
        assert torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), k
