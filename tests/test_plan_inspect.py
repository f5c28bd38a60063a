"""Planning figures (exact counts on the published configs, fast) and slice inspection (counts, norms, overlaps)."""

import json
import math
import time

import numpy as np
import pytest

import slice_adapter
from slice_adapter import SliceConfig
from slice_adapter.report import inspect_report, plan_report
from slice_adapter.selection import model_layouts, plan_layouts
from slice_adapter.wan_configs import build_meta_transformer, wan_config
from slice_ft.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer

from slice_checkpoints import cli, make_slice, run_script, save_base, save_sharded, tiny_state


def test_plan_of_the_14b_model_is_exact_and_fast():
    start = time.perf_counter()
    report = plan_report("wan2.1-t2v-14b", 0.001, slice_id=1)
    elapsed = time.perf_counter() - start
    assert report["total_params"] == 14_288_491_584
    # The window counts equal the full plan (which evaluates the permutation) on the meta model.
    plan = plan_layouts(model_layouts(build_meta_transformer(wan_config("wan2.1-t2v-14b"))), 0.001, 1, 0)
    assert report["trainable_params"] == plan.selected == 14_055_669
    assert report["targeted_params"] == plan.targeted
    per_block = [s for s, _ in plan.per_block.values()]
    assert report["per_block"] == {"blocks": 40, "min": min(per_block), "mean": sum(per_block) / 40,
                                   "max": max(per_block)}
    assert report["percent_of_model"] == pytest.approx(100 * 14_055_669 / 14_288_491_584)
    assert report["num_slices"] == 1000 and report["model_bytes_bf16"] == 2 * 14_288_491_584
    assert elapsed < 60, f"planning the 14B model took {elapsed:.1f} s"


def test_plan_bytes_follow_the_trainable_count():
    report = plan_report(TINY_TRANSFORMER_CONFIG, 0.1, slice_id=3)
    n = report["trainable_params"]
    fp32, bf16 = report["bytes"]["fp32"], report["bytes"]["bf16"]
    assert (fp32["values"], fp32["gradients"], fp32["adam_states"]) == (4 * n, 4 * n, 8 * n)
    assert (bf16["values"], bf16["gradients"], bf16["adam_states"]) == (2 * n, 2 * n, 4 * n)
    assert fp32["vram_estimate"] == 16 * n + fp32["index"] and bf16["vram_estimate"] == 8 * n + bf16["index"]
    model = build_tiny_transformer(0)
    plan = slice_adapter.plan(model, SliceConfig(fraction=0.1, slice_id=3))
    assert n == plan.selected and report["total_params"] == sum(p.numel() for p in model.parameters())
    assert report["per_block"]["min"] == min(s for s, _ in plan.per_block.values())


@pytest.mark.parametrize("fraction,slice_id,targets", [(0.25, 2, None), (0.01, 7, ["to_q", "ffn.net.0.proj"])])
def test_plan_from_a_checkpoint_equals_plan_from_the_config(tmp_path, fraction, slice_id, targets):
    state = tiny_state(0)
    wan_file = save_base(state, tmp_path / "wan.safetensors", "wan", "model.diffusion_model.")
    folder = save_sharded(state, tmp_path / "transformer", shards=2)  # no config.json: read from the headers
    configured = save_sharded(state, tmp_path / "configured", shards=2, config=TINY_TRANSFORMER_CONFIG)
    want = plan_report(TINY_TRANSFORMER_CONFIG, fraction, slice_id, target_modules=targets)
    for source in (wan_file, folder, configured):
        got = plan_report(source, fraction, slice_id, target_modules=targets)
        for key in ("total_params", "targeted_params", "trainable_params", "per_block", "bytes", "fingerprint"):
            assert got[key] == want[key], key
    model = build_tiny_transformer(0)
    assert want["trainable_params"] == slice_adapter.plan(
        model, SliceConfig(fraction=fraction, slice_id=slice_id, target_modules=targets)).selected


