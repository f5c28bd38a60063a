"""Selection properties: deterministic, a partition, nested, evenly spread, exact overlap."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import slice_adapter
from slice_adapter import SliceConfig
import slice_adapter.selection as selection_module
from slice_adapter.selection import (
    ParamLayout,
    keyed_permutation,
    model_layouts,
    plan_layouts,
    tile_width_for,
)
from slice_adapter.wan_configs import build_meta_transformer, wan_config

from conftest import make_wan


@pytest.fixture(scope="module")
def wan14b_layouts():
    return model_layouts(build_meta_transformer(wan_config("wan2.1-t2v-14b")))


def test_14b_model_has_the_published_parameter_count():
    model = build_meta_transformer(wan_config("wan2.1-t2v-14b"))
    assert sum(p.numel() for p in model.parameters()) == 14_288_491_584


def test_default_targets_are_every_block_parameter(wan14b_layouts):
    names = {lay.name for lay in wan14b_layouts}
    assert all(n.startswith("blocks.") for n in names)
    assert len({n.split(".")[1] for n in names}) == 40
    for kind in ("attn1.to_q.weight", "attn2.to_out.0.bias", "ffn.net.2.weight", "norm2.weight", "scale_shift_table",
                 "attn1.norm_q.weight"):
        assert f"blocks.7.{kind}" in names
    block_numel = sum(lay.numel for lay in wan14b_layouts)
    model = build_meta_transformer(wan_config("wan2.1-t2v-14b"))
    assert block_numel == sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))


@pytest.mark.parametrize("fraction, per_block_tolerance", [(1e-3, 0.02), (1e-4, 0.05)])
def test_14b_every_block_gets_its_share(wan14b_layouts, fraction, per_block_tolerance):
    plan = plan_layouts(wan14b_layouts, fraction, slice_id=1, seed=0)
    assert len(plan.per_block) == 40
    for block, (selected, targeted) in plan.per_block.items():
        assert abs(selected / (fraction * targeted) - 1) <= per_block_tolerance, block
    assert abs(plan.selected / (fraction * plan.targeted) - 1) <= 0.01


def test_14b_every_block_gets_some_at_1e5(wan14b_layouts):
    plan = plan_layouts(wan14b_layouts, 1e-5, slice_id=3, seed=0)
    assert all(selected > 0 for selected, _ in plan.per_block.values())
    assert abs(plan.selected / (1e-5 * plan.targeted) - 1) <= 0.01


def test_14b_plan_is_about_14m_weights_at_1e3(wan14b_layouts):
    plan = plan_layouts(wan14b_layouts, 1e-3, slice_id=0, seed=0)
    assert 14_000_000 <= plan.selected <= 14_110_000


def test_slices_at_one_fraction_partition_the_targets(wan):
    cfg = lambda k: SliceConfig(fraction=0.125, slice_id=k)  # noqa: E731
    plans = [slice_adapter.plan(wan, cfg(k)) for k in range(8)]
    assert cfg(0).num_slices == 8
    for name, param in wan.named_parameters():
        counts = sum(p.mask(name, param.shape).to(torch.int64) for p in plans)
        expected = 1 if name.startswith("blocks.") else 0
        assert torch.all(counts == expected), name
    assert sum(p.selected for p in plans) == plans[0].targeted


def test_two_slices_never_share_a_weight(wan):
    a, b = SliceConfig(fraction=0.01, slice_id=1), SliceConfig(fraction=0.01, slice_id=2)
    assert slice_adapter.overlap(wan, a, b) == 0


def test_slices_nest_across_halved_fractions():
    layouts = [ParamLayout("blocks.0.ffn.weight", (96, 256), True), ParamLayout("blocks.0.norm.weight", (256,), False)]
    coarse = plan_layouts(layouts, 0.1, 3, seed=5)
    fine = [plan_layouts(layouts, 0.05, k, seed=5) for k in (6, 7)]
    for lay in layouts:
        union = np.union1d(fine[0].flat_indices(lay.name), fine[1].flat_indices(lay.name))
        assert np.array_equal(union, coarse.flat_indices(lay.name))


def test_overlap_counts_shared_weights_exactly(wan):
    a, b = SliceConfig(fraction=0.3, slice_id=0), SliceConfig(fraction=0.2, slice_id=1)
    plan_a, plan_b = slice_adapter.plan(wan, a), slice_adapter.plan(wan, b)
    by_masks = sum(int((plan_a.mask(n, p.shape) & plan_b.mask(n, p.shape)).sum()) for n, p in wan.named_parameters())
    assert by_masks > 0
    assert slice_adapter.overlap(wan, a, b) == by_masks


def test_mask_outside_targets_is_all_false_and_shaped_like_the_parameter(wan):
    plan = slice_adapter.plan(wan, SliceConfig(fraction=0.5, slice_id=0))
    mask = plan.mask("proj_out.weight", wan.proj_out.weight.shape)
    assert mask.shape == wan.proj_out.weight.shape and mask.dtype == torch.bool and not mask.any()
    for name, param in wan.named_parameters():  # no shape needed for any parameter of the planned model
        assert plan.mask(name).shape == param.shape
    assert not plan.mask("proj_out.weight").any() and not plan.mask("condition_embedder.time_proj.bias").any()
    with pytest.raises(ValueError, match="not a parameter of the planned model"):
        plan.mask("blocks.99.attn1.to_q.weight")
    mask = plan.mask("blocks.0.scale_shift_table")
    assert mask.shape == (1, 6, 32) and 0 < int(mask.sum()) < mask.numel()


def test_plan_works_on_meta_and_ignores_dtype_and_device():
    meta = build_meta_transformer(dict(make_wan().config))
    real_bf16 = make_wan(dtype=torch.bfloat16)
    cfg = SliceConfig(fraction=0.05, slice_id=4, seed=9)
    p_meta, p_real = slice_adapter.plan(meta, cfg), slice_adapter.plan(real_bf16, cfg)
    assert p_meta.tiles.keys() == p_real.tiles.keys()
    assert all(np.array_equal(p_meta.tiles[n], p_real.tiles[n]) for n in p_meta.tiles)
    assert p_meta.mask("blocks.1.ffn.net.2.weight").device.type == "cpu"


def _plan_digest(fraction, slice_id, seed):
    layouts = model_layouts(build_meta_transformer(wan_config("wan2.1-t2v-1.3b")))
    plan = plan_layouts(layouts, fraction, slice_id, seed)
    return {n: int(t.sum() * 7919 + len(t)) for n, t in sorted(plan.tiles.items())}


def test_selection_is_identical_in_another_process():
    code = (
        "import json, torch; torch.set_num_threads(1); import sys; sys.path.insert(0, 'tests');"
        "from test_selection import _plan_digest; print(json.dumps(_plan_digest(1e-3, 7, 3)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={
        **__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == _plan_digest(1e-3, 7, 3)


def test_different_seeds_give_different_slices(wan):
    a = slice_adapter.plan(wan, SliceConfig(fraction=0.1, slice_id=0, seed=0))
    b = slice_adapter.plan(wan, SliceConfig(fraction=0.1, slice_id=0, seed=1))
    assert not all(np.array_equal(a.tiles.get(n, []), b.tiles.get(n, [])) for n in a.layouts)


def test_keyed_permutation_is_a_bijection():
    for n in (1, 2, 7, 64, 1000, 4097):
        perm = keyed_permutation(np.arange(n), n, key=12345)
        assert sorted(perm.tolist()) == list(range(n))


def _tiles_alone(lay, fraction, slice_id, seed, tile_order):
    """The documented order evaluated for one parameter: ranks -> (band, tile in band) -> tile."""
    frac = selection_module.parse_fraction(fraction)
    lo, hi = selection_module.rank_window(lay.num_tiles, frac, slice_id, selection_module._offset(lay.name, seed))
    ranks = np.arange(lo, max(hi, lo))
    key = selection_module._hash64("rank", seed, lay.name)
    if tile_order == "scattered" or lay.bands == 1:
        return np.sort(keyed_permutation(ranks, lay.num_tiles, key))
    band_tiles, width = lay.num_tiles // lay.bands, lay.segments_per_row // lay.bands
    bands = sorted(range(lay.bands), key=lambda j: selection_module._hash64("band", seed, lay.name, j))
    within = keyed_permutation(ranks % band_tiles, band_tiles, key)
    band = np.array(bands)[ranks // band_tiles]
    return np.sort(within // width * lay.segments_per_row + band * width + within % width)


@pytest.mark.parametrize("tile_order", ["banded", "scattered"])
@pytest.mark.parametrize("batch_ranks", [1, 7, 1 << 16])
def test_batched_permutation_gives_the_tiles_of_one_parameter_at_a_time(wan, monkeypatch, batch_ranks, tile_order):
    """Small windows are permuted many parameters at once (in batches of BATCH_RANKS ranks): the same tiles as
    evaluating each parameter's order alone."""
    monkeypatch.setattr(selection_module, "BATCH_RANKS", batch_ranks)
    layouts = model_layouts(wan) + [ParamLayout("one.weight", (1,), False), ParamLayout("odd.weight", (5, 96), True),
                                    ParamLayout("wide.weight", (8, 512), True)]
    for fraction, slice_id, seed in [(0.01, 3, 0), (0.25, 1, 7), (1 / 3, 2, 5)]:
        tiles = selection_module.select_tiles_many(layouts, fraction, slice_id, seed, tile_order)
        for lay in layouts:
            assert np.array_equal(tiles[lay.name], _tiles_alone(lay, fraction, slice_id, seed, tile_order)), \
                (lay.name, fraction)
        assert sum(len(t) for t in tiles.values()) > 0


