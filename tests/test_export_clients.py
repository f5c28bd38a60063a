"""Each LoRA export applied the way the program it names applies it, compared with the merged model: exact where the
program can carry the slice, refused (or, with allow_lossy, recorded) where it cannot. The formats x clients table in
README.md is `test_formats_x_clients_table`'s EXPECTED.

Always on: ComfyUI, Wan2GP and musubi-tuner as restated in client_loaders.py, diffusers' own load_lora_weights.
Opt-in (`pytest -m clients`, deselected by default): the real musubi-tuner source (MUSUBI_TUNER_SRC=<checkout>/src)
and the real mmgp loader Wan2GP uses (`pip install -e ".[clients]"`). ComfyUI is not installable from PyPI and its
repository snapshot was too large to bring in, so it has no real-loader test yet.
"""

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

from slice_adapter.export import CLIENTS, delta_kind, export_lora
from slice_adapter.keys import to_diffusers_state_dict, wan_to_diffusers
from slice_adapter.merge import merge_slices
from slice_ft.tiny import build_tiny_pipeline

from client_loaders import CLIENT_APPLY, changed
from slice_checkpoints import load, make_slice, save_base, tiny_state

FORMATS = ["comfy", "wan2gp", "musubi", "diffusers"]
PROGRAM = {fmt: CLIENTS[fmt].program for fmt in FORMATS}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny Wan in original keys, no prefix (the layout musubi-tuner and Wan2GP load)."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    return save_base(tiny_state(0), path, "wan", "")


def merged_state(base, folder, tmp_path) -> dict:
    return load(merge_slices(base, folder, tmp_path / "merged.safetensors", progress=False).output)


def diffusers_apply(base_state: dict, lora_file) -> dict:
    """diffusers' own loader: WanPipeline.load_lora_weights, fused into the weights, in original names."""
    from slice_adapter.keys import diffusers_to_wan

    pipe = build_tiny_pipeline(0)
    pipe.transformer.load_state_dict(to_diffusers_state_dict(base_state))
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return {diffusers_to_wan(k): v for k, v in pipe.transformer.state_dict().items()}


def apply(program: str, base_state: dict, lora_file) -> dict:
    if program == "diffusers":
        return diffusers_apply(base_state, lora_file)
    return CLIENT_APPLY[program](base_state, load(lora_file))[0]


def kinds(names) -> set:
    return {delta_kind(wan_to_diffusers(n), n.endswith(".weight") and not any(x in n for x in ("norm", "modulation")))
            for n in names}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_slice_trained_lossless_for_a_program_is_exact_there(tmp_path, base, fmt):
    folder = make_slice(tmp_path / "s", 0.25, 1, lossless_for=fmt)
    want = merged_state(base, folder, tmp_path)
    result = export_lora(folder, tmp_path / "lora.safetensors", fmt)
    assert result["dropped"] == []
    got = apply(PROGRAM[fmt], load(base), tmp_path / "lora.safetensors")
    touched = changed(load(base), want)
    assert touched and kinds(touched) >= {"linear_weight"}  # the slice changes the model ...
    for k in want:  # ... and the program, loading the LoRA, gets the merged model
        torch.testing.assert_close(got[k], want[k], atol=1e-6 if fmt == "diffusers" else 0, rtol=0)
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["slice_ft.dropped"])["count"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_default_slice_is_refused_naming_what_the_program_drops(tmp_path, base, fmt):
    folder = make_slice(tmp_path / "s", 0.25, 1)  # default targets: norms, biases and the modulation too
    out = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError, match=r"would not apply (\d+) of the slice's .* largest delta left out .*Fix: merge "
                                         r"instead.*--lossless_for " + fmt + r".*--allow_lossy") as err:
        export_lora(folder, out, fmt)
    assert not out.exists()
    result = export_lora(folder, out, fmt, allow_lossy=True)
    assert int(err.value.args[0].split("would not apply ")[1].split()[0]) == len(result["dropped"])
    assert result["dropped"][0] in str(err.value) and "blocks.0.scale_shift_table" in result["dropped"]
    assert f"{result['max_dropped_delta']:.4g}" in str(err.value)
    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()["slice_ft.dropped"])
    assert recorded["parameters"] == result["dropped"] and recorded["count"] == len(result["dropped"]) > 0
    assert recorded["max_abs_delta"] > 0
    # The program applies exactly the parameters the export kept, and none of those it reported dropped.
    want = merged_state(base, folder, tmp_path)
    got = apply(PROGRAM[fmt], load(base), out)
    from slice_adapter.keys import diffusers_to_wan

    dropped = {diffusers_to_wan(n) for n in result["dropped"]}
    for k in want:
        if k in dropped:
            assert torch.equal(got[k], load(base)[k])
        else:
            torch.testing.assert_close(got[k], want[k], atol=1e-6 if fmt == "diffusers" else 0, rtol=0)


