import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3

from slice_ft.flow_matching import (
    expert_for_timestep,
    expert_timestep_range,
    flow_matching_loss,
    flow_target,
    loss_weights,
    noisy_latents,
    sample_sigmas,
    shift_sigma,
    sigma_to_timestep,
)

N = 20000  # samples for distribution checks; quantile standard error ~0.004


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- shift -----------------------------------------------------------------------------------------------------


def test_shift_sigma_exact_values():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # 3*0.25/(1+2*0.25) = 0.5, 3*0.5/(1+2*0.5) = 0.75: dyadic, so exact.
    assert torch.equal(shift_sigma(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_sigma(s, 1.0), s)
    assert shift_sigma(0.5, 5.0) == 2.5 / 3.0


def test_shift_sigma_matches_diffusers_scheduler():
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    torch.testing.assert_close(shift_sigma(plain.sigmas, 5.0), shifted.sigmas, rtol=0, atol=1e-6)


def test_shift_sigma_rejects_non_positive():
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_sigma(torch.tensor(0.5), 0.0)


# --- interpolation / target ---------------------------------------------------------------------------------------


def test_noisy_latents_and_target_exact():
    x0 = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    eps = torch.tensor([[3.0, 2.0], [-4.0, 1.5]])
    sigma = torch.tensor([0.25, 0.5])
    xt = noisy_latents(x0, eps, sigma)
    # row 0: 0.75*x0 + 0.25*eps; row 1: 0.5*x0 + 0.5*eps (all dyadic => exact)
    assert torch.equal(xt, torch.tensor([[1.5, -1.0], [0.0, 1.0]]))
    assert torch.equal(flow_target(x0, eps), torch.tensor([[2.0, 4.0], [-8.0, 1.0]]))
    # endpoints: sigma=0 is data, sigma=1 is noise
    assert torch.equal(noisy_latents(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(noisy_latents(x0, eps, torch.ones(2)), eps)
    # target is the exact derivative of x_t in sigma
    d = (noisy_latents(x0, eps, torch.full((2,), 0.75)) - noisy_latents(x0, eps, torch.full((2,), 0.25))) / 0.5
    assert torch.equal(d, flow_target(x0, eps))


def test_noisy_latents_broadcasts_per_sample_over_video_dims_and_keeps_dtype():
    x0 = torch.randn(3, 4, 2, 5, 6, generator=_gen(1)).bfloat16()
    eps = torch.randn(3, 4, 2, 5, 6, generator=_gen(2)).bfloat16()
    sigma = torch.tensor([0.1, 0.5, 0.9])
    xt = noisy_latents(x0, eps, sigma)
    assert xt.dtype == torch.bfloat16 and xt.shape == x0.shape
    ref = ((1 - sigma.view(3, 1, 1, 1, 1)) * x0.float() + sigma.view(3, 1, 1, 1, 1) * eps.float()).bfloat16()
    assert torch.equal(xt, ref)
    assert flow_target(x0, eps).dtype == torch.float32
    with pytest.raises(ValueError, match="one sigma per sample"):
        noisy_latents(x0, eps, torch.tensor([0.5, 0.5]))


def test_interpolation_matches_diffusers_scheduler_and_euler_step_follows_target():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    x0 = torch.randn(2, 4, 2, 3, 3, generator=_gen(3))
    eps = torch.randn(2, 4, 2, 3, 3, generator=_gen(4))
    idx = [10, 600]
    sigma, timestep = sched.sigmas[idx], sched.timesteps[idx]
    assert torch.equal(sigma_to_timestep(sigma), timestep)
    ours = noisy_latents(x0, eps, sigma)
    for b in range(2):
        ref = sched.scale_noise(x0[b : b + 1], timestep[b : b + 1], eps[b : b + 1])
        torch.testing.assert_close(ours[b : b + 1], ref, rtol=0, atol=1e-6)

    # One Euler step of the inference scheduler with the true velocity lands on x at the next sigma.
    sched.set_timesteps(10)
    i = 3
    s, s_next = sched.sigmas[i], sched.sigmas[i + 1]
    xt = noisy_latents(x0, eps, s)
    stepped = sched.step(flow_target(x0, eps), sched.timesteps[i], xt, return_dict=False)[0]
    torch.testing.assert_close(stepped, noisy_latents(x0, eps, s_next), rtol=0, atol=1e-5)


# --- sampling --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["uniform", "sigmoid", "shift", "logit_normal"])
def test_sampler_range_dtype_and_determinism(method):
    a = sample_sigmas(N, method=method, shift=3.0, generator=_gen(0))
    b = sample_sigmas(N, method=method, shift=3.0, generator=_gen(0))
    assert a.shape == (N,) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert bool((a > 0).all()) and bool((a <= 1).all())
    assert not torch.equal(a, sample_sigmas(N, method=method, shift=3.0, generator=_gen(1)))


def test_sampler_distributions():
    q = lambda x, p: torch.quantile(x, p).item()  # noqa: E731
    u = sample_sigmas(N, method="uniform", shift=3.0, generator=_gen(0))  # shift ignored, as musubi
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(q(u, 0.1) - 0.1) < 0.01
    sg = sample_sigmas(N, method="sigmoid", shift=3.0, sigmoid_scale=2.0, generator=_gen(0))
    # sigmoid(2*N(0,1)): quantile p is sigmoid(2*Phi^-1(p)); Phi^-1(0.8413) = 1
    assert abs(q(sg, 0.5) - 0.5) < 0.01 and abs(q(sg, 0.8413) - 1 / (1 + math.exp(-2))) < 0.01
    sh = sample_sigmas(N, method="shift", shift=3.0, generator=_gen(0))
    assert abs(q(sh, 0.5) - 0.75) < 0.01  # shift(0.5, 3)
    assert torch.allclose(sh, shift_sigma(sample_sigmas(N, method="sigmoid", shift=1.0, generator=_gen(0)), 3.0))
    ln = sample_sigmas(N, method="logit_normal", shift=1.0, logit_mean=1.0, logit_std=0.5, generator=_gen(0))
    # paper sign: positive logit_mean leans towards noise; median sigmoid(1)
    assert abs(q(ln, 0.5) - 1 / (1 + math.exp(-1))) < 0.01
    ln3 = sample_sigmas(N, method="logit_normal", shift=3.0, generator=_gen(0))
    assert abs(q(ln3, 0.5) - 0.75) < 0.01


@pytest.mark.parametrize("method", ["uniform", "sigmoid", "shift", "logit_normal"])
@pytest.mark.parametrize("preserve", [False, True])
def test_sampler_respects_min_max_timestep(method, preserve):
    s = sample_sigmas(
        4000, method=method, shift=3.0, min_timestep=200, max_timestep=400,
        preserve_distribution_shape=preserve, generator=_gen(5),
    )
    t = sigma_to_timestep(s)
    assert bool((s >= torch.tensor(0.2)).all()) and bool((s <= torch.tensor(0.4)).all())
    assert t.min().item() < 230 and t.max().item() > 370  # the range is spanned, not a corner of it
    assert t.min().item() >= 199.99 and t.max().item() <= 400.01


def test_rescale_and_preserve_shape_differ_as_documented():
    kw = dict(method="sigmoid", shift=1.0, min_timestep=500, max_timestep=1000, generator=_gen(6))
    rescaled = sample_sigmas(N, **kw)
    preserved = sample_sigmas(N, preserve_distribution_shape=True, **kw)
    # rescale: 0.5 + 0.5*sigmoid(N) -> median 0.75; rejection: sigmoid(N) | N>0 -> median sigmoid(Phi^-1(0.75))
    assert abs(torch.median(rescaled).item() - 0.75) < 0.01
    assert abs(torch.median(preserved).item() - 1 / (1 + math.exp(-0.6745))) < 0.01


def test_uniform_with_min_zero_never_returns_zero():
    s = sample_sigmas(100000, method="uniform", shift=1.0, min_timestep=0, max_timestep=1, generator=_gen(7))
    assert bool((s > 0).all()) and bool((s <= 0.001).all())


def test_sampler_moves_to_device_from_cpu_generator():
    s = sample_sigmas(4, method="shift", shift=3.0, generator=_gen(0), device="cpu")
    assert s.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="beta"), "unknown"),
        (dict(min_timestep=500, max_timestep=400), "min_timestep"),
        (dict(max_timestep=1001), "max_timestep"),
        (dict(max_timestep=0), "max_timestep > 0"),
        (dict(shift=0.0), "shift"),
        (dict(sigmoid_scale=-1.0), "sigmoid_scale"),
        (dict(logit_std=0.0), "logit_std"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, match):
    kw = dict(method="shift", shift=3.0) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_sigmas(4, generator=_gen(0), **kw)
    with pytest.raises(ValueError, match="batch_size"):
        sample_sigmas(0, method="uniform", shift=1.0)


def test_preserve_shape_gives_up_on_a_range_without_mass():
    with pytest.raises(ValueError, match="preserve_distribution_shape"):
        sample_sigmas(
            4, method="sigmoid", shift=1.0, min_timestep=0, max_timestep=1e-6,
            preserve_distribution_shape=True, generator=_gen(0),
        )


# --- Wan 2.2 experts ----------------------------------------------------------------------------------------------


def test_expert_ranges_split_at_boundary():
    assert expert_timestep_range("transformer", 0.875) == (875.0, 1000.0)
    assert expert_timestep_range("transformer_2", 0.875) == (0.0, 875.0)
    assert expert_for_timestep(875.0, 0.875) == "transformer"  # pipeline: t >= boundary -> high-noise expert
    assert expert_for_timestep(math.nextafter(875.0, 0), 0.875) == "transformer_2"
    for expert in ("transformer", "transformer_2"):
        lo, hi = expert_timestep_range(expert, 0.9)
        s = sample_sigmas(2000, method="shift", shift=5.0, min_timestep=lo, max_timestep=hi,
                          preserve_distribution_shape=True, generator=_gen(8))
        routed = {expert_for_timestep(t, 0.9) for t in sigma_to_timestep(s).tolist()}
        assert routed == {expert}
    with pytest.raises(ValueError, match="expert"):
        expert_timestep_range("high", 0.875)
    with pytest.raises(ValueError, match="boundary_ratio"):
        expert_timestep_range("transformer", 1.5)


def test_expert_choice_matches_wan_pipeline():
    from slice_ft.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_components, build_tiny_transformer

    comps = build_tiny_components(0)
    pipe = WanPipeline(**comps, transformer_2=build_tiny_transformer(1), boundary_ratio=0.6)
    seen = {"transformer": [], "transformer_2": []}
    for name in seen:
        getattr(pipe, name).register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: seen[name].append(float(kwargs["timestep"][0])), with_kwargs=True
        )
    pipe(
        prompt="a red ball", num_frames=5, height=16, width=16, num_inference_steps=8, guidance_scale=1.0,
        output_type="latent", max_sequence_length=TINY_MAX_SEQUENCE_LENGTH, generator=_gen(0),
    )
    assert seen["transformer"] and seen["transformer_2"]  # both sides exercised
    for name, ts in seen.items():
        lo, hi = expert_timestep_range(name, 0.6)
        for t in ts:
            assert expert_for_timestep(t, 0.6) == name
            assert lo <= t <= hi and (name == "transformer" or t < hi)


