"""LoRA export (loaded by diffusers' WanPipeline, equal to ComfyUI's arithmetic) and Wan2GP finetune definitions."""

import json

import pytest
import torch
from safetensors import safe_open

import slice_adapter
from slice_adapter.export import (
    check_wan2gp_filename,
    export_lora,
    infer_wan2gp_architecture,
    suggest_wan2gp_filename,
    write_wan2gp_definition,
)
from slice_adapter.layer import SliceLayer
from slice_adapter.merge import merge_slices
from slice_ft.tiny import build_tiny_pipeline, build_tiny_transformer

from conftest import wan_inputs
from slice_checkpoints import NON_LINEAR, cli, load, make_slice, save_base, synthetic_shapes, tiny_state


def transformer_output(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def slice_output(folder, inputs, zero=()):
    """The tiny transformer with the slice loaded (optionally with some parameters' deltas zeroed)."""
    model = build_tiny_transformer(0)
    slice_adapter.load_adapter(model, folder)
    for name, module in model.named_modules():
        if not isinstance(module, SliceLayer) or "default" not in module.slice_values:
            continue
        for pname, values in module.slice_values["default"].items():
            owner = name.removesuffix(".sliced_params").replace(".base_layer", "")
            if any(f"{owner}.{pname}".endswith(z) or f".{z}." in f"{owner}.{pname}." for z in zero):
                values.data.zero_()
    return transformer_output(model, inputs)


def lora_output(lora_file, inputs):
    pipe = build_tiny_pipeline(0)
    pipe.load_lora_weights(str(lora_file))
    return transformer_output(pipe.transformer, inputs)


@pytest.fixture(scope="module")
def inputs():
    return wan_inputs()


@pytest.fixture(scope="module")
def base_output(inputs):
    return transformer_output(build_tiny_transformer(0), inputs)


# Top-level Linear modules too: diffusers' converter reads them but chokes on their alpha keys (left out: scale 1).
TOP_AND_BLOCK = ["proj_out", "time_proj", "linear_1", "linear_2", "to_q", "ffn.net.2"]


@pytest.mark.parametrize("fraction,slice_id,targets", [(0.25, 1, None), (0.01, 3, None), (0.25, 2, TOP_AND_BLOCK)])
@pytest.mark.parametrize("fmt", ["comfy", "diffusers"])
def test_lora_loaded_by_diffusers_matches_the_slice(tmp_path, inputs, base_output, fraction, slice_id, targets, fmt):
    exclude = None if targets else NON_LINEAR  # weights and biases only
    folder = make_slice(tmp_path / "s", fraction, slice_id, target_modules=targets, exclude_modules=exclude)
    result = export_lora(folder, tmp_path / "lora.safetensors", fmt)
    want = slice_output(folder, inputs)
    got = lora_output(tmp_path / "lora.safetensors", inputs)
    assert (want - base_output).abs().max() > 1e-3  # the slice changes the output ...
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)  # ... and the LoRA reproduces it
    assert result["dropped"] == [] and result["ignored_by_diffusers"] == []


I2V = dict(image_dim=24, added_kv_proj_dim=32, in_channels=8)  # a tiny Wan 2.1 I2V: image projections k_img/v_img


@pytest.mark.parametrize("fraction,slice_id,targets", [(0.02, 3, None), (0.5, 1, ["add_k_proj", "to_q"])])
def test_i2v_lora_loads_even_with_only_one_image_projection(tmp_path, fraction, slice_id, targets):
    from diffusers import WanPipeline
    from slice_ft.tiny import build_tiny_components

    exclude = NON_LINEAR + ["norm_added_k", "norm1"]  # image embedder norm1/norm2 are LayerNorms too
    folder = make_slice(tmp_path / "s", fraction, slice_id, model_overrides=I2V, target_modules=targets,
                        exclude_modules=exclude)
    result = export_lora(folder, tmp_path / "lora.safetensors", "comfy")
    g = torch.Generator().manual_seed(0)
    # diffusers splits image and text tokens assuming 512 text tokens
    inputs = dict(hidden_states=torch.randn(1, 8, 3, 8, 8, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 5, 24, generator=g))
    model = build_tiny_transformer(0, **I2V)
    slice_adapter.load_adapter(model, folder)
    want = transformer_output(model, inputs)
    pipe = WanPipeline(**{**build_tiny_components(0), "transformer": build_tiny_transformer(0, **I2V)})
    before = transformer_output(pipe.transformer, inputs)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    got = transformer_output(pipe.transformer, inputs)
    assert (want - before).abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    if targets:  # add_v_proj has no delta: it got a zero entry so that diffusers' converter takes k_img at all
        assert "blocks.0.attn2.add_v_proj" in result["padded_modules"]