# What each program leaves out of a default slice (every block parameter changed), by kind of delta: the README
# table. "all" = the file applies nothing there.
EXPECTED = {
    ("comfy", "ComfyUI"): {"raw"},
    ("comfy", "Wan2GP"): {"raw"},
    ("comfy", "musubi-tuner"): "all",
    ("comfy", "diffusers"): {"norm", "raw"},
    ("wan2gp", "ComfyUI"): {"raw"},
    ("wan2gp", "Wan2GP"): {"raw"},
    ("wan2gp", "musubi-tuner"): "all",
    ("wan2gp", "diffusers"): {"norm", "raw"},
    ("musubi", "ComfyUI"): {"linear_bias", "norm", "raw"},
    ("musubi", "Wan2GP"): {"linear_bias", "norm", "raw"},
    ("musubi", "musubi-tuner"): {"linear_bias", "norm", "raw"},
    ("musubi", "diffusers"): {"linear_bias", "norm", "raw"},
    ("diffusers", "musubi-tuner"): "all",
    ("diffusers", "diffusers"): {"norm", "raw"},
}


def test_formats_x_clients_table(tmp_path, base):
    folder = make_slice(tmp_path / "s", 0.25, 1)
    want = merged_state(base, folder, tmp_path)
    touched = changed(load(base), want)
    measured = {}
    for fmt in FORMATS:
        out = tmp_path / f"{fmt}.safetensors"
        export_lora(folder, out, fmt, allow_lossy=True)
        for program in ["ComfyUI", "Wan2GP", "musubi-tuner", "diffusers"]:
            if (fmt, program) not in EXPECTED:
                continue
            got = apply(program, load(base), out)
            missed = {k for k in touched if not torch.allclose(got[k], want[k], atol=1e-6, rtol=0)}
            measured[(fmt, program)] = "all" if missed == touched else kinds(missed)
    print({f"{f} -> {p}": v for (f, p), v in measured.items()})
    assert measured == EXPECTED


# ------------------------------------------------------------------------------------------ opt-in: real loaders --
@pytest.mark.clients
def test_real_musubi_tuner_merges_the_musubi_export_exactly(tmp_path, base):
    src = os.environ.get("MUSUBI_TUNER_SRC")
    if not src:
        pytest.fail("set MUSUBI_TUNER_SRC to a musubi-tuner checkout's src folder to run this opt-in test")
    sys.path.insert(0, src)
    from musubi_tuner.utils.lora_utils import load_safetensors_with_lora_and_fp8

    folder = make_slice(tmp_path / "s", 0.25, 1, lossless_for="musubi")
    export_lora(folder, tmp_path / "lora.safetensors", "musubi")
    got = load_safetensors_with_lora_and_fp8(str(base), [load(tmp_path / "lora.safetensors")], [1.0], False,
                                            torch.device("cpu"))
    want = merged_state(base, folder, tmp_path)
    assert changed(load(base), want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


@pytest.mark.clients
def test_real_mmgp_loads_the_wan2gp_export_into_the_modules_it_patches(tmp_path, base):
    """mmgp (what Wan2GP loads LoRAs with) parses the file and attaches each tensor to its module; its CUDA offload
    profile, which declares the LoRA-able modules and applies them in forward, is replaced here by declaring every
    module with a weight and adding what mmgp attached (W += B @ A * alpha / rank, W += diff, b += diff_b)."""
    try:
        from mmgp import offload
    except ImportError:
        pytest.fail('pip install -e ".[clients]" (mmgp) to run this opt-in test')
    from client_loaders import wan_module_tree

    folder = make_slice(tmp_path / "s", 0.25, 1, lossless_for="wan2gp")
    export_lora(folder, tmp_path / "lora.safetensors", "wan2gp")
    state = load(base)
    model = wan_module_tree(state)
    declared = {n: m for n, m in model.named_modules() if hasattr(m, "weight")}
    model._loras_model_data = {m: {} for m in declared.values()}
    model._loras_model_shortcuts = {n: model._loras_model_data[m] for n, m in declared.items()}

    def wan2gp_preprocess(sd):  # Wan2GP's WanModel.preprocess_loras for a t2v model: drop *modulation.diff
        return {k: v for k, v in sd.items() if not k.endswith("modulation.diff")}

    offload.load_loras_into_model(model, [str(tmp_path / "lora.safetensors")], [1.0], preprocess_sd=wan2gp_preprocess)
    assert not model._loras_errors
    got = {k: v.clone() for k, v in state.items()}
    for name, module in declared.items():
        data = model._loras_model_data[module].get("0")
        if data is None:
            continue
        down, up, diff_b, _, scale, meta = data
        if meta.get("type") == "diff":
            got[f"{name}.weight"] = got[f"{name}.weight"] + up.float()
        elif down is not None:
            got[f"{name}.weight"] = got[f"{name}.weight"] + up.float() @ down.float() * scale
        if diff_b is not None:
            got[f"{name}.bias"] = got[f"{name}.bias"] + diff_b.float()
    want = merged_state(base, folder, tmp_path)
    assert changed(state, want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