# --- loss -------------------------------------------------------------------------------------------------------


def test_loss_weights_match_diffusers_and_exact_values():
    sigma = torch.tensor([0.5, 0.25, 0.9])
    for scheme in ("sigma_sqrt", "cosmap"):
        assert torch.equal(loss_weights(sigma, scheme), compute_loss_weighting_for_sd3(scheme, sigmas=sigma).float())
    assert torch.equal(loss_weights(sigma, "none"), torch.ones(3))
    assert loss_weights(sigma, "sigma_sqrt")[:2].tolist() == [4.0, 16.0]
    assert loss_weights(sigma, "cosmap")[0].item() == pytest.approx(4 / math.pi, rel=1e-7)  # 2/(pi*0.5)
    assert loss_weights(sigma, "cosmap").dtype == torch.float32
    with pytest.raises(ValueError, match="scheme"):
        loss_weights(sigma, "logit_normal")


def test_flow_matching_loss_exact():
    pred = torch.zeros(2, 1, 2, 1, 1)
    target = torch.tensor([1.0, 3.0, 2.0, 2.0]).view(2, 1, 2, 1, 1)
    # per-sample MSE: (1+9)/2 = 5 and (4+4)/2 = 4
    assert flow_matching_loss(pred, target).item() == 4.5
    assert flow_matching_loss(pred, target, torch.tensor([2.0, 0.5])).item() == 6.0  # (10 + 2)/2
    out = flow_matching_loss(pred.bfloat16(), target.bfloat16(), torch.ones(2))
    assert out.dtype == torch.float32 and out.ndim == 0


def test_flow_matching_loss_matches_diffusers_sd3_formula():
    g = _gen(9)
    pred, target = torch.randn(3, 4, 2, 3, 3, generator=g), torch.randn(3, 4, 2, 3, 3, generator=g)
    w = loss_weights(torch.tensor([0.3, 0.6, 0.9]), "cosmap")
    # train_dreambooth_sd3.py: mean((w * (pred - target)**2).reshape(B, -1), 1).mean()
    ref = torch.mean((w.view(3, 1, 1, 1, 1) * (pred - target) ** 2).reshape(3, -1), 1).mean()
    torch.testing.assert_close(flow_matching_loss(pred, target, w), ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="one per sample"):
        flow_matching_loss(pred, target, torch.ones(2))
    with pytest.raises(ValueError, match="must match"):
        flow_matching_loss(pred, target[:, :2])
