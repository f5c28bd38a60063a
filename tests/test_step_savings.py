"""What a slice's training step leaves out, with the gradients unchanged:

- the first block's modulation slice gets its gradient from the q/k/v input columns it holds (modulation.py): the same
  gradients as the dense model, fewer matmul FLOPs, and the whole input gradient wherever anything upstream trains;
- the FFN's hidden activation is not kept a second time for the tiles' gradient: it is recomputed from gelu's input;
- nor are the inputs a block's norms feed (q/k/v, attn2's q, the FFN's input): recomputed from the norm's input;
- a compiled step keeps no patched copy of a sliced weight from forward to backward;
- a product of a sliced norm weight or modulation table with an activation keeps only the held columns of it.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import slice_adapter
from slice_adapter import SliceConfig
from slice_adapter.modulation import ModulationInputGrad

from conftest import TINY_WAN, make_wan, wan_inputs
from test_adapter import dense_weights_with_slices

TOKENS = 3 * 8 * 8 // 4  # wan_inputs' latents (F=3, H=W=8) in Wan's 1x2x2 patches
DIM = TINY_WAN["num_attention_heads"] * TINY_WAN["attention_head_dim"]


def loss_of(model, inputs):
    return model(**inputs, return_dict=False)[0].square().mean()


def slice_grads(model, inputs, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_of(model, inputs)
    loss.float().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def whole_input_gradients(monkeypatch):
    """Turn the column rule off: every q/k/v computes its whole input gradient (the path before modulation.py)."""
    monkeypatch.setattr(ModulationInputGrad, "enter", lambda self, args, param_slice: None)


def held_columns(model, adapter="default"):
    """Columns of the entries the slice holds in rows 0 and 1 (shift_msa, scale_msa) of block 0's table."""
    plan = slice_adapter.plan(make_wan(), model.peft_config[adapter])
    flat = torch.from_numpy(plan.flat_indices("blocks.0.scale_shift_table"))
    return torch.unique(flat[flat < 2 * DIM] % DIM)


def sliced_model(fraction=0.25, **config):
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=fraction, slice_id=1, init_weights=False, **config))
    return model


def dense_reference_grads(model, inputs, latents_grad=False):
    """Gradients of the model with dense W + dW, every parameter trainable: (by name, the latents' gradient)."""
    reference = make_wan()
    reference.load_state_dict(dense_weights_with_slices(model))
    reference.requires_grad_(True)
    latents = inputs["hidden_states"].clone().requires_grad_(latents_grad)
    loss_of(reference, dict(inputs, hidden_states=latents)).backward()
    return dict(reference.named_parameters()), latents.grad


def assert_slice_grads_equal_dense(model, ref_params, names=None):
    """Each slice value's gradient (of `names`, or of every one) equals the dense model's at its entries."""
    plan = slice_adapter.plan(make_wan(), model.peft_config["default"])
    values = {}
    for name, module in slice_adapter.model.slice_layers(model):
        owner = name.removesuffix(".sliced_params").replace(".base_layer", "")
        values.update({f"{owner}.{pname}": v for pname, v in module.slice_values["default"].items()})
    for full in names or values:
        at = torch.from_numpy(plan.flat_indices(full))
        expected = ref_params[full].grad.reshape(-1)[at]
        torch.testing.assert_close(values[full].grad.reshape(-1), expected, atol=1e-7, rtol=1e-4, msg=full)
    assert names or len(values) > 10


def test_every_slice_gradient_equals_the_dense_gradient_with_the_column_rule_on():
    inputs = wan_inputs()
    model = sliced_model()
    assert 0 < len(held_columns(model)) < DIM  # the rule has columns to skip and columns to keep
    slice_grads(model, inputs)
    ref_params, _ = dense_reference_grads(model, inputs)
    assert_slice_grads_equal_dense(model, ref_params)


def mm_flops(model, inputs):
    with FlopCounterMode(display=False) as counter:
        loss_of(model, inputs).backward()
    return counter.get_flop_counts()["Global"].get(torch.ops.aten.mm, 0)


