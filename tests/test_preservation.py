"""Self-generated preservation (slice_ft.preservation): the frozen-model switch, generation, the loss, the cache."""

import pytest
import torch

from slice_ft import flow_matching as fm
from slice_ft.preservation import (
    PreservationSet,
    generate_preservation_latents,
    load_preservation_set,
    preservation_fingerprint,
    preservation_loss,
    save_preservation_set,
    slices_disabled,
)
from tests.conftest import make_wan, wan_inputs

SHAPE = (4, 2, 4, 4)  # (C, F, H, W) latents of the tiny Wan
GEN = dict(num_inference_steps=3, seed=7, progress=False)


def with_slice(values: str = "zero", fraction: float = 0.25):
    from slice_adapter import SliceConfig

    model = make_wan()
    model.add_adapter(SliceConfig(fraction=fraction, slice_id=1))
    if values == "random":
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def slice_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "slice_values" in n}


def out(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def embeds(n=3, seed=0):
    return torch.randn(n, 8, 32, generator=torch.Generator().manual_seed(seed))


def test_slices_disabled_is_the_base_model_and_restores_the_slice():
    model, base, inputs = with_slice("random"), make_wan(), wan_inputs()
    with_slice_out = out(model, inputs)
    assert not torch.allclose(with_slice_out, out(base, inputs))
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with slices_disabled(model) as frozen:
        assert frozen is model
        torch.testing.assert_close(out(model, inputs), out(base, inputs), rtol=0, atol=0)
    assert torch.equal(out(model, inputs), with_slice_out)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert any(grads.values())


def test_slices_disabled_restores_state_when_the_body_raises():
    model, inputs = with_slice("random"), wan_inputs()
    before = out(model, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with slices_disabled(model):
            raise RuntimeError("boom")
    assert torch.equal(out(model, inputs), before)
    assert all(p.requires_grad for n, p in model.named_parameters() if "slice_values" in n)


def test_slices_disabled_keeps_a_frozen_or_already_disabled_adapter_as_it_was():
    model = with_slice("random")
    for n, p in model.named_parameters():
        if "slice_values" in n:
            p.requires_grad_(False)  # e.g. a slice loaded for inference
    with slices_disabled(model):
        pass
    assert not any(p.requires_grad for p in model.parameters())
    model.disable_adapters()
    with slices_disabled(model):
        pass
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert all(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_slices_disabled_also_switches_off_a_lora():
    import peft

    model, base, inputs = make_wan(), make_wan(), wan_inputs()
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    assert not torch.allclose(out(model, inputs), out(base, inputs))
    with slices_disabled(model):
        torch.testing.assert_close(out(model, inputs), out(base, inputs), rtol=0, atol=0)


def test_slices_disabled_refuses_merged_slices():
    import slice_adapter

    model = with_slice("random")
    slice_adapter.merge_adapters(model)
    with pytest.raises(ValueError, match="merged"):
        with slices_disabled(model):
            pass


def test_generation_is_deterministic_by_the_frozen_model_and_leaves_the_slice_alone():
    model, prompts = with_slice("random"), embeds()
    model.train()
    values, grads = slice_values(model), {n: p.requires_grad for n, p in model.named_parameters()}
    first = generate_preservation_latents(model, prompts, SHAPE, num_samples=4, batch_size=2, **GEN)
    assert first.shape == (4, *SHAPE) and first.dtype == torch.float32 and torch.isfinite(first).all()
    assert torch.equal(first, generate_preservation_latents(model, prompts, SHAPE, num_samples=4, batch_size=2, **GEN))
    assert all(torch.equal(v, slice_values(model)[n]) for n, v in values.items())
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == grads
    # the frozen model is the base: a model without the slice draws the same clips
    base = generate_preservation_latents(make_wan(), prompts, SHAPE, num_samples=4, batch_size=2, **GEN)
    torch.testing.assert_close(first, base, rtol=0, atol=0)
    # another seed, other clips; another batch size or a share of the ids, the same clips
    assert not torch.allclose(first, generate_preservation_latents(model, prompts, SHAPE, num_samples=4,
                                                                   batch_size=2, num_inference_steps=3, seed=8,
                                                                   progress=False))
    torch.testing.assert_close(first, generate_preservation_latents(model, prompts, SHAPE, num_samples=4,
                                                                    batch_size=3, **GEN), rtol=1e-4, atol=1e-5)
    share = generate_preservation_latents(model, prompts, SHAPE, num_samples=4, batch_size=2, sample_ids=[1, 3], **GEN)
    torch.testing.assert_close(share, first[[1, 3]], rtol=0, atol=0)


def test_generation_cycles_the_prompts():
    model, prompts = make_wan(), embeds(2)
    both = generate_preservation_latents(model, prompts, SHAPE, num_samples=3, batch_size=1, **GEN)
    # sample 2 is drawn for prompt 0 again: the same clip as if prompt 0 were the only one (same sample id)
    only_first = generate_preservation_latents(model, prompts[:1], SHAPE, num_samples=3, batch_size=1, **GEN)
    torch.testing.assert_close(both[[0, 2]], only_first[[0, 2]], rtol=0, atol=0)
    assert not torch.allclose(both[1], only_first[1])


def batch(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, *SHAPE, generator=g)
    return dict(latents=latents, prompt_embeds=embeds(n, seed), noise=torch.randn(latents.shape, generator=g),
                sigmas=torch.rand(n, generator=g).clamp(0.05, 1.0))


def test_distill_loss_is_zero_while_the_slice_is_zero():
    model, b = with_slice("zero"), batch()
    loss = preservation_loss(model, b["latents"], b["prompt_embeds"], sigmas=b["sigmas"], noise=b["noise"])
    assert loss.item() == 0.0


def test_distill_loss_is_positive_with_gradients_only_on_slice_values():
    model, b = with_slice("random"), batch()
    loss = preservation_loss(model, b["latents"], b["prompt_embeds"], sigmas=b["sigmas"], noise=b["noise"],
                             mode="distill")
    assert loss.item() > 0 and loss.dtype == torch.float32
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("slice_values" in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)
    # the teacher is the base model: the loss is the MSE against its prediction
    noisy = fm.noisy_latents(b["latents"], b["noise"], b["sigmas"])
    inputs = dict(hidden_states=noisy, timestep=fm.sigma_to_timestep(b["sigmas"]),
                  encoder_hidden_states=b["prompt_embeds"])
    expected = fm.flow_matching_loss(out(model, inputs), out(make_wan(), inputs))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)


def test_flow_mode_is_the_flow_matching_loss_on_the_clips():
    model, b = with_slice("random"), batch()
    loss = preservation_loss(model, b["latents"], b["prompt_embeds"], sigmas=b["sigmas"], noise=b["noise"],
                             mode="flow", weighting_scheme="cosmap")
    noisy = fm.noisy_latents(b["latents"], b["noise"], b["sigmas"])
    pred = out(model, dict(hidden_states=noisy, timestep=fm.sigma_to_timestep(b["sigmas"]),
                           encoder_hidden_states=b["prompt_embeds"]))
    expected = fm.flow_matching_loss(pred, fm.flow_target(b["latents"], b["noise"]),
                                     fm.loss_weights(b["sigmas"], "cosmap"))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), "num_samples must be a positive int"),
        (dict(prompt_embeds=torch.zeros(0, 8, 32)), "encode at least one prompt"),
        (dict(prompt_embeds=torch.zeros(2, 8, 16)), "text_dim is 32"),
        (dict(latent_shape=(16, 2, 4, 4)), "takes 4"),
        (dict(latent_shape=(4, 2, 4)), "four positive ints"),
        (dict(latent_shape=(4, 2, 3, 4)), "divisible by the patch size"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(shift=0.0), "shift must be > 0"),
        (dict(sample_ids=[4]), r"sample_ids must lie in \[0, 4\)"),
    ],
)
def test_generation_rejects_bad_input(kwargs, match):
    args = dict(prompt_embeds=embeds(), latent_shape=SHAPE, num_samples=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_preservation_latents(make_wan(), args.pop("prompt_embeds"), args.pop("latent_shape"), **args, **GEN)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(mode="kl"), "mode 'kl' is unknown"),
        (dict(noise=torch.zeros(3, *SHAPE[:-1], 2)), "noise shape"),
        (dict(prompt_embeds=embeds(2)), "latents' batch 3"),
        (dict(sigmas=torch.ones(2)), "one per clip"),
        (dict(latents=torch.zeros(3, 4, 4, 4)), "latents must be"),
    ],
)
def test_loss_rejects_bad_input(change, match):
    args = dict(batch(), mode="distill")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        preservation_loss(with_slice(), args.pop("latents"), args.pop("prompt_embeds"), **args)


