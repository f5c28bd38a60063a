"""The slice adapter: hooked deltas equal merged weights, gradients only on the slice, save/load, bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import slice_adapter
from slice_adapter import SliceConfig
from slice_adapter.layer import Linear as SliceLinear
from slice_adapter.layer import SliceLayer

from conftest import make_wan, wan_inputs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def dense_weights_with_slices(model, adapters=None):
    """The bare model's state dict with every (named) slice's delta added densely: the reference W + dW."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, SliceLayer):
            for adapter in adapters or module.active_adapters:
                if adapter not in module.slice_values:
                    continue
                owner = name.removesuffix(".sliced_params") if name.endswith("sliced_params") else name
                for pname, delta in module.get_delta_weight(adapter).items():
                    key = f"{owner}.{pname}"
                    state[key] = state.get(key, 0) + delta
    bare = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "slice_" not in k}
    return {k: (v.float() + state[k]).to(v.dtype) if k in state else v for k, v in bare.items()}


def test_slice_output_equals_model_with_merged_weights(inputs):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=2, init_weights=False))
    reference = make_wan()
    reference.load_state_dict(dense_weights_with_slices(model))
    hooked = run(model, inputs)
    assert not torch.allclose(hooked, run(make_wan(), inputs), atol=1e-4)  # the slice does something
    torch.testing.assert_close(hooked, run(reference, inputs), atol=2e-6, rtol=1e-5)


def test_base_weights_are_never_modified_while_training(inputs):
    model = make_wan()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=0, init_weights=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(**inputs, return_dict=False)[0].square().mean().backward()
        opt.step()
        opt.zero_grad()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "slice_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_only_the_slice_and_equal_the_dense_gradient(inputs):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.25, slice_id=1, init_weights=False))
    model(**inputs, return_dict=False)[0].square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".slice_values." in n for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)

    # reference: the same model with dense W + dW as trainable weights; its gradient at the selected entries
    reference = make_wan()
    reference.load_state_dict(dense_weights_with_slices(model))
    for p in reference.parameters():
        p.requires_grad_(True)
    reference(**inputs, return_dict=False)[0].square().mean().backward()
    ref_grads = dict(reference.named_parameters())
    plan = slice_adapter.plan(make_wan(), model.peft_config["default"])
    layer = model.blocks[1].ffn.net[0].proj
    for pname, value in layer.slice_values["default"].items():
        name = f"blocks.1.ffn.net.0.proj.{pname}"
        expected = ref_grads[name].grad.reshape(-1)[torch.from_numpy(plan.flat_indices(name))]
        torch.testing.assert_close(value.grad.reshape(-1), expected, atol=1e-7, rtol=1e-4)
    value = model.blocks[0].sliced_params.slice_values["default"]["scale_shift_table"]
    expected = ref_grads["blocks.0.scale_shift_table"].grad.reshape(-1)[
        torch.from_numpy(plan.flat_indices("blocks.0.scale_shift_table"))]
    torch.testing.assert_close(value.grad, expected, atol=1e-7, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(inputs):
    grads = []
    for checkpointing in (False, True):
        model = make_wan()
        model.add_adapter(SliceConfig(fraction=0.2, slice_id=0, init_weights=False))
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        model(**inputs, return_dict=False)[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-5)


def test_slice_forward_and_backward_never_build_a_dense_weight():
    from peft import inject_adapter_in_model
    from torch.utils._python_dispatch import TorchDispatchMode

    owner = torch.nn.Module()
    owner.blocks = torch.nn.ModuleList([torch.nn.Module()])
    owner.blocks[0].proj = torch.nn.Linear(512, 384)
    inject_adapter_in_model(SliceConfig(fraction=0.01, slice_id=3, init_weights=False), owner)
    layer = owner.blocks[0].proj
    assert isinstance(layer, SliceLinear)
    weight_numel = layer.base_layer.weight.numel()
    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # views (the base's own W.t()) share their input's storage: no copy
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    sizes.append(t.numel())
            return out

    x = torch.randn(4, 512, requires_grad=True)
    with Record():
        out = layer(x)
        torch.autograd.grad(out.square().sum(), [x, layer.slice_values["default"]["weight"]])
    assert out.abs().max() > 0 and len(sizes) > 5
    assert max(sizes) < weight_numel / 20  # activation- and slice-sized work only


def test_two_slices_active_at_once_equal_both_merged(inputs):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=1, init_weights=False), adapter_name="a")
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=2, init_weights=False), adapter_name="b")
    model.set_adapters(["a", "b"])
    assert sorted(model.active_adapters()) == ["a", "b"]
    both = run(model, inputs)
    slice_adapter.merge_adapters(model)
    torch.testing.assert_close(run(model, inputs), both, atol=2e-6, rtol=1e-5)
    reference = make_wan()
    slice_adapter.unmerge_adapters(model)
    reference.load_state_dict(dense_weights_with_slices(model, ["a", "b"]))
    torch.testing.assert_close(run(reference, inputs), both, atol=2e-6, rtol=1e-5)


