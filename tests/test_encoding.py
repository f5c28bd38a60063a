import types
import weakref

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from slice_ft.encoding import (
    CacheItem,
    LatentCache,
    encode_prompts,
    encode_videos,
    free_encoders,
    normalize_latents,
)
from slice_ft.tiny import (
    TINY_MAX_SEQUENCE_LENGTH as L,
    build_tiny_components,
    build_tiny_text_encoder,
    build_tiny_vae,
)

PROMPTS = ["a red ball moving left", "the cat", ""]


def _pixels(seed, frames=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


# --- prompts ----------------------------------------------------------------------------------------------------


def test_prompt_embeddings_equal_wan_pipeline_cut_and_zero_padded():
    comps = build_tiny_components(0)
    pipe = WanPipeline(**comps)
    ours = encode_prompts(comps["text_encoder"], comps["tokenizer"], PROMPTS, L, device="cpu", dtype=torch.float32)
    with torch.no_grad():  # as in WanPipeline.__call__ (grad mode picks other kernels: ~1e-6 apart)
        ref, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=L, device="cpu")
    assert ours.shape == (3, L, 32) and torch.equal(ours, ref)

    # Independent of diffusers: real rows are the encoder's output under the mask, the rest exactly 0.
    tok = comps["tokenizer"](PROMPTS, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    lengths = tok.attention_mask.sum(1).tolist()
    assert lengths[2] == 1 and 1 < lengths[1] < lengths[0] < L  # "" is just </s>; all shorter than L
    with torch.no_grad():
        hidden = comps["text_encoder"](tok.input_ids, tok.attention_mask).last_hidden_state
    for i, n in enumerate(lengths):
        assert torch.equal(ours[i, :n], hidden[i, :n])
        assert bool(ours[i, :n].ne(0).any(-1).all())
        assert bool((ours[i, n:] == 0).all())
        assert not torch.equal(hidden[i, n:], torch.zeros_like(hidden[i, n:]))  # the encoder itself is not 0 there


def test_prompt_embeddings_truncate_dtype_and_errors():
    te, tokenizer = build_tiny_text_encoder(0)
    long_prompt = " ".join(["red"] * 40)
    e = encode_prompts(te, tokenizer, long_prompt, L, dtype=torch.bfloat16)
    assert e.shape == (1, L, 32) and e.dtype == torch.bfloat16
    assert bool(e[0].ne(0).any(-1).all())  # truncated at L: no padding left
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts(te, tokenizer, [], L)
    with pytest.raises(ValueError, match="max_sequence_length"):
        encode_prompts(te, tokenizer, ["a"], 0)


# --- videos -----------------------------------------------------------------------------------------------------


def test_latent_normalisation_is_inverted_by_wan_pipeline_before_decode():
    comps = build_tiny_components(0)
    # Euler with a zero velocity leaves the latents untouched, so decode sees exactly the pipeline's de-normalisation.
    comps["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(**comps)
    pipe.transformer.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states),)
    seen = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **kw: (seen.append(z.clone()), decode(z, *a, **kw))[1]

    pixels = _pixels(0, frames=5, size=32)
    latents = encode_videos(pipe.vae, pixels)
    assert latents.shape == (1, 4, 2, 4, 4) and latents.dtype == torch.float32
    pipe(
        prompt="a red ball", latents=latents, num_frames=5, height=32, width=32, num_inference_steps=2,
        guidance_scale=1.0, max_sequence_length=L, output_type="pt",
    )
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mean  # mode of the Gaussian posterior
    torch.testing.assert_close(seen[0], z, rtol=1e-6, atol=1e-6)
    # and the normalisation itself, with the tiny VAE's non-trivial mean/std
    mean = torch.tensor([0.25, -0.5, 0.75, -0.125]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.5, 2.0, 0.8]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (z - mean) / std, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(latents, z)


def test_normalize_latents_exact_on_dyadic_stats():
    cfg = types.SimpleNamespace(z_dim=2, latents_mean=[0.5, -1.0], latents_std=[2.0, 0.25])
    z = torch.tensor([2.5, 1.0]).view(1, 2, 1, 1, 1)
    assert normalize_latents(z, cfg).flatten().tolist() == [1.0, 8.0]  # (2.5-0.5)/2, (1+1)/0.25


def test_encode_videos_is_deterministic_and_casts():
    vae = build_tiny_vae(0)
    px = _pixels(1)
    a, b = encode_videos(vae, px), encode_videos(vae, px)
    assert torch.equal(a, b)  # mode, not a sample
    assert torch.equal(encode_videos(vae, px, dtype=torch.bfloat16), a.bfloat16())


@pytest.mark.parametrize(
    "pixels, match",
    [
        (torch.zeros(3, 1, 16, 16), "B, C, F, H, W"),
        (torch.zeros(1, 3, 6, 16, 16), "1 \\+ 4k"),
        (torch.zeros(1, 3, 1, 20, 16), "multiples of 8"),
        (torch.full((1, 3, 1, 16, 16), 255.0), "expected \\[-1, 1\\]"),
        (torch.zeros(1, 4, 1, 16, 16), "channels"),
    ],
)
def test_encode_videos_rejects_bad_pixels(pixels, match):
    with pytest.raises(ValueError, match=match):
        encode_videos(build_tiny_vae(0), pixels)