def test_plan_cli_json_is_one_object_and_aliases_work(tmp_path):
    config = {"_class_name": "WanTransformer3DModel", **TINY_TRANSFORMER_CONFIG}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run_script("plan_slices.py", "--model", tmp_path, "--ff", "0.1", "--ffid", "4", "--seed", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole stdout is one JSON object
    assert (report["fraction"], report["slice_id"], report["seed"]) == (0.1, 4, 2)
    assert report["trainable_params"] == plan_report(TINY_TRANSFORMER_CONFIG, 0.1, 4, 2)["trainable_params"]


def test_plan_cli_text_and_errors(capsys):
    main = cli("plan_slices.py").main
    assert main(["--model", "wan2.1-t2v-1.3b", "--fraction", "0.001", "--slice_id", "1"]) == 0
    text = capsys.readouterr().out
    assert "1,418,996,800 parameters" in text and "VRAM est." in text
    assert main(["--model", "wan2.1-t2v-1.3b", "--ff", "1.5"]) == 2
    assert "fraction must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["--model", "wan2.1-t2v-1.3b", "--ff", "0.5", "--ffid", "2"]) == 2
    assert "slice_id must be an integer in [0, 1]" in capsys.readouterr().err
    assert main(["--model", "wan9-t2v", "--ff", "0.1"]) == 2
    assert "neither a known Wan model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0 and "--ffid" in capsys.readouterr().out


@pytest.fixture(scope="module")
def three_slices(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    return {
        "half": make_slice(root / "half", 0.5, 1),
        "quarter": make_slice(root / "quarter", 0.25, 3),  # slice 3 at f/2 lies inside slice 1 at f
        "other": make_slice(root / "other", 0.5, 0),
        "partial": make_slice(root / "partial", 0.3, 1),  # ranks [0.3, 0.6) meet [0.5, 1) of "half"
    }


def test_inspect_counts_norms_and_spread(three_slices):
    report = inspect_report(three_slices["quarter"])
    model = build_tiny_transformer(0)
    plan = slice_adapter.plan(model, SliceConfig(fraction=0.25, slice_id=3))
    assert report["selected_weights"] == plan.selected and report["targeted_weights"] == plan.targeted
    assert report["per_block"]["selected"] == {str(b): s for b, (s, _) in plan.per_block.items()}
    deltas = slice_adapter.deltas.slice_deltas(three_slices["quarter"])
    q = np.concatenate([deltas[f"blocks.{b}.attn1.to_q.weight"][1] for b in (0, 1)]).astype(np.float64)
    kind = report["kinds"]["blocks.*.attn1.to_q.weight"]
    assert kind["weights"] == len(q) and kind["l2"] == pytest.approx(math.sqrt(np.dot(q, q)), rel=1e-12)
    assert kind["max_abs"] == pytest.approx(np.abs(q).max())
    assert report["nonzero_deltas"] == plan.selected  # random init: every delta is nonzero
    assert report["config"]["fraction"] == 0.25 and report["config"]["num_slices"] == 4


def test_inspect_counts_shared_weights_exactly(three_slices):
    model = build_tiny_transformer(0)
    cfg = {k: SliceConfig(fraction=f, slice_id=i) for k, (f, i) in
           {"half": (0.5, 1), "quarter": (0.25, 3), "other": (0.5, 0), "partial": (0.3, 1)}.items()}
    nested = inspect_report(three_slices["quarter"], overlap_with=three_slices["half"])["overlap"]
    assert nested["shared_weights"] == slice_adapter.plan(model, cfg["quarter"]).selected  # nested: all of it
    assert nested["percent_of_this_slice"] == 100.0 and nested["same_layout"]
    assert inspect_report(three_slices["half"], overlap_with=three_slices["other"])["overlap"]["shared_weights"] == 0
    unrelated = inspect_report(three_slices["partial"], overlap_with=three_slices["half"])["overlap"]["shared_weights"]
    assert unrelated == slice_adapter.overlap(model, cfg["partial"], cfg["half"]) and unrelated > 0


def test_inspect_cli_and_refusals(tmp_path, three_slices, capsys):
    main = cli("inspect_slice.py").main
    assert main([str(three_slices["quarter"]), "--overlap", str(three_slices["half"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overlap"]["shared_weights"] == report["selected_weights"]
    assert main([str(three_slices["half"])]) == 0
    text = capsys.readouterr().out
    assert "blocks.*.ffn.net.2.weight" in text and "per block (2 blocks)" in text
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((three_slices["half"] / "adapter_config.json").read_text())
    assert main([str(broken)]) == 2
    assert "has no adapter_model.safetensors" in capsys.readouterr().err
    values = broken / "adapter_model.safetensors"
    values.write_bytes((three_slices["half"] / "adapter_model.safetensors").read_bytes()[:50])
    assert main([str(broken)]) == 2
    assert "truncated" in capsys.readouterr().err
    values.write_bytes((three_slices["quarter"] / "adapter_model.safetensors").read_bytes())
    assert main([str(broken)]) == 2
    assert "belongs to another slice" in capsys.readouterr().err