def test_unmerge_restores_base_weights_exactly_even_in_bf16():
    model = make_wan(dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_adapter(SliceConfig(fraction=0.3, slice_id=1, init_weights=False))
    slice_adapter.merge_adapters(model)
    changed = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "slice_" not in k}
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    slice_adapter.unmerge_adapters(model)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "slice_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_values_stay_float32_on_a_bf16_base(tmp_path):
    model = make_wan(dtype=torch.bfloat16)
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=0, init_weights=False))
    model.to("cpu")
    dtypes = {p.dtype for n, p in model.named_parameters() if ".slice_values." in n}
    assert dtypes == {torch.float32}
    slice_adapter.save_adapter(model, tmp_path / "s")
    other = make_wan(dtype=torch.bfloat16)
    slice_adapter.load_adapter(other, tmp_path / "s")
    assert {p.dtype for n, p in other.named_parameters() if ".slice_values." in n} == {torch.float32}
    out = run(other, wan_inputs(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_disable_and_enable_adapters(inputs):
    model = make_wan()
    base = run(model, inputs)
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=0, init_weights=False))
    with_slice = run(model, inputs)
    model.disable_adapters()
    torch.testing.assert_close(run(model, inputs), base, atol=0, rtol=0)
    model.enable_adapters()
    torch.testing.assert_close(run(model, inputs), with_slice, atol=0, rtol=0)


def test_set_adapters_weight_scales_the_delta(inputs):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=0, init_weights=False), adapter_name="s")
    model.set_adapters(["s"], weights=[0.5])
    half = run(model, inputs)
    reference = make_wan()
    reference.load_state_dict(dense_weights_with_slices(model))  # dense deltas include the 0.5 scale
    torch.testing.assert_close(half, run(reference, inputs), atol=2e-6, rtol=1e-5)


def test_fuse_and_unfuse_lora_round_trip(inputs):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=0, init_weights=False))
    hooked = run(model, inputs)
    model.fuse_lora()
    torch.testing.assert_close(run(model, inputs), hooked, atol=2e-6, rtol=1e-5)
    model.unfuse_lora()
    model.disable_adapters()
    torch.testing.assert_close(run(model, inputs), run(make_wan(), inputs), atol=0, rtol=0)


def test_delete_adapters_removes_the_slice(inputs):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=0, init_weights=False), adapter_name="x")
    model.delete_adapters("x")
    assert not any(".slice_values.x" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(run(model, inputs), run(make_wan(), inputs), atol=0, rtol=0)


def test_a_deep_copied_model_keeps_its_own_slices(inputs):
    import copy

    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=0, init_weights=False))
    clone = copy.deepcopy(model)
    assert clone.blocks[0].sliced_params.owner is clone.blocks[0]
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if ".slice_values." in name:
                p.zero_()
    torch.testing.assert_close(run(clone, inputs), run(make_wan(), inputs), atol=0, rtol=0)
    assert not torch.allclose(run(model, inputs), run(clone, inputs))