def test_comfy_keys_hold_every_delta_exactly_under_comfyui_arithmetic(tmp_path):
    folder = make_slice(tmp_path / "s", 0.1, 2, lossless_for="comfy")  # norms and biases, no modulation
    state = tiny_state(0)
    base = save_base(state, tmp_path / "base.safetensors", "wan", "model.diffusion_model.")
    merged = load(merge_slices(base, folder, tmp_path / "merged.safetensors", progress=False).output)
    lora = load(export_lora(folder, tmp_path / "lora.safetensors", "comfy")["output"])
    # ComfyUI: W += up @ down * alpha / rank, W += diff, bias += diff_b, keyed by the original Wan names.
    patched = {k.removeprefix("model."): v.clone() for k, v in load(base).items()}
    for key, value in lora.items():
        stem, _, kind = key.rpartition(".")
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight")
            up = lora[f"{stem}.lora_B.weight"]
            alpha = lora[f"{stem}.alpha"].item() if f"{stem}.alpha" in lora else up.shape[1]
            patched[f"{stem}.weight"] += up @ value * (alpha / up.shape[1])
        elif kind == "diff":
            target = f"{stem}.weight" if f"{stem}.weight" in patched else stem
            patched[target] += value
        elif kind == "diff_b":
            patched[f"{stem}.bias"] += value
    assert all(torch.equal(patched[k.removeprefix("model.")], v) for k, v in merged.items())
    assert "diffusion_model.blocks.1.norm3.diff_b" in lora and "diffusion_model.blocks.0.self_attn.norm_q.diff" in lora
    assert not any("modulation" in k for k in lora)  # ComfyUI would never apply it: refused, see test_export_clients


def test_diffusers_keeps_linear_deltas_and_drops_norm_and_modulation_deltas(tmp_path, inputs):
    folder = make_slice(tmp_path / "s", 0.25, 0)  # default targets
    comfy = export_lora(folder, tmp_path / "comfy.safetensors", "comfy", allow_lossy=True)
    diffusers = export_lora(folder, tmp_path / "diffusers.safetensors", "diffusers", allow_lossy=True)
    non_linear = sorted(comfy["ignored_by_diffusers"] + comfy["dropped"])
    # per block: norm_q and norm_k of both attentions, norm2 weight and bias, scale_shift_table
    assert non_linear == sorted(diffusers["dropped"]) and len(non_linear) == 2 * 7
    assert comfy["dropped"] == ["blocks.0.scale_shift_table", "blocks.1.scale_shift_table"]
    assert all(any(z in n for z in NON_LINEAR) for n in non_linear)
    want = slice_output(folder, inputs, zero=NON_LINEAR)  # what diffusers can apply
    full = slice_output(folder, inputs)
    for result in (comfy, diffusers):
        got = lora_output(result["output"], inputs)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert (full - want).abs().max() > 1e-4  # the dropped deltas mattered: documented as ComfyUI-only


def test_any_bias_delta_pads_every_lora_module_with_a_pair_and_a_bias(tmp_path):
    folder = make_slice(tmp_path / "s", 0.01, 3, exclude_modules=NON_LINEAR)
    result = export_lora(folder, tmp_path / "lora.safetensors", "comfy")
    lora = load(tmp_path / "lora.safetensors")
    pairs = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    biases = {k.removesuffix(".diff_b") for k in lora if k.endswith(".diff_b")}
    assert pairs == biases and result["padded_modules"]  # every module has both, some by padding
    touched = slice_adapter.deltas.read_slice(folder).plan.tiles
    for stem in pairs:
        a, b, alpha = lora[f"{stem}.lora_A.weight"], lora[f"{stem}.lora_B.weight"], lora[f"{stem}.alpha"]
        assert alpha.item() == a.shape[0] == b.shape[1] and alpha.dtype == torch.float32  # scale alpha / rank = 1
        assert set(b.unique().tolist()) <= {0.0, 1.0} and bool((b.sum(0) <= 1).all())  # one-hot columns (or zero pad)
    padded = [s for s in pairs if not lora[f"{s}.lora_B.weight"].any()]
    assert padded and all(lora[f"{s}.lora_A.weight"].shape[0] == 1 for s in padded)
    assert len(touched) < 2 * len(pairs)  # at this fraction most modules lack a weight or a bias delta


def test_diffusers_format_writes_save_lora_weights_keys_and_config(tmp_path):
    folder = make_slice(tmp_path / "s", 0.25, 1, lossless_for="diffusers")
    export_lora(folder, tmp_path / "lora.safetensors", "diffusers")
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"transformer.blocks.0.attn1.to_q.lora_A.weight", "transformer.blocks.1.ffn.net.2.lora_B.bias"} <= keys
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == config["transformer.r"] and config["transformer.lora_bias"] is True
    assert config["transformer.alpha_pattern"] == config["transformer.rank_pattern"]
    assert json.loads(meta["slice_ft.source_slice"])["slice_id"] == 1