def test_the_first_block_computes_only_the_held_input_gradient_columns_of_q_k_v(monkeypatch):
    inputs = wan_inputs()
    model = sliced_model()
    columns = len(held_columns(model))
    restricted = mm_flops(model, inputs)
    whole_input_gradients(monkeypatch)
    whole = mm_flops(sliced_model(), inputs)
    # three (tokens x dim) @ (dim x dim) input gradients became (tokens x dim) @ (dim x columns)
    assert whole - restricted == 3 * 2 * TOKENS * DIM * (DIM - columns)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_the_column_rule_gives_the_gradients_of_the_whole_input_gradient(autocast, monkeypatch):
    inputs = wan_inputs()
    restricted = slice_grads(sliced_model(), inputs, autocast)
    whole_input_gradients(monkeypatch)
    whole = slice_grads(sliced_model(), inputs, autocast)
    assert restricted.keys() == whole.keys()
    tol = dict(atol=1e-7, rtol=1e-5) if not autocast else dict(atol=1e-5, rtol=2e-2)
    for name in whole:
        torch.testing.assert_close(restricted[name], whole[name], **tol, msg=name)


def test_latents_that_carry_gradient_get_their_whole_gradient():
    inputs = wan_inputs()
    model = sliced_model()
    latents = inputs["hidden_states"].clone().requires_grad_(True)
    loss_of(model, dict(inputs, hidden_states=latents)).backward()
    ref_params, ref_latents_grad = dense_reference_grads(model, inputs, latents_grad=True)
    torch.testing.assert_close(latents.grad, ref_latents_grad, atol=1e-7, rtol=1e-4)
    assert_slice_grads_equal_dense(model, ref_params)


def test_a_trained_time_embedding_gets_its_whole_gradient_through_the_first_block():
    # the time embedding feeds shift/scale of every column: with its projection sliced, the rule must stay off
    inputs = wan_inputs()
    model = sliced_model(fraction=0.5, target_modules=["condition_embedder.time_proj", "blocks.0.scale_shift_table",
                                                       "blocks.0.attn1.to_q"])
    slice_grads(model, inputs)
    ref_params, _ = dense_reference_grads(model, inputs)
    assert_slice_grads_equal_dense(model, ref_params, ["condition_embedder.time_proj.weight",
                                                        "blocks.0.scale_shift_table", "blocks.0.attn1.to_q.weight"])


def test_the_columns_last_one_block_call_and_follow_the_active_adapters():
    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.25, slice_id=1), adapter_name="one")
    model.add_adapter(SliceConfig(fraction=0.25, slice_id=2), adapter_name="two")
    to_q = model.blocks[0].attn1.to_q
    seen, seen_in_block_1 = [], []
    to_q.register_forward_pre_hook(lambda module, args: seen.append(module.input_grad_columns))
    model.blocks[1].attn1.to_q.register_forward_pre_hook(
        lambda module, args: seen_in_block_1.append(module.input_grad_columns))
    model.set_adapter("one")
    loss_of(model, wan_inputs())
    model.set_adapter(["one", "two"])
    loss_of(model, wan_inputs())
    assert to_q.input_grad_columns is None  # reset when the block returns
    both = torch.unique(torch.cat([held_columns(model, "one"), held_columns(model, "two")]))
    assert torch.equal(seen[0], held_columns(model, "one"))
    assert torch.equal(seen[1], both)
    assert seen_in_block_1 == [None, None]  # block 1's input carries gradient: its q/k/v compute all of it


def test_a_block_with_its_own_forward_keeps_the_whole_input_gradient():
    from slice_adapter.modulation import modulation_input_grad

    block = make_wan().blocks[0]
    assert modulation_input_grad(block) is not None
    block.forward = lambda *args: args[0]
    assert modulation_input_grad(block) is None


NORM_FED = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "ffn.net.0.proj")


def slice_nodes(model, inputs, block, paths=NORM_FED):
    """{path: (the layer's input x, its _LinearWithSliceBackward node)} for one forward of `model`."""
    captured = {}
    handles = [model.blocks[block].get_submodule(p).register_forward_hook(
        lambda module, args, out, p=p: captured.update({p: (args[0], out)})) for p in paths]
    model(**inputs, return_dict=False)
    for h in handles:
        h.remove()
    nodes = {}
    for p, (x, out) in captured.items():
        node = out.grad_fn
        while type(node).__name__ != "_LinearWithSliceBackward":
            node = node.next_functions[0][0]
        nodes[p] = (x, node)
    return nodes