def test_empty_inputs_pass_through_and_exclusions_raise_no_peft_warning(recwarn):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=0, init_weights=False, exclude_modules=["norm2"]))
    assert not [w for w in recwarn if "exclude" in str(w.message)]
    layer = model.blocks[0].attn2.to_k
    out = layer(torch.zeros(1, 0, 32))
    assert out.shape == (1, 0, 32)


def test_a_weight_whose_share_rounds_to_zero_gets_no_adapter_parameter():
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.001, slice_id=0))
    values = [p for n, p in model.named_parameters() if ".slice_values." in n]
    assert all(p.numel() > 0 for p in values)
    plan = slice_adapter.plan(make_wan(), SliceConfig(fraction=0.001, slice_id=0))
    assert sum(p.numel() for p in values) == plan.selected
    assert len(values) == len(plan.tiles) < len(plan.layouts)


def test_save_then_load_round_trip(tmp_path, inputs):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=3, seed=2, init_weights=False))
    expected = run(model, inputs)
    folder = slice_adapter.save_adapter(model, tmp_path / "slice")
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "SLICE" and config["slice_id"] == 3 and config["layout"]["fingerprint"]
    assert config["tile_order"] == config["layout"]["tile_order"] == "scattered"
    selected = slice_adapter.plan(make_wan(), model.peft_config["default"]).selected
    size = os.path.getsize(folder / "adapter_model.safetensors")
    assert 4 * selected <= size <= 4 * selected + 16_384  # values only, plus the header

    fresh = make_wan()
    name = slice_adapter.load_adapter(fresh, folder)
    assert name == "default"
    torch.testing.assert_close(run(fresh, inputs), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters())
    second = slice_adapter.load_adapter(fresh, folder, is_trainable=True)
    assert second == "default_1"
    assert any(p.requires_grad for n, p in fresh.named_parameters() if ".default_1." in n)


def test_a_slice_saved_before_tile_orders_were_recorded_loads_onto_its_own_weights(tmp_path, inputs):
    """Folders written before the banded order recorded no tile order: their tiles are the scattered order's, and
    loading one puts every value back where it was trained."""
    model = make_wan(ffn_dim=256)  # the FFN's output Linear reads 4 tile segments: 4 bands
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=3, tile_order="scattered", init_weights=False))
    expected = run(model, inputs)
    folder = slice_adapter.save_adapter(model, tmp_path / "slice")
    cfg_file = folder / "adapter_config.json"
    config = json.loads(cfg_file.read_text())
    assert config["tile_order"] == config["layout"]["tile_order"] == "scattered"
    del config["tile_order"], config["layout"]["tile_order"]  # what an older version wrote
    cfg_file.write_text(json.dumps(config))
    fresh = make_wan(ffn_dim=256)
    slice_adapter.load_adapter(fresh, folder)
    assert fresh.peft_config["default"].tile_order == "scattered"
    torch.testing.assert_close(run(fresh, inputs), expected, atol=0, rtol=0)
    banded = make_wan(ffn_dim=256)  # the same values at the banded order's weights give another model: the order matters
    banded.add_adapter(SliceConfig(fraction=0.1, slice_id=3, tile_order="banded", init_weights=False))
    assert not torch.allclose(run(banded, inputs), expected)