# --- cache ------------------------------------------------------------------------------------------------------

SETTINGS = dict(vae="tiny-vae@0", text_encoder="tiny-umt5@0", max_sequence_length=L, dtype="float32")


class Counted:
    """Tiny VAE + text encoder whose encoder calls are counted."""

    def __init__(self):
        self.vae = build_tiny_vae(0)
        self.te, self.tok = build_tiny_text_encoder(0)
        self.vae_calls = self.te_calls = 0
        encode = self.vae.encode

        def counted_encode(*a, **kw):
            self.vae_calls += 1
            return encode(*a, **kw)

        self.vae.encode = counted_encode
        self.te.register_forward_hook(lambda *a: setattr(self, "te_calls", self.te_calls + 1))

    def run(self, cache, items):
        return cache.precompute(items, self.vae, self.te, self.tok, progress=False)


def _items():
    return [
        CacheItem("sha1-a", "a red ball", _pixels(0)),
        dict(content_id="sha1-b", prompt="the cat", pixels=_pixels(1, frames=5)[0]),  # (C, F, H, W) mapping
        # shaped like slice_ft.data.Item; same caption as the first: one text file
        types.SimpleNamespace(id="sha1-c", caption="a red ball", pixel_values=_pixels(2)[0], bucket=None),
    ]


def test_cache_roundtrip_and_reuse_across_runs(tmp_path):
    enc = Counted()
    counts = enc.run(LatentCache(tmp_path, SETTINGS), _items())
    assert counts == dict(latents_computed=3, latents_reused=0, text_computed=2, text_reused=1)
    assert (enc.vae_calls, enc.te_calls) == (3, 2)
    assert not list(tmp_path.rglob("*.tmp"))

    cache = LatentCache(tmp_path, dict(reversed(list(SETTINGS.items()))))  # a new run; key order irrelevant
    counts = enc.run(cache, _items())
    assert counts == dict(latents_computed=0, latents_reused=3, text_computed=0, text_reused=3)
    assert (enc.vae_calls, enc.te_calls) == (3, 2)  # no encoder call

    got = cache.get("sha1-b", "the cat", num_frames=5, height=16, width=16)
    assert torch.equal(got["latents"], encode_videos(enc.vae, _pixels(1, frames=5))[0])
    emb = encode_prompts(enc.te, enc.tok, ["the cat"], L, dtype=torch.float32)[0]
    assert torch.equal(got["prompt_embeds"], emb) and got["prompt_embeds"].shape == (L, 32)
    assert bool((got["prompt_embeds"][3:] == 0).all())  # zero padding restored on load
    assert cache.has("sha1-a", "a red ball", num_frames=1, height=16, width=16)
    assert not cache.has("sha1-a", "the cat!", num_frames=1, height=16, width=16)
    with pytest.raises(KeyError, match="precompute"):
        cache.get_latents("sha1-zzz", num_frames=1, height=16, width=16)


def test_cache_changed_settings_miss(tmp_path):
    enc = Counted()
    enc.run(LatentCache(tmp_path, SETTINGS), _items())
    c = enc.run(LatentCache(tmp_path, SETTINGS | dict(max_sequence_length=L + 4)), _items())
    assert (c["latents_reused"], c["text_computed"]) == (3, 2)  # text-only setting: latents stay valid
    c = enc.run(LatentCache(tmp_path, SETTINGS | dict(vae="tiny-vae@1")), _items())
    assert (c["latents_computed"], c["text_reused"]) == (3, 3)
    c = enc.run(LatentCache(tmp_path, SETTINGS | dict(dtype="bfloat16")), _items())
    assert (c["latents_computed"], c["text_computed"]) == (3, 2)
    bf = LatentCache(tmp_path, SETTINGS | dict(dtype=torch.bfloat16))
    assert bf.get_latents("sha1-a", num_frames=1, height=16, width=16).dtype == torch.bfloat16
    # another bucket for the same media is another latent file
    c = enc.run(LatentCache(tmp_path, SETTINGS), [CacheItem("sha1-a", "a red ball", _pixels(0, size=24))])
    assert (c["latents_computed"], c["text_reused"]) == (1, 1)


