"""The published Wan transformer configurations (diffusers' `WanTransformer3DModel` arguments).

Used to plan slices and to test selection properties on meta-device models without downloading weights.
"""

from __future__ import annotations

_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    freq_dim=256,
    text_dim=4096,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

WAN_CONFIGS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(_COMMON, num_attention_heads=12, in_channels=16, out_channels=16, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(_COMMON, num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824, num_layers=40),
    "wan2.1-i2v-14b": dict(
        _COMMON,
        num_attention_heads=40,
        in_channels=36,
        out_channels=16,
        ffn_dim=13824,
        num_layers=40,
        image_dim=1280,
        added_kv_proj_dim=5120,
    ),
    # Each Wan 2.2 A14B expert (`transformer` high-noise, `transformer_2` low-noise) has the 2.1 T2V-14B shapes.
    "wan2.2-t2v-a14b": dict(_COMMON, num_attention_heads=40, in_channels=16, out_channels=16, ffn_dim=13824, num_layers=40),
    "wan2.2-i2v-a14b": dict(_COMMON, num_attention_heads=40, in_channels=36, out_channels=16, ffn_dim=13824, num_layers=40),
    "wan2.2-ti2v-5b": dict(_COMMON, num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
}


def wan_config(name: str) -> dict:
    """The `WanTransformer3DModel` config of a published Wan model, by its short name."""
    key = name.lower()
    if key not in WAN_CONFIGS:
        raise ValueError(f"unknown Wan model {name!r}; known: {', '.join(sorted(WAN_CONFIGS))}, or pass a config path")
    return dict(WAN_CONFIGS[key])


def build_meta_transformer(config: dict):
    """A `WanTransformer3DModel` on the meta device: shapes and names only, no memory."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        return WanTransformer3DModel(**config)