# -- the FFN's hidden activation: the tiles' gradient recomputes it from gelu's input ------------------------------
def ffn_out_node(model, inputs):
    """(the autograd node of blocks.1.ffn.net.2's slice matmul, the gelu node that feeds it)."""
    x, node = slice_nodes(model, inputs, block=1, paths=("ffn.net.2",))["ffn.net.2"]
    return node, x.grad_fn


def test_the_ffn_hidden_activation_is_not_kept_twice():
    model = sliced_model()
    model.train()
    node, gelu = ffn_out_node(model, wan_inputs())
    assert type(gelu).__name__ == "GeluBackward0"
    kept = node.saved_tensors[0]  # what the tiles' gradient reads x from
    assert kept.data_ptr() == gelu._saved_self.data_ptr()  # gelu's own input, which gelu's backward keeps anyway
    assert kept.shape == gelu._saved_self.shape


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_recomputing_the_ffn_hidden_activation_gives_the_same_gradients_bit_for_bit(autocast, monkeypatch):
    import slice_adapter.layer as layer

    inputs = wan_inputs()
    recomputed = slice_grads(sliced_model(), inputs, autocast)
    monkeypatch.setattr(layer, "gelu_input", lambda x: None)
    kept = slice_grads(sliced_model(), inputs, autocast)
    assert recomputed.keys() == kept.keys()
    for name in kept:
        assert torch.equal(recomputed[name], kept[name]), name


def test_under_saved_tensor_hooks_the_ffn_input_is_kept_as_it_is():
    # checkpointing and activation offloading decide what is kept: the layer must not unpack gelu's input there
    model = sliced_model()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        node, gelu = ffn_out_node(model, wan_inputs())
    assert node.saved_tensors[0].shape == (TOKENS, TINY_WAN["ffn_dim"])  # x itself, 2-D


# -- the inputs a block's norms feed: the tiles' gradient recomputes them from the norm's input -------------------
def layer_norm_input(x):
    """The input the LayerNorm's autograd node keeps, found from x's graph (`.type_as`, `+ shift`, `* (1 + scale)`)."""
    node = x.grad_fn
    while type(node).__name__ != "NativeLayerNormBackward0":
        node = node.next_functions[0][0]
    return node._saved_input


@pytest.mark.parametrize("target", [None, "linear-only"], ids=["default", "linear-only"])
def test_the_inputs_a_block_s_norms_feed_are_not_kept_a_second_time(target):
    config = {} if target is None else dict(target_modules=r"blocks\.\d+\.(attn1|attn2|ffn)\..*")
    model = sliced_model(**config)
    model.train()
    for path, (x, node) in slice_nodes(model, wan_inputs(), block=1).items():
        kept, h = node.saved_tensors[0], layer_norm_input(x)
        assert kept.data_ptr() == h.data_ptr() and kept.shape == h.shape, path  # the norm's own input, not x
        assert kept.data_ptr() != x.data_ptr(), path


def test_where_the_first_block_s_input_carries_no_gradient_its_q_k_v_keep_their_input():
    # nothing before block 0 trains: its norm1 has no node that keeps its input, so x itself is kept
    model = sliced_model(target_modules=r"blocks\.\d+\.(attn1|attn2|ffn)\..*")
    nodes = slice_nodes(model, wan_inputs(), block=0)
    for path in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
        x, node = nodes[path]
        assert node.saved_tensors[0].data_ptr() == x.data_ptr(), path
    x, node = nodes["ffn.net.0.proj"]  # norm3's input is the residual after attention: it carries gradient
    assert node.saved_tensors[0].data_ptr() == layer_norm_input(x).data_ptr()


@pytest.mark.parametrize("case", ["float32", "bf16-autocast", "bf16-weights"])
def test_recomputing_the_norm_fed_inputs_gives_the_same_gradients_bit_for_bit(case, monkeypatch):
    import slice_adapter.layer as layer

    dtype = torch.bfloat16 if case == "bf16-weights" else torch.float32
    inputs = wan_inputs(dtype=dtype)

    def grads():
        model = make_wan(dtype=dtype)
        model.add_adapter(SliceConfig(fraction=0.25, slice_id=1, init_weights=False))
        if dtype != torch.float32:  # the base stays bf16; the slice's values train in float32
            slice_adapter.model.cast_slice_values(model, "default", True)
        return slice_grads(model, inputs, autocast=case == "bf16-autocast"), model

    recomputed, model = grads()
    checked = [ok for _, layer in slice_adapter.model.slice_layers(model)
               for ok in getattr(layer, "_norm_input_checked", {}).values()]
    assert len(checked) == 7 and all(checked)  # block 0: attn2's q and the FFN; block 1: all five
    monkeypatch.setattr(layer, "norm_input", lambda x, site, checked: None)
    kept, _ = grads()
    assert recomputed.keys() == kept.keys() and len(kept) > 10
    for name in kept:
        assert torch.equal(recomputed[name], kept[name]), name