def test_tiles_are_full_row_segments_of_at_most_64():
    assert tile_width_for(5120) == 64 and tile_width_for(13824) == 64 and tile_width_for(8960) == 64
    assert tile_width_for(32) == 32 and tile_width_for(100) == 50 and tile_width_for(67) == 1


def test_target_modules_and_exclude_modules_narrow_the_slice(wan):
    only_ffn = slice_adapter.plan(wan, SliceConfig(fraction=0.5, target_modules=["ffn.net.2"]))
    assert set(only_ffn.layouts) == {"blocks.0.ffn.net.2.weight", "blocks.0.ffn.net.2.bias",
                                     "blocks.1.ffn.net.2.weight", "blocks.1.ffn.net.2.bias"}
    raw = slice_adapter.plan(wan, SliceConfig(fraction=0.5, target_modules=["scale_shift_table"]))
    assert set(raw.layouts) == {"scale_shift_table", "blocks.0.scale_shift_table", "blocks.1.scale_shift_table"}
    regex = slice_adapter.plan(wan, SliceConfig(fraction=0.5, target_modules=r"blocks\.1\.attn1\.to_.*"))
    assert {n.rsplit(".", 1)[0] for n in regex.layouts} == {f"blocks.1.attn1.to_{x}" for x in ("q", "k", "v", "out.0")}
    no_norms = slice_adapter.plan(wan, SliceConfig(fraction=0.5, exclude_modules=["norm_q", "norm_k", "norm2"]))
    assert not any("norm" in n for n in no_norms.layouts)
    assert no_norms.targeted < slice_adapter.plan(wan, SliceConfig(fraction=0.5)).targeted