def test_peft_model_from_pretrained_loads_every_key(tmp_path, inputs):
    from peft import PeftModel, get_peft_model

    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=1, init_weights=False))
    expected = run(model, inputs)
    slice_adapter.save_adapter(model, tmp_path / "slice")
    peft_model = PeftModel.from_pretrained(make_wan(), tmp_path / "slice")
    torch.testing.assert_close(run(peft_model, inputs), expected, atol=0, rtol=0)
    # PEFT's own save writes the same keys as save_adapter
    trained = get_peft_model(make_wan(), SliceConfig(fraction=0.1, slice_id=1, init_weights=False))
    trained.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "slice" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    merged = peft_model.merge_and_unload()
    assert not any("slice_" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(run(merged, inputs), expected, atol=2e-6, rtol=1e-5)


def test_unload_removes_every_slice_layer(inputs):
    from peft import get_peft_model

    peft_model = get_peft_model(make_wan(), SliceConfig(fraction=0.2, slice_id=0, init_weights=False))
    bare = peft_model.unload()
    assert not any(isinstance(m, SliceLayer) for m in bare.modules())
    torch.testing.assert_close(run(bare, inputs), run(make_wan(), inputs), atol=0, rtol=0)


def test_failed_save_leaves_the_earlier_folder_intact(tmp_path, monkeypatch):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=0, init_weights=False))
    folder = slice_adapter.save_adapter(model, tmp_path / "slice")
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("slice_adapter.io.save_file", broken_save)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".slice_values." in n).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        slice_adapter.save_adapter(model, folder)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["slice"]  # no temp leftovers


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, "abc"])
def test_bad_fraction_is_a_clear_error(fraction):
    with pytest.raises(ValueError, match=r"fraction must be"):
        SliceConfig(fraction=fraction)


@pytest.mark.parametrize("slice_id", [-1, 10, 1.5])
def test_bad_slice_id_is_a_clear_error(slice_id):
    with pytest.raises(ValueError, match=r"slice_id must be an integer in \[0, 9\]"):
        SliceConfig(fraction=0.1, slice_id=slice_id)


def test_targets_that_match_nothing_are_a_clear_error():
    with pytest.raises(ValueError, match="match nothing"):
        make_wan().add_adapter(SliceConfig(target_modules=["no_such_module"]))
    with pytest.raises(ValueError, match="has none"):
        slice_adapter.plan(torch.nn.Sequential(torch.nn.Linear(4, 4)), SliceConfig())


def test_missing_or_corrupted_adapter_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        slice_adapter.load_adapter(make_wan(), tmp_path / "nope")
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=0, init_weights=False))
    folder = slice_adapter.save_adapter(model, tmp_path / "slice")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        slice_adapter.load_adapter(make_wan(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json' is corrupted"):
        slice_adapter.load_adapter(make_wan(), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        slice_adapter.load_adapter(make_wan(), folder)


def test_adapter_for_another_layout_names_the_first_mismatching_parameter(tmp_path):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.1, slice_id=0, init_weights=False))
    slice_adapter.save_adapter(model, tmp_path / "slice")
    wider = make_wan(ffn_dim=96)
    with pytest.raises(ValueError, match=r"layout mismatch at 'blocks\.0\.ffn\.net\.0\.proj\.weight'"):
        slice_adapter.load_adapter(wider, tmp_path / "slice")
    deeper = make_wan(num_layers=3)
    with pytest.raises(ValueError, match=r"the model targets 'blocks\.2\."):
        slice_adapter.load_adapter(deeper, tmp_path / "slice")


def test_registry_makes_slice_a_peft_type():
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PeftType("SLICE") is PeftType.SLICE
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SLICE] is SliceConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SLICE] is slice_adapter.SliceModel
    assert SliceConfig(target_modules=["to_q"]).fraction == 0.001  # every field has a default
    assert SliceConfig(fraction=0.25).num_slices == 4