def test_a_norm_input_that_does_not_recompute_exactly_is_kept_and_logged(monkeypatch, caplog):
    import slice_adapter.recompute as recompute

    monkeypatch.setattr(recompute, "_eps_of", lambda norm: 0.5)  # not the eps the block's norms use
    model = sliced_model()
    with caplog.at_level("WARNING", logger="slice_adapter.recompute"):
        nodes = slice_nodes(model, wan_inputs(), block=1)
    for path, (x, node) in nodes.items():
        assert node.saved_tensors[0].data_ptr() == x.data_ptr(), path
    assert "not what diffusers' WanTransformerBlock.forward computes" in caplog.text
    inputs = wan_inputs()
    slice_grads(model, inputs)
    assert_slice_grads_equal_dense(model, dense_reference_grads(model, inputs)[0])


def test_under_saved_tensor_hooks_the_norm_fed_inputs_are_kept_as_they_are():
    model = sliced_model()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        nodes = slice_nodes(model, wan_inputs(), block=1)
    for path, (x, node) in nodes.items():
        assert node.saved_tensors[0].shape == x.reshape(-1, x.shape[-1]).shape, path
        assert node.saved_tensors[0].data_ptr() == x.data_ptr(), path


def test_the_block_hooks_set_the_norm_input_for_one_call_only_and_not_for_per_token_modulation():
    from slice_adapter.recompute import _enter_block, _leave_block

    model = sliced_model()
    block = model.blocks[0]
    to_q = block.attn1.to_q
    assert to_q.norm_input is None
    _enter_block(block, (None, None, torch.zeros(1, 6, DIM), None), {})
    assert to_q.norm_input is not None and to_q.norm_input.rows == (0, 1)
    assert block.attn2.to_q.norm_input.rows is None and block.ffn.net[0].proj.norm_input.rows == (3, 4)
    _leave_block(block, (), {}, None)
    assert to_q.norm_input is None
    _enter_block(block, (None, None, torch.zeros(1, TOKENS, 6, DIM), None), {})  # Wan 2.2 TI2V: tokens wide
    assert to_q.norm_input is None


def test_unloading_the_slice_removes_the_block_hooks():
    from peft.tuners.tuners_utils import BaseTuner

    from slice_adapter.model import SliceModel
    from slice_adapter.recompute import _enter_block

    model = make_wan()
    tuner = SliceModel(model, SliceConfig(fraction=0.25), "default")
    assert isinstance(tuner, BaseTuner)
    assert all(_enter_block in b._forward_pre_hooks.values() for b in model.blocks)
    assert all(b.ffn._forward_hooks and b.ffn.net[0].proj._forward_hooks for b in model.blocks)  # install_ffn_hooks
    tuner.unload()
    assert not any(_enter_block in b._forward_pre_hooks.values() or b._forward_hooks for b in model.blocks)
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks or "ffn_hidden" in module.__dict__), module
    model(**wan_inputs())  # the model runs as it did before the slice


# -- torch.compile: the compiled step keeps no copy of a sliced weight nor of a sliced Linear's input ----------------
class GeluBlock(torch.nn.Module):  # four Linears of one width, as a block's attention holds
    names = ("to_q", "to_k", "to_v", "to_out")

    def __init__(self):
        super().__init__()
        self.linears = torch.nn.ModuleDict({n: torch.nn.Linear(256, 256) for n in self.names})

    def forward(self, x):
        for n in self.names:
            x = torch.nn.functional.gelu(self.linears[n](x))
        return x


class GeluStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([GeluBlock()])

    def forward(self, x):
        return self.blocks[0](x)


