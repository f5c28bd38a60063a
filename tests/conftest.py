"""Shared fixtures: tiny random Wan transformers built from configs (no hub, no download)."""

import os

import pytest
import torch

from slice_ft.tiny import TINY_TRANSFORMER_CONFIG

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_WAN = dict(TINY_TRANSFORMER_CONFIG)  # the demo's tiny transformer: 2 blocks, width 32


def make_wan(seed: int = 0, dtype=torch.float32, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_WAN, **overrides}).to(dtype).eval()


def wan_inputs(seed: int = 1, batch: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 3, 8, 8, generator=g).to(dtype),
        timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 8, 32, generator=g).to(dtype),
    )


@pytest.fixture
def wan():
    return make_wan()


@pytest.fixture
def inputs():
    return wan_inputs()