def test_peft_disable_adapter_context_and_delete_adapter(inputs):
    from peft import get_peft_model

    peft_model = get_peft_model(make_wan(), SliceConfig(fraction=0.2, slice_id=0, init_weights=False))
    peft_model.add_adapter("second", SliceConfig(fraction=0.2, slice_id=1, init_weights=False))
    with_slice = run(peft_model, inputs)
    with peft_model.disable_adapter():
        torch.testing.assert_close(run(peft_model, inputs), run(make_wan(), inputs), atol=0, rtol=0)
    torch.testing.assert_close(run(peft_model, inputs), with_slice, atol=0, rtol=0)
    peft_model.delete_adapter("second")
    assert not any(".second." in n for n, _ in peft_model.named_parameters())
    torch.testing.assert_close(run(peft_model, inputs), with_slice, atol=0, rtol=0)


def test_safe_merge_refuses_non_finite_values_and_touches_nothing():
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.2, slice_id=0, init_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items() if "slice_" not in k}
    with torch.no_grad():
        model.blocks[0].attn1.to_q.slice_values["default"]["weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.blocks[0].attn1.to_q.merge(safe_merge=True)
    after = {k: v for k, v in model.state_dict().items() if "slice_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.blocks[0].attn1.to_q.merged


def _sliced_linear(fraction, in_features=512, out_features=384, slice_id=3):
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    owner = torch.nn.Module()
    owner.blocks = torch.nn.ModuleList([torch.nn.Module()])
    owner.blocks[0].proj = torch.nn.Linear(in_features, out_features)
    inject_adapter_in_model(SliceConfig(fraction=fraction, slice_id=slice_id, init_weights=False), owner)
    return owner.blocks[0].proj


def _merged_dense(layer, in_features, out_features, dtype=torch.float32):
    dense = torch.nn.Linear(in_features, out_features).to(dtype)
    delta = layer.get_delta_weight("default")
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(dense, name).copy_(getattr(layer.base_layer, name).float() + delta.get(name, 0))
    return dense


# (in, out, fraction): few segments of the input hold a tile (the tiles' gradient gathers them; no bias element) /
# every one does
LAYOUTS = [(4096, 64, 0.004), (512, 384, 0.6)]


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("in_features,out_features,fraction", LAYOUTS, ids=["gathered", "every-segment"])
def test_slice_linear_is_the_merged_weight_bit_for_bit_and_leaves_the_base_intact(in_features, out_features,
                                                                                    fraction, autocast):
    """The Linear's matmul runs on the weight with the tiles written in: output and input gradient equal a plain
    Linear holding W + dW bit for bit (under bf16 autocast too: autocast casts the merged fp32 weight the same
    way), the tiles' gradients equal that Linear's weight gradient at the tiles, and W is restored exactly."""
    layer = _sliced_linear(fraction, in_features, out_features, slice_id=3 if fraction < 0.1 else 0)
    index = layer.slice_index["default"]["weight"].on("cpu")
    every = index["seg_ids"].numel() == layer.slice_index["default"]["weight"].layout.segments_per_row
    assert every == (fraction > 0.1)
    weight_before = layer.base_layer.weight.detach().clone()
    version = layer.base_layer.weight._version
    values = layer.slice_values["default"]
    x0 = torch.randn(2, 24, in_features)

    def run(module, params):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
        return out, torch.autograd.grad(out.float().square().sum(), [x, *params])

    names = list(values)  # "weight", and "bias" where the slice holds bias elements
    out, (gx, *grads) = run(layer, [values[n] for n in names])
    assert torch.equal(layer.base_layer.weight, weight_before)  # restored after forward and backward
    assert layer.base_layer.weight._version == version  # patched through .data: other users' saved W stays valid
    dense = _merged_dense(layer, in_features, out_features)
    ref, (rx, *dense_grads) = run(dense, [getattr(dense, n) for n in names])
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(out, ref) and torch.equal(gx, rx)
    assert (out != run(layer.base_layer, [])[0]).any()  # the slice changes the output (the test can fail)
    for name, got, dense_grad in zip(names, grads, dense_grads):
        view, key = layer._selected("default", name, dense_grad)
        expected = view[key]
        if autocast:  # bf16 products summed in another order than the dense weight gradient's: normwise
            assert (got.float() - expected.float()).norm() <= 2e-2 * expected.float().norm()
        else:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("own_forward", [False, True], ids=["merged-matmul", "own-forward"])
def test_a_banded_slice_keeps_one_band_of_the_input_for_its_gradient(own_forward):
    """What autograd keeps of x for the tiles' gradient: the band the tiles read (a copy of 1/8 of x's columns, or
    2/8 where the window crosses a band's end) for a banded slice, all of x for a scattered one, on both of the
    Linear's paths."""
    kept = {}
    for order in ("banded", "scattered"):
        torch.manual_seed(0)
        owner = torch.nn.Module()
        owner.blocks = torch.nn.ModuleList([torch.nn.Module()])
        owner.blocks[0].proj = torch.nn.Linear(4096, 64)
        from peft import inject_adapter_in_model

        inject_adapter_in_model(SliceConfig(fraction=0.03, slice_id=3, tile_order=order, init_weights=False), owner)
        layer = owner.blocks[0].proj
        if own_forward:
            base = layer.base_layer
            base.forward = lambda t, base=base: torch.nn.functional.linear(t, base.weight, base.bias)
        x = torch.randn(24, 4096)  # needs no gradient: what is kept is for the tiles' gradient alone
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = layer(x)
        kept[order] = max(sizes)
        out.square().sum().backward()
        assert layer.slice_values["default"]["weight"].grad.abs().sum() > 0
    assert kept["scattered"] == 24 * 4096  # 123 tiles over 64 segments: nearly every segment, so x itself
    assert kept["banded"] <= 24 * 4096 // 4  # one band of 8 segments (two where the window crosses a band's end)


@pytest.mark.parametrize("in_features,out_features,fraction", LAYOUTS, ids=["gathered", "every-segment"])
def test_base_layer_with_its_own_forward_gets_the_tiles_added_to_its_output(in_features, out_features, fraction):
    """A base layer that must be called as it is (here: an instance forward) takes the other path, the tiles added
    to its output; it computes the same function as the merged weight (float32 rounding apart)."""
    layer = _sliced_linear(fraction, in_features, out_features, slice_id=3 if fraction < 0.1 else 0)
    layer.base_layer.forward = lambda t: torch.nn.functional.linear(t, layer.base_layer.weight, layer.base_layer.bias)
    values = layer.slice_values["default"]
    names = list(values)
    x = torch.randn(2, 24, in_features, requires_grad=True)
    out = layer(x)
    gx, *grads = torch.autograd.grad(out.square().sum(), [x, *[values[n] for n in names]])
    dense = _merged_dense(layer, in_features, out_features)
    xr = x.detach().clone().requires_grad_(True)
    ref = dense(xr)
    rx, *dense_grads = torch.autograd.grad(ref.square().sum(), [xr, *[getattr(dense, n) for n in names]])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    for name, got, dense_grad in zip(names, grads, dense_grads):
        view, key = layer._selected("default", name, dense_grad)
        torch.testing.assert_close(got, view[key], atol=1e-4, rtol=1e-4)


def test_bf16_base_patched_in_place_under_autocast_is_restored_and_works_in_inference_mode():
    """A bf16 base under bf16 autocast: the cast is no copy, so the tiles are written into W itself and restored;
    in inference mode too, and when the forward raises."""
    layer = _sliced_linear(0.6, 512, 384, slice_id=0)
    layer.base_layer.to(torch.bfloat16)
    before = layer.base_layer.weight.detach().clone()
    dense = _merged_dense(layer, 512, 384, dtype=torch.bfloat16)
    x = torch.randn(3, 512)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), dense(x)
    assert torch.equal(out, ref)
    assert torch.equal(layer.base_layer.weight, before)
    with pytest.raises(RuntimeError):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(torch.randn(3, 7))  # wrong width: the matmul raises between patch and restore
    assert torch.equal(layer.base_layer.weight, before)