def test_a_compiled_step_keeps_no_patched_weight_copy_nor_inputs_and_gives_eager_gradients():
    import sys
    from pathlib import Path

    from peft import inject_adapter_in_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import tensor_peak_mb

    from slice_ft.compile import compile_blocks

    def run(model, x, compiled):
        if compiled:
            compile_blocks(model)  # what --compile does
        x = x.clone().requires_grad_(True)

        def step():
            model(x).square().sum().backward()

        for _ in range(2):
            step()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        grads["input"] = x.grad.clone()
        for p in [*model.parameters(), x]:
            p.grad = None
        return grads, tensor_peak_mb(step)

    x = torch.randn(1024, 256)  # activations (1 MiB) outweigh a weight (0.25 MiB)
    peaks, grads = {}, {}
    for name in ("frozen", "slice"):
        for compiled in (False, True):
            torch.manual_seed(0)
            model = GeluStack().requires_grad_(False)
            if name == "slice":
                model = inject_adapter_in_model(SliceConfig(fraction=0.01, init_weights=False), model)
            grads[name, compiled], peaks[name, compiled] = run(model, x, compiled)
    weight_mb, activation_mb = 256 * 256 * 4 / 2**20, x.numel() * 4 / 2**20
    # no patched copy of a weight kept until backward, and gelu's outputs (the Linears' inputs, which the tiles'
    # gradient reads) recomputed in backward one at a time rather than kept: three would be 3 MiB
    assert peaks["slice", True] - peaks["frozen", True] < 1.5 * activation_mb + weight_mb, peaks
    assert grads["slice", True].keys() == grads["slice", False].keys()
    for key in grads["slice", False]:
        torch.testing.assert_close(grads["slice", True][key], grads["slice", False][key], atol=1e-5, rtol=1e-4)


def test_a_compiled_slice_under_autocast_and_without_grad_computes_what_eager_does():
    from peft import inject_adapter_in_model

    from slice_ft.compile import compile_blocks

    def sliced():
        torch.manual_seed(0)
        return inject_adapter_in_model(SliceConfig(fraction=0.01, init_weights=False),
                                       GeluStack().requires_grad_(False))

    x = torch.randn(128, 256)
    eager, compiled = sliced(), sliced()
    compile_blocks(compiled)
    results = []
    for model in (eager, compiled):
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the weight is cast: the ops patch their own copy
            out = model(xg)
        out.float().square().sum().backward()
        with torch.no_grad():
            plain = model(x)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.float(), xg.grad, grads, plain))
    (out_e, gx_e, grads_e, plain_e), (out_c, gx_c, grads_c, plain_c) = results
    torch.testing.assert_close(plain_c, plain_e, atol=1e-5, rtol=1e-4)  # inference: the op on the fp32 weight
    torch.testing.assert_close(out_c, out_e, atol=2e-2, rtol=2e-2)  # bf16: fused gelu rounds differently
    torch.testing.assert_close(gx_c, gx_e, atol=2e-2, rtol=5e-2)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=2e-2, rtol=5e-2, msg=name)
    torch.manual_seed(0)
    reference = GeluStack()  # the base weights before the slice: every patch was undone
    for model in (eager, compiled):
        for n in GeluBlock.names:
            assert torch.equal(model.blocks[0].linears[n].base_layer.weight, reference.blocks[0].linears[n].weight)


# -- the FFN's hidden activation, made again for the tiles' gradient, a chunk of tokens at a time -------------------
WIDE_FFN = 512  # 16x the tiny block's width, so one hidden activation outweighs the rest of a block's transients


def wide_ffn_step(method, compiled, latent_hw=64):
    """(one training step of a one-block tiny Wan with a wide FFN, the bytes of its FFN's hidden activation in MiB):
    "frozen" (input gradients only), "slice" (every block parameter) or "Linear-only"."""
    from slice_ft.compile import compile_blocks

    model = make_wan(num_layers=1, ffn_dim=WIDE_FFN).train().requires_grad_(False)
    if method != "frozen":
        targets = None if method == "slice" else [n for n, m in model.blocks[0].named_modules()
                                                  if isinstance(m, torch.nn.Linear)]
        model.add_adapter(SliceConfig(fraction=0.01, init_weights=False, target_modules=targets))
    if compiled:
        compile_blocks(model)  # what --compile does
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 1, latent_hw, latent_hw, generator=g).requires_grad_(method == "frozen")
    text = torch.randn(1, 8, 32, generator=g)

    def step():
        model(latents, torch.tensor([500]), text, return_dict=False)[0].square().sum().backward()

    tokens = latent_hw * latent_hw // 4
    return model, step, tokens * WIDE_FFN * 4 / 2**20


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_ffn_hidden_activation_is_made_again_a_chunk_of_tokens_at_a_time(compiled):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import tensor_peak_mb

    peaks = {}
    for method in ("frozen", "slice", "Linear-only"):
        model, step, hidden_mb = wide_ffn_step(method, compiled)
        step()  # kernels built
        peaks[method] = tensor_peak_mb(step)
    # whole, the hidden activation made again was a transient the frozen base never holds: +0.33 (eager) and +1.1
    # (compiled: inductor also kept gelu's input until the tiles' matmuls it scheduled last) hidden activations
    for method in ("slice", "Linear-only"):
        assert peaks[method] - peaks["frozen"] < 0.25 * hidden_mb, (peaks, hidden_mb)


