"""A tiny WanPipeline runs with a slice loaded but unmerged, and matches the merged model."""

import numpy as np
import torch

import slice_adapter
from slice_adapter import SliceConfig
from slice_ft.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline


def render(pipe, seed=0):
    return pipe(
        prompt="a red circle moving right",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames[0]


def test_wan_pipeline_runs_with_an_unmerged_slice(tmp_path):
    pipe = build_tiny_pipeline(seed=0)
    base = render(pipe)
    trained = build_tiny_pipeline(seed=0).transformer
    trained.add_adapter(SliceConfig(fraction=0.2, slice_id=1, init_weights=False))
    with torch.no_grad():  # a larger delta so the rendered frames visibly change
        for name, p in trained.named_parameters():
            if ".slice_values." in name:
                p.mul_(20)
    slice_adapter.save_adapter(trained, tmp_path / "slice")

    pipe.transformer.load_adapter(tmp_path / "slice", adapter_name="style")
    assert pipe.transformer.active_adapters() == ["style"]
    unmerged = render(pipe)
    assert unmerged.shape == base.shape == (5, 32, 32, 3)
    assert np.abs(unmerged - base).max() > 1e-3
    slice_adapter.merge_adapters(pipe.transformer)
    np.testing.assert_allclose(render(pipe), unmerged, atol=1e-4)
    slice_adapter.unmerge_adapters(pipe.transformer)
    pipe.transformer.disable_adapters()
    np.testing.assert_allclose(render(pipe), base, atol=0)


def test_validation_returns_the_vae_and_text_encoder_to_where_they_were(tmp_path, monkeypatch):
    """A run that parked the encoders on the CPU after caching must get them back there after each validation."""
    from slice_ft.tiny import build_tiny_components
    from slice_ft.validation import ValidationSettings, render_validation

    comps = build_tiny_components(0)
    moves = {"vae": [], "text_encoder": [], "transformer": []}
    for name, log in moves.items():
        module, real_to = comps[name], comps[name].to

        # Device-recording stand-in for a GPU: a move to "cuda" is logged and leaves the weights in CPU memory (so
        # the pipeline still runs here); every other move is logged and done for real.
        def to(*args, _module=module, _real=real_to, _log=log, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if isinstance(target, (str, torch.device)):
                _log.append(torch.device(target).type)
                if torch.device(target).type == "cuda":
                    return _module
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "to", to)
    settings = ValidationSettings(num_frames=5, height=32, width=32, num_inference_steps=1,
                                  max_sequence_length=TINY_MAX_SEQUENCE_LENGTH)
    paths = render_validation(comps["transformer"], vae=comps["vae"], text_encoder=comps["text_encoder"],
                              tokenizer=comps["tokenizer"], scheduler=comps["scheduler"], prompts=["a red circle"],
                              output_dir=tmp_path, step=1, settings=settings, device="cuda")
    assert [p.exists() for p in paths] == [True]
    # each encoder went to the rendering device, then back to the CPU it came from; the transformer stayed put
    assert moves == {"vae": ["cuda", "cpu"], "text_encoder": ["cuda", "cpu"], "transformer": []}
    assert all(p.device.type == "cpu" for name in ("vae", "text_encoder") for p in comps[name].parameters())