def test_corrupt_file_is_recomputed_with_warning(tmp_path):
    enc = Counted()
    cache = LatentCache(tmp_path, SETTINGS)
    enc.run(cache, _items())
    path = cache.latents_path("sha1-a", num_frames=1, height=16, width=16)
    good = cache.get_latents("sha1-a", num_frames=1, height=16, width=16)
    path.write_bytes(path.read_bytes()[:-7])  # truncated, e.g. a crash of an old non-atomic writer
    with pytest.warns(RuntimeWarning, match="corrupt cache file"):
        c = enc.run(cache, _items())
    assert c == dict(latents_computed=1, latents_reused=2, text_computed=0, text_reused=3)
    assert enc.vae_calls == 4
    assert torch.equal(cache.get_latents("sha1-a", num_frames=1, height=16, width=16), good)

    tpath = cache.text_path("the cat")
    tpath.write_bytes(b"\x00garbage")
    with pytest.warns(RuntimeWarning, match="corrupt"), pytest.raises(KeyError, match="precompute again"):
        cache.get_prompt_embeds("the cat")
    assert not tpath.exists()


def test_lazy_pixels_are_loaded_only_on_a_miss(tmp_path):
    enc = Counted()
    loads = []
    item = CacheItem("sha1-l", "a dog", lambda: loads.append(1) or _pixels(3), num_frames=1, height=16, width=16)
    cache = LatentCache(tmp_path, SETTINGS)
    enc.run(cache, [item])
    enc.run(cache, [item])
    assert len(loads) == 1
    with pytest.raises(ValueError, match="CacheItem, a mapping"):
        enc.run(cache, [("sha1-x", "a dog")])
    with pytest.raises(ValueError, match="num_frames/height/width"):
        enc.run(cache, [CacheItem("sha1-m", "a dog", lambda: _pixels(3))])
    bad = CacheItem("sha1-n", "a dog", lambda: _pixels(3), num_frames=1, height=32, width=32)
    with pytest.raises(ValueError, match="do not match"):
        enc.run(cache, [bad])

    # a loader item left undecoded (skip_decode): its bucket gives the sizes; fine on a hit, a clear error on a miss
    from slice_ft.data import Bucket

    hit = types.SimpleNamespace(id="sha1-l", caption="a new caption", pixel_values=None, bucket=Bucket(16, 16, 1))
    counts = enc.run(cache, [hit])
    assert counts["latents_reused"] == 1 and counts["text_computed"] == 1  # only the edited caption is encoded
    miss = types.SimpleNamespace(id="sha1-z", caption="a dog", pixel_values=None, bucket=Bucket(16, 16, 1))
    with pytest.raises(ValueError, match="skipped decoding it.*not cached"):
        enc.run(cache, [miss])


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    enc = Counted()
    cache = LatentCache(tmp_path, SETTINGS)

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr("slice_ft.encoding.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        enc.run(cache, _items()[:1])
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_cache_settings_validation(tmp_path):
    with pytest.raises(ValueError, match="lack \\['text_encoder'\\]"):
        LatentCache(tmp_path, dict(vae="v", max_sequence_length=512, dtype="bfloat16"))
    with pytest.raises(ValueError, match="dtype"):
        LatentCache(tmp_path, SETTINGS | dict(dtype="int8"))
    with pytest.raises(ValueError, match="dtype"):
        LatentCache(tmp_path, SETTINGS | dict(dtype=torch.int64))


def test_free_encoders_drops_references_and_empties_the_accelerator_cache(monkeypatch):
    import diffusers.training_utils

    emptied = []
    monkeypatch.setattr(diffusers.training_utils, "free_memory", lambda: emptied.append(1))
    comps = build_tiny_components(0)
    refs = [weakref.ref(comps["vae"]), weakref.ref(comps["text_encoder"])]
    assert free_encoders(comps) == ["vae", "text_encoder", "tokenizer"]
    assert [r() for r in refs] == [None, None] and "transformer" in comps
    assert emptied == [1]

    holder = types.SimpleNamespace(vae=build_tiny_vae(0), text_encoder=None)
    assert free_encoders(holder, names=("vae", "text_encoder")) == ["vae"] and holder.vae is None


def test_cached_sample_drives_one_flow_matching_step(tmp_path):
    """The usage the training script follows: cache -> free encoders -> sample sigma -> loss -> backward."""
    from slice_ft.flow_matching import flow_matching_loss, flow_target, loss_weights, noisy_latents, sample_sigmas
    from slice_ft.flow_matching import sigma_to_timestep

    comps = build_tiny_components(0)
    cache = LatentCache(tmp_path, SETTINGS)
    cache.precompute(_items(), comps["vae"], comps["text_encoder"], comps["tokenizer"], progress=False)
    free_encoders(comps)
    batch = cache.get("sha1-b", "the cat", num_frames=5, height=16, width=16)
    x0, text = batch["latents"][None], batch["prompt_embeds"][None]
    g = torch.Generator().manual_seed(0)
    sigma = sample_sigmas(1, method="shift", shift=3.0, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    model = comps["transformer"].train()
    pred = model(
        hidden_states=noisy_latents(x0, noise, sigma), timestep=sigma_to_timestep(sigma),
        encoder_hidden_states=text, return_dict=False,
    )[0]
    loss = flow_matching_loss(pred, flow_target(x0, noise), loss_weights(sigma, "none"))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert model.proj_out.weight.grad is not None and model.proj_out.weight.grad.abs().sum() > 0