def test_a_compiled_wide_ffn_slice_gives_eager_gradients_and_keeps_no_hidden_activation_after_a_call():
    grads = {}
    for compiled in (False, True):
        model, step, _ = wide_ffn_step("slice", compiled, latent_hw=16)
        step()
        grads[compiled] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        ffn = model.blocks[0].ffn
        assert ffn.ffn_hidden is ffn.net[2].ffn_hidden is ffn.net[0].proj.ffn_hidden  # install_ffn_hooks
        assert ffn.ffn_hidden.h is None  # handed over within the call, then dropped
        model.disable_adapters()  # net.2 calls its base layer and does not take h: it is dropped all the same
        model(torch.randn(1, 4, 1, 16, 16), torch.tensor([500]), torch.randn(1, 8, 32), return_dict=False)
        model.enable_adapters()
        assert ffn.ffn_hidden.h is None
    assert grads[True].keys() == grads[False].keys() and any("ffn.net.2" in n for n in grads[False])
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-5, rtol=1e-4, msg=name)


def test_only_a_feed_forward_of_gelu_dropout_0_and_a_sliced_linear_is_hooked():
    from slice_adapter.recompute import install_ffn_hooks

    model = sliced_model()
    assert install_ffn_hooks(model) == len(model.blocks)  # idempotent: the hooks of injection are kept, not doubled
    assert all(len(b.ffn.net[0].proj._forward_hooks) == 1 for b in model.blocks)
    model = make_wan()
    for block in model.blocks:
        block.ffn.net[1].p = 0.1  # training would drop entries: net.2's input is not gelu(h) then
    model.add_adapter(SliceConfig(fraction=0.25))
    assert install_ffn_hooks(model) == 0 and not model.blocks[0].ffn._forward_hooks
    assert install_ffn_hooks(make_wan()) == 0  # no slice: nothing to hand over


def test_a_later_adapter_that_wraps_net_0_proj_gets_the_hook_on_its_wrapper():
    from slice_adapter.recompute import _keep_ffn_hidden

    model = make_wan()
    model.add_adapter(SliceConfig(fraction=0.25, target_modules=["ffn.net.2"]), adapter_name="a")
    proj = model.blocks[0].ffn.net[0].proj
    assert type(proj) is torch.nn.Linear and _keep_ffn_hidden in proj._forward_hooks.values()
    model.add_adapter(SliceConfig(fraction=0.25, slice_id=1), adapter_name="b")  # wraps net.0.proj now
    wrapper = model.blocks[0].ffn.net[0].proj
    assert wrapper is not proj and wrapper.base_layer is proj
    assert _keep_ffn_hidden in wrapper._forward_hooks.values()  # the module the FFN calls
    assert wrapper.ffn_hidden is model.blocks[0].ffn.ffn_hidden is model.blocks[0].ffn.net[2].ffn_hidden


# -- products with a sliced norm weight or modulation table keep the held columns of the activation only ------------
def norm1_outputs_alive(model, inputs):
    """Run a forward and say, per block, whether its norm1 output (which `* (1 + scale_msa)` reads) is still kept."""
    import weakref

    refs = []
    hooks = [block.norm1.register_forward_hook(lambda module, args, out: refs.append(weakref.ref(out)))
             for block in model.blocks]
    loss = loss_of(model, inputs)
    for hook in hooks:
        hook.remove()
    return loss, [ref() is not None for ref in refs]


def record_products(monkeypatch):
    """Collect (node, kept name, parameter name) of every product `saved_columns` shrinks."""
    from slice_adapter import saved_columns

    found, products_of = [], saved_columns._products_of
    monkeypatch.setattr(saved_columns, "_products_of", lambda *a: [found.append(p) or p for p in products_of(*a)])
    return found