def test_a_small_banded_slice_reads_one_band_of_each_matrix_input(wan14b_layouts):
    """At 14B and --ff 0.001, each Linear's tiles lie in one band (rarely two) of its input: 1/8 of the columns the
    tiles' gradient must keep from forward to backward. The scattered order reads most of the input."""
    linears = [lay for lay in wan14b_layouts if lay.tiled_rows and lay.name.startswith("blocks.3.")]
    assert linears and all(lay.bands == 8 for lay in linears)
    for order, at_most in (("banded", 2 / 8), ("scattered", 1.0)):
        plan = plan_layouts(linears, 1e-3, slice_id=5, seed=0, tile_order=order)
        for lay in linears:
            segments = np.unique(plan.tiles[lay.name] % lay.segments_per_row)
            band_width = lay.segments_per_row // lay.bands
            if order == "banded":
                assert len(np.unique(segments // band_width)) <= 2, lay.name
                assert len(segments) <= at_most * lay.segments_per_row
            else:
                assert len(segments) > 2 / 8 * lay.segments_per_row, lay.name


@pytest.mark.parametrize("tile_order", ["banded", "scattered"])
def test_each_tile_order_partitions_the_targets_and_nests(wan, tile_order):
    plans = [slice_adapter.plan(wan, SliceConfig(fraction=0.125, slice_id=k, tile_order=tile_order))
             for k in range(8)]
    for name, param in wan.named_parameters():
        counts = sum(p.mask(name, param.shape).to(torch.int64) for p in plans)
        assert torch.all(counts == (1 if name.startswith("blocks.") else 0)), name
    layouts = [ParamLayout("blocks.0.ffn.weight", (96, 1024), True)]
    coarse = plan_layouts(layouts, 0.1, 3, seed=5, tile_order=tile_order)
    fine = [plan_layouts(layouts, 0.05, k, seed=5, tile_order=tile_order) for k in (6, 7)]
    union = np.union1d(fine[0].flat_indices(layouts[0].name), fine[1].flat_indices(layouts[0].name))
    assert np.array_equal(union, coarse.flat_indices(layouts[0].name))


def test_the_two_tile_orders_choose_different_weights():
    from conftest import make_wan

    wan = make_wan(ffn_dim=256)  # the tiny model's inputs are one tile wide (one band); the FFN's output Linear's: 4
    banded, scattered = (slice_adapter.plan(wan, SliceConfig(fraction=0.05, slice_id=3, tile_order=o))
                         for o in ("banded", "scattered"))
    assert banded.selected == scattered.selected
    wide = [n for n, lay in banded.layouts.items() if lay.bands > 1]
    assert wide and any(not np.array_equal(banded.tiles.get(n, []), scattered.tiles.get(n, [])) for n in wide)


def test_a_saved_layout_record_decides_the_tile_order():
    """A config read from disk takes the order its layout record names; records written before orders were
    recorded mean "scattered", so slices saved then still load onto their own weights."""
    record = {"fingerprint": "0" * 16, "parameters": {}}
    assert SliceConfig().tile_order == "scattered"
    assert SliceConfig(layout=record).tile_order == "scattered"
    assert SliceConfig(tile_order="banded", layout=record).tile_order == "scattered"
    assert SliceConfig(layout={**record, "tile_order": "banded"}).tile_order == "banded"
    with pytest.raises(ValueError, match=r"tile_order must be one of \['banded', 'scattered'\], got 'rows'"):
        SliceConfig(tile_order="rows")
