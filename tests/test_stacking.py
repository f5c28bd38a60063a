"""Stacking concepts: the concept ledger (slice folder -> merge -> merged file -> inspect), `--ffid auto`,
`--preserve_previous`, and preservation in the trainer (cache, resume, logging), on the tiny Wan (CPU, offline)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import slice_adapter
import train_slice_ft
from slice_adapter import SliceConfig, ledger
from slice_adapter.merge import merge_slices
from slice_adapter.selection import recorded_tile_order
from slice_ft.corpus import generate_corpus
from slice_ft.preservation_set import draw_indices
from slice_ft.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer

from slice_checkpoints import cli, make_slice, save_base, tiny_state
from test_train import slice_values, train

PRESERVE = ["--preserve_samples", "3", "--preserve_num_inference_steps", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, num_images=3, num_videos=1, size=[(48, 32)], num_frames=5, seed=4)
    return root


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


# --- the ledger through merges and inspect ----------------------------------------------------------------------


def test_ledger_round_trips_from_slice_folder_through_two_stacked_merges_to_inspect(tmp_path, capsys):
    a = make_slice(tmp_path / "a", 0.25, 1)
    ledger.write_concept(a, ledger.concept_record(["sks_a a red circle", "sks_a a red circle at night"],
                                                  "concept_prompts"), fraction=0.25, slice_id=1, seed=0)
    b = make_slice(tmp_path / "b", 0.25, 2)
    ledger.write_concept(b, ledger.concept_record(["sks_b blue stripes"], "training_captions"), fraction=0.25,
                         slice_id=2, seed=0)
    base = save_base(tiny_state(0), tmp_path / "base.safetensors", "wan", "model.diffusion_model.")
    assert ledger.read_ledger(base) == []  # an original file has no ledger

    one = merge_slices(base, [a], tmp_path / "one.safetensors", progress=False).output
    two = merge_slices(one, [b], tmp_path / "two.safetensors", progress=False).output
    [rec_a] = ledger.read_ledger(one)
    assert rec_a["concept"] == {"prompts": ["sks_a a red circle", "sks_a a red circle at night"],
                                "source": "concept_prompts"}
    assert (rec_a["fraction"], rec_a["slice_id"], rec_a["seed"]) == (0.25, 1, 0)
    records = ledger.read_ledger(two)
    assert [r["slice_id"] for r in records] == [1, 2]  # the base's record kept, the new one appended
    assert records[0] == rec_a and records[1]["concept"]["prompts"] == ["sks_b blue stripes"]
    assert ledger.ledger_prompts(records) == ["sks_a a red circle", "sks_a a red circle at night",
                                              "sks_b blue stripes"]

    main = cli("inspect_slice.py").main
    assert main([str(two), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ledger"] == records
    assert main([str(two)]) == 0
    text = capsys.readouterr().out
    assert "2 slice(s) in the ledger" in text and "sks_b blue stripes" in text and "slice_id 1" in text
    assert main([str(a), "--json"]) == 0  # a slice folder: its report with its own record
    assert json.loads(capsys.readouterr().out)["ledger"][0]["concept"] == rec_a["concept"]
    assert main([str(base)]) == 0
    assert "no concept ledger" in capsys.readouterr().out


def test_ffid_auto_takes_the_lowest_id_overlapping_no_merged_slice_and_refuses_when_none_is_free(tmp_path):
    base = save_base(tiny_state(0), tmp_path / "base.safetensors", "diffusers")
    one = merge_slices(base, [make_slice(tmp_path / "s0", 0.25, 0)], tmp_path / "one.safetensors",
                       progress=False).output
    assert ledger.free_slice_id(base, 0.25)[0] == 0
    assert ledger.free_slice_id(one, 0.25)[0] == 1
    # another fraction: exact overlap decides (slices 0 and 1 at 1/8 are the halves of slice 0 at 1/4)
    assert ledger.free_slice_id(one, 0.125)[0] == 2
    model = build_tiny_transformer(0)
    picked = ledger.free_slice_id(one, 0.3)[0]
    assert slice_adapter.overlap(model, SliceConfig(fraction=0.3, slice_id=picked),
                                 SliceConfig(fraction=0.25, slice_id=0)) == 0
    assert all(slice_adapter.overlap(model, SliceConfig(fraction=0.3, slice_id=i),
                                     SliceConfig(fraction=0.25, slice_id=0)) > 0 for i in range(picked))

    full = merge_slices(base, [make_slice(tmp_path / "h0", 0.5, 0), make_slice(tmp_path / "h1", 0.5, 1)],
                        tmp_path / "full.safetensors", progress=False).output
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"_class_name": "WanTransformer3DModel", **TINY_TRANSFORMER_CONFIG}))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--ffid auto: every one of the 2 slice ids at fraction 0.5 .*overlaps"):
        train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--transformer_file", str(full), "--transformer_config",
                                   str(cfg), "--ff", "0.5", "--ffid", "auto", "--output_dir", str(out)])
    assert not out.exists()


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, match", [
    (["--preserve_previous"], r"--preserve_previous: the base the tiny random model has no concept ledger.*"
                              r"--preserve_prompts"),
    (["--preserve_prompts", "MISSING.txt"], r"--preserve_prompts '.*MISSING.txt': no such prompts file"),
    (["--preserve_prompts", "EMPTY.txt"], r"--preserve_prompts '.*EMPTY.txt' holds no prompt"),
    (["--concept_prompts", "EMPTY.txt"], r"--concept_prompts '.*EMPTY.txt' holds no prompt"),
    (["--preserve_prompts", "a cat", "--preserve_samples", "0"], r"--preserve_samples must be >= 1 .* got 0"),
    (["--preserve_previous", "--preserve_samples", "0"], r"--preserve_samples must be >= 1"),
    (["--preserve_prompts", "a cat", "--preserve_batch_size", "0"], r"--preserve_batch_size must be >= 1, got 0"),
    (["--preserve_prompts", "a cat", "--preserve_weight", "0"], r"--preserve_weight must be > 0"),
    (["--ffid", "two"], None),
])
def test_bad_preservation_flags_are_refused_before_anything_is_loaded_or_written(tmp_path, flags, match):
    (tmp_path / "EMPTY.txt").write_text("\n   \n")
    flags = [f.replace("MISSING.txt", str(tmp_path / "MISSING.txt")).replace("EMPTY.txt", str(tmp_path / "EMPTY.txt"))
             for f in flags]
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--output_dir", str(out), *flags]
    if match is None:  # argparse's own refusal: exit 2 with a usage line
        with pytest.raises(SystemExit) as err:
            train_slice_ft.parse_args(argv)
        assert err.value.code == 2
    else:
        with pytest.raises(ValueError, match=match):
            train_slice_ft.parse_args(argv)
    assert not out.exists()


def test_preserve_previous_on_an_original_wan_file_names_the_fix(tmp_path):
    base = save_base(tiny_state(0), tmp_path / "wan.safetensors", "wan", "model.diffusion_model.")
    with pytest.raises(ValueError, match=r"the base '.*wan.safetensors' has no concept ledger.*--preserve_prompts"):
        train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--transformer_file", str(base), "--preserve_previous"])


def test_preserve_previous_on_a_file_merged_before_the_ledger_names_the_fix(tmp_path):
    base = save_base(tiny_state(0), tmp_path / "base.safetensors", "diffusers")
    old = merge_slices(base, [make_slice(tmp_path / "s1", 0.25, 1)], tmp_path / "old.safetensors",
                       progress=False).output  # the slice folder has no concept.json
    assert [r["concept"] for r in ledger.read_ledger(old)] == [None]
    with pytest.raises(ValueError, match=r"records 1 merged slice\(s\) but no concept prompts.*--preserve_prompts"):
        train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--transformer_file", str(old), "--preserve_previous"])
    # the ids are still known: --ffid auto avoids slice 1 without any concept recorded
    args = train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--transformer_file", str(old), "--ff", "0.25",
                                      "--ffid", "auto", "--preserve_prompts", "sks_a a cat"])
    assert (args.slice_id, args.preserve_prompt_list) == (0, ["sks_a a cat"])


def test_help_lists_the_stacking_flags(capsys):
    with pytest.raises(SystemExit):
        train_slice_ft.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--concept_prompts", "--preserve_prompts", "--preserve_previous", "--preserve_dataset",
                 "--preserve_samples", "--preserve_batch_size", "--preserve_weight", "--preserve_loss", "'auto'"):
        assert flag in text, flag


def test_prompt_flags_take_a_file_or_inline_prompts(tmp_path):
    prompts = tmp_path / "earlier.txt"
    prompts.write_text("sks_a a red circle\n\n  sks_b blue stripes  \n")
    args = train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--preserve_prompts", str(prompts),
                                      "--concept_prompts", "sks_c green noise", "sks_c green noise, close up"])
    assert args.preserve_prompt_list == ["sks_a a red circle", "sks_b blue stripes"]
    assert args.concept_prompt_list == ["sks_c green noise", "sks_c green noise, close up"]
    assert args.preserve_batch_size is None and args.preserve_loss == "distill" and args.preserve_samples == 32


def test_preservation_batches_split_over_processes_like_one_global_batch():
    one = draw_indices([5, 3], 4, seed=1, step=7, micro=0)
    assert one == draw_indices([5, 3], 4, seed=1, step=7, micro=0)  # keyed by the step: a resumed run redraws it
    group, idx = one
    assert len(idx) == 4 and len(set(idx)) == 4 and all(0 <= i < [5, 3][group] for i in idx)
    draws = {draw_indices([5, 3], 4, seed=1, step=s, micro=0) [0] for s in range(40)}
    assert draws == {0, 1}  # both groups are drawn
    _, wrapped = draw_indices([2], 5, seed=0, step=0, micro=0)
    assert sorted(wrapped[:2]) == [0, 1] and sorted(wrapped[2:4]) == [0, 1]  # every clip once before any repeats


# --- preservation in the trainer --------------------------------------------------------------------------------


def test_preservation_logs_its_loss_writes_the_slice_and_reuses_or_regenerates_its_cache(tmp_path, corpus, caplog,
                                                                                          monkeypatch):
    import slice_ft.preservation as pres

    calls = []
    real_generate = pres.generate_preservation_latents

    def counting_generate(*a, **k):
        calls.append(k["num_samples"])
        return real_generate(*a, **k)

    monkeypatch.setattr(pres, "generate_preservation_latents", counting_generate)
    cache = tmp_path / "cache"
    flags = ["--max_train_steps", "3", "--preserve_prompts", "sks_a a red circle", "sks_b blue stripes",
             *PRESERVE, "--cache_dir", cache, "--report_to", "tensorboard"]
    first = train(tmp_path / "a", *flags, dataset=corpus)
    assert calls == [3]
    ploss = first["preservation_losses"]
    assert len(ploss) == 3 and ploss[0] == 0.0  # distill: the student is the teacher until the slice moves
    assert all(np.isfinite(ploss)) and ploss[-1] > 0
    assert first["preservation"]["generated"] and first["preservation"]["clips"] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(first["outputs"]["tensorboard"]).Reload()
    assert [e.value for e in events.Scalars("preservation_loss")] == pytest.approx(ploss)
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(first["losses"])
    concept = json.loads((tmp_path / "a" / "slice" / "concept.json").read_text())
    assert concept["concept"]["source"] == "training_captions" and concept["slice_id"] == 1
    assert set(concept["concept"]["prompts"]) == {json.loads(line)["text"]
                                                  for line in (corpus / "metadata.jsonl").read_text().splitlines()}

    with caplog.at_level(logging.INFO):
        second = train(tmp_path / "b", *flags, dataset=corpus)
    assert calls == [3]  # read from the cache, not generated again
    assert any("preservation set: 3 clips of 2 prompt(s) read from" in m for m in messages(caplog))
    assert second["losses"] == first["losses"] and second["preservation_losses"] == ploss

    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(tmp_path / "c", *flags[:-6], "--preserve_samples", "2", "--preserve_num_inference_steps", "2",
              "--cache_dir", cache, dataset=corpus)
    assert calls == [3, 2]
    assert any("was made for other settings" in m and "regenerating" in m for m in messages(caplog))


def test_resume_with_preservation_on_a_swapped_offloaded_fp8_base_ends_bit_identical(tmp_path, corpus, monkeypatch):
    flags = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--gradient_accumulation_steps", "2",
             "--preserve_prompts", "sks_a a red circle", *PRESERVE, "--preserve_batch_size", "2",
             "--preserve_loss", "distill", "--gradient_checkpointing", "--blocks_to_swap", "1",
             "--gradient_checkpointing_cpu_offload", "--base_dtype", "fp8"]
    straight = train(tmp_path / "straight", *flags, dataset=corpus)
    assert straight["preservation_losses"][-1] > 0

    class Stop(Exception):
        pass

    real_save = train_slice_ft.save_checkpoint

    def save_then_crash(*a, **kw):
        real_save(*a, **kw)
        raise Stop

    monkeypatch.setattr(train_slice_ft, "save_checkpoint", save_then_crash)
    with pytest.raises(Stop):
        train(tmp_path / "resumed", *flags, dataset=corpus)
    monkeypatch.setattr(train_slice_ft, "save_checkpoint", real_save)
    resumed = train(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest", dataset=corpus)
    assert resumed["preservation_losses"] == straight["preservation_losses"][1:]
    a, b = slice_values(tmp_path / "straight"), slice_values(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_concept_on_the_merged_first_preserves_its_concept_in_a_free_slice(tmp_path, corpus, caplog):
    first = train(tmp_path / "one", "--max_train_steps", "2", "--save_merged", "--concept_prompts",
                  "sks_a a red circle", "sks_a a red circle, close up", dataset=corpus)
    merged = Path(first["outputs"]["merged"])
    argv = ["--pretrained_model_name_or_path", "tiny", "--transformer_file", str(merged), "--ff", "0.25",
            "--ffid", "auto", "--preserve_previous", "--dataset_name", str(corpus)]
    args = train_slice_ft.parse_args(argv)
    assert args.preserve_prompt_list == ["sks_a a red circle", "sks_a a red circle, close up"]
    assert args.slice_id == 0  # slice 1 is baked in; 0 is the lowest free id

    with caplog.at_level(logging.INFO):
        second = train(tmp_path / "two", "--max_train_steps", "2", "--transformer_file", merged, "--ffid", "auto",
                       "--preserve_previous", *PRESERVE, "--preserve_loss", "flow", "--save_merged",
                       "--concept_prompts", "sks_b blue stripes", dataset=corpus)
    assert any("--ffid auto: slice 0 at fraction 0.25" in m for m in messages(caplog))
    assert second["preservation"]["generated"] and len(second["preservation_losses"]) == 2
    records = ledger.read_ledger(second["outputs"]["merged"])
    assert [(r["slice_id"], r["concept"]["prompts"]) for r in records] == [
        (1, ["sks_a a red circle", "sks_a a red circle, close up"]), (0, ["sks_b blue stripes"])]
    with safe_open(second["outputs"]["merged"], "pt") as f:
        assert json.loads(f.metadata()[ledger.LEDGER_KEY]) == records


def test_two_processes_generate_their_shares_and_match_one_process_with_the_same_preservation_batch(tmp_path):
    from test_train import DDP_ON_CPU, _reset_accelerate, launch, two_step_run_flags

    common = [*two_step_run_flags(tmp_path), "--preserve_prompts", "sks_a a red circle", "sks_b blue stripes",
              *PRESERVE]
    stderr = launch("multi_gpu_ddp.yaml", 2, *common, "--output_dir", tmp_path / "two", "--train_batch_size", "1",
                    "--preserve_batch_size", "1", "--cache_dir", tmp_path / "cache", launcher_args=DDP_ON_CPU)
    assert "generating 3 preservation clips" in stderr

    _reset_accelerate()
    one_args = train_slice_ft.parse_args(common + ["--output_dir", str(tmp_path / "one"), "--train_batch_size", "2",
                                                   "--preserve_batch_size", "2"])
    result = train_slice_ft.main(one_args)  # no cache: it generates the whole set itself
    assert result["preservation"]["generated"] and result["preservation_losses"][-1] > 0
    with safe_open(str(tmp_path / "cache" / "preservation" / "preservation_set.safetensors"), "pt") as f:
        assert f.get_tensor("latents").shape[0] == 3  # both shares gathered
    one, two = slice_values(tmp_path / "one"), slice_values(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_real_clips_of_earlier_concepts_are_a_separate_preservation_batch(tmp_path, corpus, monkeypatch):
    import slice_ft.preservation as pres

    def no_generation(*a, **k):
        raise AssertionError("real clips need no generated set")

    monkeypatch.setattr(pres, "generate_preservation_latents", no_generation)
    earlier = tmp_path / "earlier"
    generate_corpus(earlier, num_images=3, num_videos=0, size=[(48, 32), (32, 48)], seed=9)
    result = train(tmp_path / "out", "--max_train_steps", "3", "--preserve_dataset", earlier, "--preserve_loss",
                   "flow", "--preserve_batch_size", "2", dataset=corpus)
    assert result["preservation"] == {"clips": 3, "groups": 2, "generated": False, "batch_size": 2, "mode": "flow",
                                      "weight": 1.0}
    assert len(result["preservation_losses"]) == 3 and all(x > 0 for x in result["preservation_losses"])
    assert len(result["losses"]) == 3  # the main batches are the training data's alone


def test_the_flag_choices_are_the_library_modes():
    from slice_ft import choices, preservation

    assert choices.PRESERVATION_LOSSES == preservation.LOSS_MODES


def test_a_new_slice_takes_the_tile_order_of_the_slices_merged_into_its_base(tmp_path):
    """Slices of one fraction and seed are disjoint by id only within one tile order: a run on a base whose ledger
    records scattered slices (saved before the banded order) trains a scattered slice, and `--ffid auto` picks an
    id disjoint from them by that rule."""
    base = save_base(tiny_state(0), tmp_path / "base.safetensors", "diffusers")
    old = merge_slices(base, [make_slice(tmp_path / "s0", 0.25, 0, tile_order="scattered")],
                       tmp_path / "old.safetensors", progress=False).output
    [record] = ledger.read_ledger(old)
    assert recorded_tile_order(record) == "scattered"
    assert recorded_tile_order({k: v for k, v in record.items() if k != "tile_order"}) == "scattered"
    assert ledger.ledger_tile_order([record]) == "scattered" and ledger.ledger_tile_order([]) == "scattered"
    assert ledger.free_slice_id(old, 0.25)[0] == 1
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"_class_name": "WanTransformer3DModel", **TINY_TRANSFORMER_CONFIG}))
    common = ["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--transformer_config", str(cfg),
              "--ff", "0.25", "--output_dir", str(tmp_path / "out")]
    args = train_slice_ft.parse_args(common + ["--transformer_file", str(old), "--ffid", "auto"])
    assert (args.slice_tile_order, args.slice_id) == ("scattered", 1)
    new = merge_slices(base, [make_slice(tmp_path / "b0", 0.25, 0, tile_order="banded")], tmp_path / "new.safetensors",
                       progress=False).output
    assert train_slice_ft.parse_args(common + ["--transformer_file", str(new), "--ffid", "2"]).slice_tile_order == \
        "banded"