def test_the_modulation_and_norm_products_keep_only_the_held_columns(monkeypatch):
    found = record_products(monkeypatch)
    model = sliced_model(fraction=0.02)
    loss, alive = norm1_outputs_alive(model, wan_inputs())
    assert alive == [False, False]  # autograd no longer holds the whole norm1 output of either block
    tables = [(node, kept) for node, kept, name in found if name == "scale_shift_table"]
    assert len(tables) == 4 * len(model.blocks)  # scale_msa, gate_msa, c_scale_msa, c_gate_msa of every block
    assert any(name == "weight" for _, _, name in found)  # the q/k RMSNorm weights
    node, kept = tables[-1]  # the last block's
    activation = getattr(node, kept.replace("_raw", ""))  # unpacked as backward will see it
    table_index = model.blocks[-1].sliced_params.slice_index["default"]["scale_shift_table"]
    held = torch.unique(table_index.on("cpu")["flat"] % DIM)
    outside = torch.ones(DIM, dtype=torch.bool)
    outside[held] = False
    assert 0 < len(held) < DIM
    assert activation.shape[-1] == DIM and activation[..., outside].abs().sum() == 0
    assert activation[..., held].abs().sum() > 0
    loss.backward()


@pytest.mark.parametrize("case", ["float32", "bf16-autocast", "per-token-timestep"])
def test_keeping_held_columns_gives_the_same_gradients_bit_for_bit(case, monkeypatch):
    import slice_adapter.layer as layer

    inputs = wan_inputs()
    if case == "per-token-timestep":  # Wan 2.2 TI2V: a timestep per token, a 4-D time embedding
        inputs["timestep"] = torch.arange(TOKENS).unsqueeze(0) * 10
    found = record_products(monkeypatch)
    kept_columns = slice_grads(sliced_model(fraction=0.02), inputs, case == "bf16-autocast")
    assert sum(name == "scale_shift_table" for _, _, name in found) == 4 * TINY_WAN["num_layers"]
    monkeypatch.setattr(layer, "keep_held_columns", lambda *args: 0)
    kept_whole = slice_grads(sliced_model(fraction=0.02), inputs, case == "bf16-autocast")
    assert kept_columns.keys() == kept_whole.keys()
    for name in kept_whole:
        assert torch.equal(kept_columns[name], kept_whole[name]), name


def test_a_trained_time_embedding_keeps_the_modulation_products_whole(monkeypatch):
    # scale_msa's gradient then also reaches the time embedding, for every column: nothing may be dropped
    found = record_products(monkeypatch)
    model = sliced_model(fraction=0.5, target_modules=["condition_embedder.time_proj", "scale_shift_table"])
    _, alive = norm1_outputs_alive(model, wan_inputs())
    assert alive == [True, True]
    assert not [name for _, _, name in found if name == "scale_shift_table"]


def test_under_saved_tensor_hooks_the_products_are_kept_as_the_hooks_decide(monkeypatch):
    found = record_products(monkeypatch)
    model = sliced_model(fraction=0.02)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        _, alive = norm1_outputs_alive(model, wan_inputs())
    assert found == [] and alive == [True, True]


def test_held_columns_are_none_for_row_tiles_and_table_columns_for_a_table():
    from slice_adapter.saved_columns import held_columns as held

    model = sliced_model(fraction=0.02)
    to_q = model.blocks[0].attn1.to_q
    assert held(to_q, "weight", DIM, torch.device("cpu")) is None  # row tiles: matmul products, not this rule's
    table = held(model.blocks[0].sliced_params, "scale_shift_table", DIM, torch.device("cpu"))
    assert table is not None and table.dtype == torch.long and bool((table < DIM).all())


def test_a_compiled_block_with_sliced_norms_and_modulation_traces_as_one_graph():
    # the held-columns rule is eager-only: inside a compiled block it must not split the graph
    from slice_ft.compile import compile_blocks

    model = sliced_model(fraction=0.02)
    compile_blocks(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    grads = slice_grads(model, wan_inputs())
    eager = slice_grads(sliced_model(fraction=0.02), wan_inputs())
    assert grads.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(grads[name], eager[name], atol=1e-6, rtol=1e-4, msg=name)
