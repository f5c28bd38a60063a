"""SliceConfig(lossless_for=...): the slice leaves out what a program cannot take from a LoRA file, and the choice
survives saving; autocast_adapter_dtype on slice_adapter.load_adapter and in_features/out_features on Wan layers."""

import pytest
import torch

import slice_adapter
from slice_adapter import SliceConfig
from slice_adapter.export import CLIENTS, lossless_check
from slice_adapter.deltas import read_slice
from slice_adapter.io import read_adapter_config
from slice_adapter.layer import SliceLayer
from slice_ft.tiny import build_tiny_transformer

from conftest import wan_inputs
from slice_checkpoints import make_slice


@pytest.mark.parametrize("client", list(CLIENTS))
def test_a_lossless_for_slice_keeps_only_what_the_program_applies_and_survives_saving(tmp_path, client):
    folder = make_slice(tmp_path / "s", 0.5, 1, lossless_for=client, exclude_modules=["to_k"])
    saved = read_adapter_config(folder)
    assert saved.lossless_for == client
    assert SliceConfig(**{**saved.to_dict(), "peft_type": None}).exclude_modules == saved.exclude_modules  # idempotent
    slice_ = read_slice(folder)
    assert lossless_check(slice_, client)["count"] == 0
    assert not any(".to_k." in n for n in slice_.layouts)  # the user's own exclusions still hold
    full = read_slice(make_slice(tmp_path / "full", 0.5, 1))
    assert lossless_check(full, client)["count"] > 0  # the default slice is not lossless there
    want = {n for n, lay in full.layouts.items() if not CLIENTS[client].drops(n, lay.tiled_rows) and ".to_k." not in n}
    assert set(slice_.layouts) == want


def test_lossless_for_rejects_unknown_programs():
    with pytest.raises(ValueError, match=r"lossless_for must be one of \['comfy', 'diffusers', 'musubi', 'wan2gp'\]"):
        SliceConfig(fraction=0.5, lossless_for="kohya")


def test_load_adapter_honours_autocast_adapter_dtype_and_layers_expose_features(tmp_path):
    folder = make_slice(tmp_path / "s", 0.25, 1)
    for autocast, want in ((True, torch.float32), (False, torch.bfloat16)):
        model = build_tiny_transformer(0).to(torch.bfloat16)
        slice_adapter.load_adapter(model, folder, autocast_adapter_dtype=autocast)
        values = [p for n, p in model.named_parameters() if "slice_" in n]
        assert values and all(p.dtype == want for p in values)
        out = model(**wan_inputs(dtype=torch.bfloat16), return_dict=False)[0]
        assert torch.isfinite(out).all()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SliceLayer)}
    assert (layers["blocks.0.ffn.net.0.proj"].in_features, layers["blocks.0.ffn.net.0.proj"].out_features) == (32, 64)
    assert layers["blocks.0.sliced_params"].in_features == 32 and layers["blocks.0.norm2"].out_features == 32


def test_the_trainer_flag_trains_a_slice_its_program_loads_exactly(tmp_path):
    """--lossless_for musubi: the saved slice holds only the blocks' Linear weights, and its musubi export is
    lossless."""
    from slice_ft.corpus import generate_corpus
    from slice_adapter.export import export_lora

    from test_train import train

    corpus = tmp_path / "corpus"
    generate_corpus(corpus, num_images=2, num_videos=0, size=[(48, 32)], num_frames=1, seed=3)
    train(tmp_path / "out", "--max_train_steps", "1", "--lossless_for", "musubi", dataset=corpus)
    folder = tmp_path / "out" / "slice"
    assert read_adapter_config(folder).lossless_for == "musubi"
    assert all(n.endswith(".weight") and lay.tiled_rows for n, lay in read_slice(folder).layouts.items())
    assert export_lora(folder, tmp_path / "lora.safetensors", "musubi")["dropped"] == []
