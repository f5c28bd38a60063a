"""Streaming merge: exact BASE + delta in every key format, bit-identical untouched tensors, stacking, every refusal,
nothing lost on failure, bounded memory, the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import slice_adapter
from slice_adapter import SliceConfig
from slice_adapter.checkpoint import read_header
from slice_adapter.deltas import slice_deltas
from slice_adapter.keys import from_diffusers_state_dict
from slice_adapter.merge import PROVENANCE_KEY, merge_slices
from slice_adapter.selection import overlap_count
from slice_ft.tiny import build_tiny_transformer

from slice_checkpoints import (
    REPO,
    WAN_PREFIX,
    cli,
    dense_deltas,
    files_in,
    load,
    make_slice,
    raw_bytes,
    reference_merge,
    save_base,
    save_sharded,
    synthetic_checkpoint,
    synthetic_shapes,
    synthetic_slice,
    tiny_state,
)

FORMATS = [("diffusers", ""), ("wan", ""), ("wan", WAN_PREFIX)]


@pytest.fixture(scope="module")
def state():
    return tiny_state(0)


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    return {
        "a": make_slice(root / "a", 0.25, 1),
        "b": make_slice(root / "b", 0.25, 2),
        "c": make_slice(root / "c", 0.1, 3),  # another fraction: shares some weights with "a"
    }


def in_format(sd: dict, fmt: str, prefix: str) -> dict:
    return from_diffusers_state_dict(sd, fmt, prefix)


def test_slice_deltas_rebuild_the_adapters_own_dense_delta(tmp_path):
    model = build_tiny_transformer(0)
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=3, init_weights=False))
    folder = slice_adapter.save_adapter(model, tmp_path / "s")
    shapes = {k: tuple(v.shape) for k, v in tiny_state(0).items()}
    got = dense_deltas(folder, shapes)
    want = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "slice_values", {}):
            owner = name.removesuffix(".sliced_params").replace(".base_layer", "")
            for pname, delta in module.get_delta_weight("default").items():
                want[f"{owner}.{pname}"] = delta
    assert set(got) == set(want) and len(got) > 20
    assert all(torch.equal(got[k], want[k]) for k in want)
    idx, values = slice_deltas(folder)["blocks.0.attn1.to_q.weight"]
    assert idx.dtype.name == "int64" and values.dtype.name == "float32" and len(idx) == len(values)


@pytest.mark.parametrize("fmt,prefix", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_the_adapters_own_merge_in_every_key_format(tmp_path, slices, fmt, prefix, dtype):
    base = save_base(tiny_state(0), tmp_path / "base.safetensors", fmt, prefix, dtype,
                     metadata={"format": "pt", "modelspec.title": "tiny"})
    result = merge_slices(base, [slices["a"]], tmp_path / "out.safetensors", progress=False)
    model = build_tiny_transformer(0).to(dtype)
    slice_adapter.load_adapter(model, slices["a"])
    slice_adapter.merge_adapters(model)
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "slice_" not in k}
    want = in_format(merged, fmt, prefix)
    out = load(tmp_path / "out.safetensors")
    assert list(out) == list(read_header(base)[0])  # same keys, same order as BASE
    assert all(torch.equal(out[k], want[k]) and out[k].dtype == want[k].dtype for k in want)
    assert (result.key_format, result.key_prefix) == (fmt, prefix)
    assert result.changed_weights == slice_adapter.plan(model, SliceConfig(fraction=0.25, slice_id=1)).selected
    meta = safe_open(str(tmp_path / "out.safetensors"), "pt").metadata()
    assert meta["modelspec.title"] == "tiny"  # BASE's metadata kept
    [record] = json.loads(meta[PROVENANCE_KEY])
    assert (record["fraction"], record["slice_id"], record["seed"]) == (0.25, 1, 0)
    saved = json.loads((slices["a"] / "adapter_config.json").read_text())
    assert record["fingerprint"] == saved["layout"]["fingerprint"]


def test_untouched_tensors_and_weights_are_bit_identical(tmp_path, state):
    folder = make_slice(tmp_path / "s", 0.1, 4, target_modules=["to_q", "ffn.net.2"])
    base = save_base(state, tmp_path / "base.safetensors", "wan", WAN_PREFIX, torch.bfloat16)
    merge_slices(base, folder, tmp_path / "out.safetensors", progress=False)
    touched = {f"{WAN_PREFIX}blocks.{i}.{m}.{leaf}" for i in range(2) for m in ("self_attn.q", "cross_attn.q", "ffn.2")
               for leaf in ("weight", "bias")}
    header = read_header(base)[0]
    untouched = [k for k in header if k not in touched]
    assert len(untouched) > 40
    assert all(raw_bytes(tmp_path / "out.safetensors", k) == raw_bytes(base, k) for k in untouched)
    out, ref = load(tmp_path / "out.safetensors"), load(base)
    deltas = dense_deltas(folder, {k: tuple(v.shape) for k, v in state.items()})
    key, name = f"{WAN_PREFIX}blocks.1.ffn.2.weight", "blocks.1.ffn.net.2.weight"
    outside = deltas[name] == 0
    assert outside.sum() < outside.numel()  # some weights changed ...
    assert torch.equal(out[key].view(torch.int16)[outside], ref[key].view(torch.int16)[outside])  # ... no others
    assert torch.equal(out[key], (ref[key].float() + deltas[name]).to(torch.bfloat16))  # rounded once


def test_sharded_diffusers_folder_gives_one_diffusers_file(tmp_path, state, slices, capsys):
    folder = save_sharded(state, tmp_path / "transformer", shards=3)
    result = merge_slices(folder, [slices["a"], slices["b"]], tmp_path / "out.safetensors")
    assert "merging into out.safetensors: 100%" in capsys.readouterr().err  # a progress bar over the tensors
    out = load(tmp_path / "out.safetensors")
    want = reference_merge(state, [slices["a"], slices["b"]])
    assert result.key_format == "diffusers" and set(out) == set(state)
    assert all(torch.equal(out[k], want[k]) for k in want)


def test_dtype_casts_every_floating_tensor_rounding_once(tmp_path, state, slices):
    base = save_base(state, tmp_path / "base.safetensors", "wan")
    result = merge_slices(base, slices["a"], tmp_path / "out.safetensors", dtype="fp16", progress=False)
    want = in_format(reference_merge(state, [slices["a"]], torch.float16), "wan", "")
    out = load(tmp_path / "out.safetensors")
    assert result.dtype == "fp16" and all(v.dtype == torch.float16 for v in out.values())
    assert all(torch.equal(out[k], want[k]) for k in want)


def test_stacking_equals_base_plus_both_deltas_and_keeps_slice_one(tmp_path, state, slices):
    base = save_base(state, tmp_path / "base.safetensors", "wan", WAN_PREFIX, torch.bfloat16)
    one = merge_slices(base, slices["a"], tmp_path / "one.safetensors", progress=False).output
    # Slice 2 was trained on the merged model: same layout, so it merges onto ONE.
    two = merge_slices(one, slices["b"], tmp_path / "two.safetensors", progress=False).output
    both = merge_slices(base, [slices["a"], slices["b"]], tmp_path / "both.safetensors", progress=False).output
    bf16_state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    want = in_format(reference_merge(bf16_state, [slices["a"], slices["b"]]), "wan", WAN_PREFIX)
    out_two, out_one, out_both = load(two), load(one), load(both)
    assert all(torch.equal(out_two[k], want[k]) and torch.equal(out_both[k], want[k]) for k in want)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name, delta in dense_deltas(slices["a"], shapes).items():  # slice 1's weights: untouched by merge 2
        key = in_format({name: delta}, "wan", WAN_PREFIX).popitem()[0]
        mask = delta != 0
        assert torch.equal(out_two[key][mask], out_one[key][mask])
    records = json.loads(safe_open(str(two), "pt").metadata()[PROVENANCE_KEY])
    assert [(r["fraction"], r["slice_id"]) for r in records] == [(0.25, 1), (0.25, 2)]


def test_overlapping_slices_are_refused_with_their_exact_count(tmp_path, state, slices):
    base = save_base(state, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    shared = overlap_count(*(slice_adapter.deltas.read_slice(slices[k]).plan for k in ("a", "c")))
    assert shared > 0
    with pytest.raises(ValueError, match=rf"share {shared} weights.*allow_overlap"):
        merge_slices(base, [slices["a"], slices["c"]], out, progress=False)
    assert not out.exists() and files_in(tmp_path) == ["base.safetensors"]
    merge_slices(base, [slices["a"], slices["c"]], out, allow_overlap=True, progress=False)
    want = reference_merge(state, [slices["a"], slices["c"]])
    got = load(out)
    assert all(torch.equal(got[k], want[k]) for k in want)  # both deltas added where they overlap


def test_merging_a_slice_already_in_base_is_refused(tmp_path, state, slices):
    base = save_base(state, tmp_path / "base.safetensors")
    one = merge_slices(base, slices["a"], tmp_path / "one.safetensors", progress=False).output
    selected = slice_adapter.deltas.read_slice(slices["a"]).plan.selected
    with pytest.raises(ValueError, match=rf"shares {selected} weights with the slice .*already merged into BASE"):
        merge_slices(one, slices["a"], tmp_path / "again.safetensors", progress=False)
    assert not (tmp_path / "again.safetensors").exists()


def test_slice_of_another_model_is_refused_naming_the_parameter(tmp_path, state):
    base = save_base(state, tmp_path / "base.safetensors", "wan", WAN_PREFIX)
    wider = make_slice(tmp_path / "wider", 0.25, 0, model_overrides={"ffn_dim": 96})
    with pytest.raises(ValueError, match=r"expects 'model\.diffusion_model\.blocks\.0\.ffn\.0\.bias' \('blocks\.0"
                                         r"\.ffn\.net\.0\.proj\.bias'\) with shape \[96\], BASE .* has \[64\]"):
        merge_slices(base, wider, tmp_path / "out.safetensors", progress=False)
    deeper_base = save_base(tiny_state(0, num_layers=3), tmp_path / "deeper.safetensors")
    shallow = make_slice(tmp_path / "shallow", 0.25, 0)
    with pytest.raises(ValueError, match=r"BASE .* has parameter 'blocks\.2\.attn1\.norm_k\.weight'.*was "
                                         r"trained on did not have"):
        merge_slices(deeper_base, shallow, tmp_path / "out.safetensors", progress=False)
    assert not (tmp_path / "out.safetensors").exists()


def test_output_equal_to_base_is_refused(tmp_path, state, slices):
    base = save_base(state, tmp_path / "base.safetensors")
    before = base.read_bytes()
    with pytest.raises(ValueError, match="is BASE itself"):
        merge_slices(base, slices["a"], tmp_path / "sub" / ".." / "base.safetensors", overwrite=True, progress=False)
    folder = save_sharded(state, tmp_path / "transformer", shards=2)
    shard = folder / "diffusion_pytorch_model-00001-of-00002.safetensors"
    with pytest.raises(ValueError, match="is BASE itself"):
        merge_slices(folder, slices["a"], shard, overwrite=True, progress=False)
    assert base.read_bytes() == before


def test_existing_output_needs_overwrite_and_survives_a_failed_merge(tmp_path, state, slices, monkeypatch):
    base = save_base(state, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"earlier output")
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        merge_slices(base, slices["a"], out, progress=False)
    assert out.read_bytes() == b"earlier output"

    import slice_adapter.merge as merge_module

    calls = {"n": 0}
    real = merge_module.read_stored

    def failing(f, entry):
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk vanished")
        return real(f, entry)

    monkeypatch.setattr(merge_module, "read_stored", failing)
    with pytest.raises(OSError, match="disk vanished"):
        merge_slices(base, slices["a"], out, overwrite=True, progress=False)
    assert out.read_bytes() == b"earlier output"
    assert files_in(tmp_path) == ["base.safetensors", "out.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    merge_slices(base, slices["a"], out, overwrite=True, progress=False)
    assert set(load(out)) == set(state)


def test_unreadable_or_truncated_inputs_are_refused(tmp_path, state, slices):
    base = save_base(state, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(base.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.safetensors' is truncated: its header needs \d+ bytes, the file has"):
        merge_slices(cut, slices["a"], out, progress=False)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="corrupted header"):
        merge_slices(junk, slices["a"], out, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        merge_slices(tmp_path / "missing.safetensors", slices["a"], out, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        merge_slices(base, tmp_path / "no_slice", out, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in slices["a"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    values = broken / "adapter_model.safetensors"
    values.write_bytes(values.read_bytes()[:-8])
    with pytest.raises(ValueError, match="adapter_model.safetensors' is truncated"):
        merge_slices(base, broken, out, progress=False)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json' is corrupted"):
        merge_slices(base, broken, out, progress=False)
    assert not out.exists()


def test_too_little_disk_space_is_refused_before_writing(tmp_path, state, slices, monkeypatch):
    import slice_adapter.merge as merge_module

    base = save_base(state, tmp_path / "base.safetensors")
    monkeypatch.setattr(merge_module, "_free_space", lambda path: 1000)
    with pytest.raises(ValueError, match=r"not enough free disk space .* needs 1\d\d\.\d KiB, 1000 B are free"):
        merge_slices(base, slices["a"], tmp_path / "out.safetensors", progress=False)
    assert files_in(tmp_path) == ["base.safetensors"]


MEMORY_CHILD = r"""
import resource, sys
import psutil
from slice_adapter.merge import merge_slices
before = psutil.Process().memory_info().rss
merge_slices(sys.argv[1], sys.argv[2:4], sys.argv[4], progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - before)
"""
# exec records the parent's RSS as the child's starting peak: a small launcher in between keeps pytest's out of it.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def test_merge_memory_stays_near_a_few_tensors_not_the_checkpoint(tmp_path):
    config = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=4, out_channels=4,
                  text_dim=64, freq_dim=32, ffn_dim=4096, num_layers=10, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
    shapes = synthetic_shapes(config)
    base = synthetic_checkpoint(tmp_path / "base.safetensors", shapes, torch.bfloat16, "wan", WAN_PREFIX)
    largest = 2 * max(math.prod(s) for s in shapes.values())  # bf16 bytes: 4 MiB (ffn weights)
    size = base.stat().st_size
    assert largest == 4 * 2**20 and size > 25 * largest
    s1 = synthetic_slice(tmp_path / "s1", shapes, 0.01, 1)
    s2 = synthetic_slice(tmp_path / "s2", shapes, 0.01, 2, value_seed=1)
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", MEMORY_CHILD, base, s1, s2, out],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1])
    assert growth < 3 * largest + 16 * 2**20, f"peak RSS grew {growth / 2**20:.1f} MiB merging {size / 2**20:.0f} MiB"
    key, name = f"{WAN_PREFIX}blocks.9.ffn.2.weight", "blocks.9.ffn.net.2.weight"
    d1, d2 = dense_deltas(s1, shapes)[name], dense_deltas(s2, shapes)[name]
    assert torch.equal(load(out)[key], (load(base)[key].float() + d1 + d2).to(torch.bfloat16))


def test_cli_merges_and_refuses_with_exit_code_2(tmp_path, state, slices, capsys):
    main = cli("merge_slices.py").main
    base = save_base(state, tmp_path / "base.safetensors", "wan", WAN_PREFIX)
    out = tmp_path / "out.safetensors"
    args = ["--base", str(base), "--slice", str(slices["a"]), "--slice", str(slices["b"]), "--output", str(out)]
    assert main(args + ["--dtype", "bf16", "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "wan keys with prefix 'model.diffusion_model.'" in printed and "bf16" in printed
    want = in_format(reference_merge(state, [slices["a"], slices["b"]], torch.bfloat16), "wan", WAN_PREFIX)
    got = load(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    overlap = ["--base", str(base), "--slice", str(slices["a"]), "--slice", str(slices["c"]), "--output",
               str(tmp_path / "o2.safetensors")]
    assert main(overlap) == 2 and "--allow-overlap" in capsys.readouterr().err
    assert main(overlap + ["--allow-overlap", "--no_progress"]) == 0
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    helped = capsys.readouterr().out
    assert help_exit.value.code == 0 and all(f in helped for f in ("--allow-overlap", "--wan2gp_phase", "--dtype"))


def test_merge_writes_a_wan2gp_definition_and_refuses_bad_names_before_writing(tmp_path, state, slices):
    base = save_base(state, tmp_path / "base.safetensors", "wan", WAN_PREFIX, torch.bfloat16)
    bad_name = tmp_path / "merged.safetensors"
    with pytest.raises(ValueError, match=r"lowercase 'bf16' or 'fp16'.*merged_bf16\.safetensors"):
        merge_slices(base, slices["a"], bad_name, wan2gp_json=tmp_path / "def.json", wan2gp_architecture="t2v",
                     progress=False)
    out = tmp_path / "merged_bf16.safetensors"
    with pytest.raises(ValueError, match="match no published Wan model.*--wan2gp_architecture"):
        merge_slices(base, slices["a"], out, wan2gp_json=tmp_path / "def.json", progress=False)
    with pytest.raises(ValueError, match="two experts.*'high' or 'low'"):
        merge_slices(base, slices["a"], out, wan2gp_json=tmp_path / "def.json", wan2gp_architecture="t2v_2_2",
                     progress=False)
    assert files_in(tmp_path) == ["base.safetensors"]
    code = cli("merge_slices.py").main(
        ["--base", str(base), "--slice", str(slices["a"]), "--output", str(out), "--no_progress", "--wan2gp_json",
         str(tmp_path / "t2v_2_2_tiny.json"), "--wan2gp_architecture", "t2v_2_2", "--wan2gp_phase", "low",
         "--wan2gp_name", "Tiny low"])
    assert code == 0
    definition = json.loads((tmp_path / "t2v_2_2_tiny.json").read_text())
    model = definition["model"]
    assert model["URLs"] == "t2v_2_2" and model["URLs2"] == [str(out.resolve())]
    assert (model["name"], model["architecture"], model["auto_quantize"]) == ("Tiny low", "t2v_2_2", True)
    assert "fraction 0.25 slice 1" in model["description"] and definition["guidance_phases"] == 2