def test_comfy_format_uses_original_wan_names(tmp_path):
    folder = make_slice(tmp_path / "s", 0.25, 1, lossless_for="comfy")
    lora = load(export_lora(folder, tmp_path / "lora.safetensors")["output"])
    assert {"diffusion_model.blocks.0.self_attn.q.lora_A.weight", "diffusion_model.blocks.0.self_attn.q.lora_B.weight",
            "diffusion_model.blocks.0.self_attn.q.alpha", "diffusion_model.blocks.1.cross_attn.o.diff_b",
            "diffusion_model.blocks.1.ffn.0.lora_A.weight"} <= set(lora)
    assert all(k.startswith("diffusion_model.blocks.") for k in lora)


def test_bf16_export_keeps_exact_selectors_and_rounds_values_once(tmp_path):
    folder = make_slice(tmp_path / "s", 0.25, 1, lossless_for="comfy")
    full = load(export_lora(folder, tmp_path / "a.safetensors")["output"])
    half = load(export_lora(folder, tmp_path / "b.safetensors", dtype="bf16")["output"])
    for k, v in full.items():
        assert torch.equal(half[k], v if k.endswith(".alpha") else v.to(torch.bfloat16))
    assert half["diffusion_model.blocks.0.self_attn.q.alpha"].dtype == torch.float32