def test_distill_without_a_slice_is_refused():
    b = batch()
    with pytest.raises(ValueError, match="mode='flow'"):
        preservation_loss(make_wan(), b["latents"], b["prompt_embeds"], sigmas=b["sigmas"], noise=b["noise"])


def test_cached_set_round_trips_and_a_changed_fingerprint_regenerates(tmp_path):
    pset = PreservationSet(torch.randn(3, *SHAPE), embeds(2))
    key = preservation_fingerprint(base="abc", prompts=["sks_a cat"], samples=3, steps=20)
    assert key != preservation_fingerprint(base="abc", prompts=["sks_a cat"], samples=4, steps=20)
    path = save_preservation_set(tmp_path / "cache" / "preserve.safetensors", pset, key)
    assert sorted(p.name for p in path.parent.iterdir()) == ["preserve.safetensors"]  # no temp file left
    loaded = load_preservation_set(path, key)
    assert torch.equal(loaded.latents, pset.latents) and torch.equal(loaded.prompt_embeds, pset.prompt_embeds)
    assert torch.equal(loaded.embeds_for([2, 1]), pset.prompt_embeds[[0, 1]])
    lines = []
    assert load_preservation_set(path, "other", log=lines.append) is None
    assert len(lines) == 1 and "regenerating" in lines[0]
    assert load_preservation_set(tmp_path / "missing.safetensors", key) is None
    path.write_bytes(b"not safetensors")
    assert load_preservation_set(path, key, log=lines.append) is None and "unreadable" in lines[-1]