def test_export_refusals_and_cli(tmp_path, capsys):
    folder = make_slice(tmp_path / "s", 0.25, 1)
    out = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError, match="format must be one of"):
        export_lora(folder, out, "kohya")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        export_lora(folder, tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="does not exist"):
        export_lora(tmp_path / "nope", out)
    main = cli("export_lora.py").main
    assert main(["--slice", str(folder), "--output", str(out), "--format", "diffusers"]) == 2  # norms, modulation
    err = capsys.readouterr().err
    assert err.startswith("error: --format diffusers: diffusers would not apply 14 of") and "--allow_lossy" in err
    assert not out.exists()
    assert main(["--slice", str(folder), "--output", str(out), "--format", "diffusers", "--allow_lossy"]) == 0
    captured = capsys.readouterr()
    assert "LoRA modules" in captured.out and "left out 14 deltas" in captured.err
    first = out.read_bytes()
    assert main(["--slice", str(folder), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == first
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0 and "--format" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ Wan2GP ----------
@pytest.fixture(scope="module")
def published_shapes():
    """Diffusers shapes of the published models whose Wan2GP architecture is ambiguous or inferable."""
    from slice_adapter.wan_configs import wan_config

    return {name: synthetic_shapes(wan_config(name)) for name in ("wan2.1-t2v-14b", "wan2.2-i2v-a14b",
                                                                  "wan2.2-ti2v-5b")}


def test_architecture_is_inferred_only_where_shapes_decide_it(published_shapes):
    assert infer_wan2gp_architecture(published_shapes["wan2.2-ti2v-5b"]) == "ti2v_2_2"
    assert infer_wan2gp_architecture(published_shapes["wan2.2-i2v-a14b"]) == "i2v_2_2"
    t2v = published_shapes["wan2.1-t2v-14b"]
    with pytest.raises(ValueError, match=r"Wan 2\.2 A14B expert has exactly the Wan 2\.1 T2V-14B shapes.*'t2v', "
                                         r"'t2v_2_2'"):
        infer_wan2gp_architecture(t2v)
    assert infer_wan2gp_architecture(t2v, "t2v_2_2") == "t2v_2_2"
    with pytest.raises(ValueError, match="needs wan2.2-ti2v-5b shapes"):
        infer_wan2gp_architecture(t2v, "ti2v_2_2")
    with pytest.raises(ValueError, match="unknown Wan2GP architecture 'hunyuan'"):
        infer_wan2gp_architecture(t2v, "hunyuan")


def test_wan2gp_definitions_follow_finetunes_md(tmp_path):
    merged = tmp_path / "wan22_low_character_bf16.safetensors"
    low = write_wan2gp_definition(tmp_path / "t2v_2_2_character.json", merged, architecture="t2v_2_2", phase="low",
                                  name="Character (low noise)", description="slice fine-tune")
    assert json.loads((tmp_path / "t2v_2_2_character.json").read_text()) == low
    assert low == {
        "model": {"name": "Character (low noise)", "architecture": "t2v_2_2", "description": "slice fine-tune",
                  "URLs": "t2v_2_2", "URLs2": [str(merged.resolve())], "auto_quantize": True, "group": "wan2_2"},
        "guidance_phases": 2, "switch_threshold": 875, "guidance_scale": 4, "guidance2_scale": 3, "flow_shift": 12,
    }
    high = write_wan2gp_definition(tmp_path / "high.json", merged, architecture="t2v_2_2", phase="high", name="H",
                                   url="https://example.org/wan22_high_character_fp16.safetensors")
    assert high["model"]["URLs"] == ["https://example.org/wan22_high_character_fp16.safetensors"]
    assert high["model"]["URLs2"] == "t2v_2_2"
    single = write_wan2gp_definition(tmp_path / "t2v_x.json", tmp_path / "x_fp16.safetensors", architecture="t2v",
                                     name="X", settings={"flow_shift": 5})
    assert single == {"model": {"name": "X", "architecture": "t2v", "description": "",
                                "URLs": [str((tmp_path / "x_fp16.safetensors").resolve())], "auto_quantize": True},
                      "flow_shift": 5}
    with pytest.raises(ValueError, match="already exists"):
        write_wan2gp_definition(tmp_path / "t2v_x.json", merged, architecture="t2v", name="X")
    with pytest.raises(ValueError, match="single transformer: phase must be None"):
        write_wan2gp_definition(tmp_path / "y.json", merged, architecture="t2v", phase="low", name="Y")


def test_wan2gp_file_names_must_carry_their_dtype(tmp_path):
    check_wan2gp_filename("wan_character_bf16.safetensors", "bf16")
    check_wan2gp_filename("https://hf.co/x/resolve/main/wan_mfp16.safetensors")
    with pytest.raises(ValueError, match=r"lower case.*'wan_BF16'|lower case.*wan_bf16"):
        check_wan2gp_filename("wan_BF16.safetensors")
    with pytest.raises(ValueError, match="contains 'quanto'"):
        check_wan2gp_filename("wan_quanto_bf16_int8.safetensors")
    with pytest.raises(ValueError, match=r"says fp16 but the file holds bf16 weights.*'wan_bf16\.safetensors'"):
        check_wan2gp_filename("wan_fp16.safetensors", "bf16")
    with pytest.raises(ValueError, match="16-bit checkpoints.*dtype='bf16'"):
        check_wan2gp_filename("wan_bf16.safetensors", "fp32")
    assert suggest_wan2gp_filename("/a/merged_FP32.safetensors", "fp16") == "/a/merged_fp16.safetensors"
    # The dtype is read from the merged file when it exists.
    fp32 = save_base(tiny_state(0), tmp_path / "tiny_bf16.safetensors")
    with pytest.raises(ValueError, match="this one is fp32"):
        write_wan2gp_definition(tmp_path / "d.json", fp32, architecture="t2v", name="T")
    assert not (tmp_path / "d.json").exists()


def test_wan2gp_definitions_use_architecture_ids_wan2gp_accepts_and_its_defaults(tmp_path, published_shapes):
    merged = tmp_path / "wan_i2v_bf16.safetensors"
    # i2v_720p is Wan2GP's model id (defaults/i2v_720p.json), not an architecture: written as i2v + 720p defaults
    hd = write_wan2gp_definition(tmp_path / "hd.json", merged, architecture="i2v_720p", name="HD")
    assert hd["model"]["architecture"] == "i2v" and hd["resolution"] == "1280x720"
    assert write_wan2gp_definition(tmp_path / "sd.json", merged, architecture="i2v", name="SD") == {
        "model": {"name": "SD", "architecture": "i2v", "description": "", "URLs": [str(merged.resolve())],
                  "auto_quantize": True}}
    # every setting of Wan2GP's defaults/i2v_2_2.json and ti2v_2_2.json
    i2v22 = write_wan2gp_definition(tmp_path / "i.json", merged, architecture="i2v_2_2", phase="low", name="I")
    assert {k: v for k, v in i2v22.items() if k != "model"} == {
        "guidance_phases": 2, "switch_threshold": 900, "guidance_scale": 3.5, "guidance2_scale": 3.5,
        "masking_strength": 0.1, "denoising_strength": 0.9, "flow_shift": 5}
    ti2v = write_wan2gp_definition(tmp_path / "t.json", merged, architecture="ti2v_2_2", name="T")
    assert {k: v for k, v in ti2v.items() if k != "model"} == {
        "video_length": 121, "guidance_scale": 5, "flow_shift": 5, "num_inference_steps": 50, "resolution": "1280x720"}
    from slice_adapter.wan_configs import wan_config

    i2v = synthetic_shapes(wan_config("wan2.1-i2v-14b"))
    assert infer_wan2gp_architecture(i2v) == "i2v"  # 480p and 720p have the same shapes: the architecture is i2v
    assert infer_wan2gp_architecture(i2v, "i2v_720p") == "i2v_720p"
    with pytest.raises(ValueError, match="unknown Wan2GP architecture 'i2v_480p'.*i2v_720p"):
        write_wan2gp_definition(tmp_path / "x.json", merged, architecture="i2v_480p", name="X")
