"""End-to-end tests of train_slice_ft.py on the tiny embedded Wan (CPU, offline).

Runs call `main()` in this process (accelerate's state reset between runs); only the two-process run is a
subprocess (`accelerate launch`). W&B runs offline and the test reads the run's `.wandb` records.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_slice_ft
from slice_ft.corpus import generate_corpus, write_corrupt_file

REPO = Path(__file__).resolve().parents[1]
ISSUE_FLAGS = (
    "--pretrained_model_name_or_path --output_dir --seed --mixed_precision --gradient_checkpointing --learning_rate "
    "--lr_scheduler --lr_warmup_steps --max_train_steps --num_train_epochs --train_batch_size "
    "--gradient_accumulation_steps --max_grad_norm --checkpointing_steps --checkpoints_total_limit "
    "--resume_from_checkpoint --report_to --tracker_project_name --validation_prompts --validation_steps --ff --ffid "
    "--slice_fraction --slice_id --slice_seed --timestep_sampling --discrete_flow_shift --min_timestep --max_timestep "
    "--config --transformer_file --expert --save_merged --cache_dir --optimizer --weighting_scheme --blocks_to_swap "
    "--base_dtype --dataset_name --image_column --video_column --caption_column --bucket_resolutions "
    "--bucket_frame_counts --boundary_ratio --compile --dataloader_num_workers"
).split()


# --- helpers ------------------------------------------------------------------------------------------------------


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(output_dir, *flags, dataset=None):
    """Run the recipe in this process with small tiny-model defaults; `flags` override them."""
    _reset_accelerate()
    base = ["--pretrained_model_name_or_path", "tiny", "--output_dir", str(output_dir), "--report_to", "none",
            "--bucket_resolutions", "48x32,32x48", "--bucket_frame_counts", "1,5", "--ff", "0.25", "--ffid", "1",
            "--learning_rate", "1e-2", "--checkpointing_steps", "1000"]
    if dataset is not None:
        base += ["--dataset_name", str(dataset)]
    return train_slice_ft.main(train_slice_ft.parse_args(base + [str(f) for f in flags]))


def slice_values(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "slice" / "adapter_model.safetensors"))


def wandb_records(path):
    """Records of a `.wandb` file (W&B's leveldb-style log: 7-byte header, 32 KiB blocks, chunked records)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_history_and_config(run_dir):
    files = glob.glob(str(Path(run_dir) / "run-*.wandb"))
    assert len(files) == 1, files
    history, config = [], {}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return history, config


def bf16_single_file_base(tmp_path, seed):
    """A tiny transformer saved as one bf16 file with original Wan keys, and a folder with its config.json."""
    from slice_ft.models import save_transformer_state_dict
    from slice_ft.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer

    base = build_tiny_transformer(seed)
    sd = {k: (v.to(torch.bfloat16) if k.endswith("weight") and v.ndim == 2 else v) for k, v in base.state_dict().items()}
    ckpt = save_transformer_state_dict(sd, tmp_path / "wan_tiny.safetensors", "wan", "model.diffusion_model.")
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **TINY_TRANSFORMER_CONFIG}))
    return sd, ckpt, cfg_dir


def assert_merged_is_base_file_plus_slice(sd, ckpt, cfg_dir, output_dir):
    """output_dir/merged/ is exactly output_dir/slice baked into the file `ckpt` (rounded once to its dtypes)."""
    import slice_adapter
    from slice_ft.models import load_transformer
    from slice_ft.outputs import merged_state_dict

    model, _ = load_transformer(None, transformer_file=ckpt, config=str(cfg_dir))
    slice_adapter.load_adapter(model, Path(output_dir) / "slice")
    slice_adapter.merge_adapters(model)
    want = merged_state_dict(model)
    merged, info = load_transformer(None, transformer_file=Path(output_dir) / "merged" / Path(ckpt).name,
                                    config=str(cfg_dir))
    assert (info["key_format"], info["prefix"]) == ("wan", "model.diffusion_model.")
    got = merged.state_dict()
    assert all(torch.equal(got[k].to(sd[k].dtype), want[k].to(sd[k].dtype)) for k in want)
    assert any(not torch.equal(got[k], sd[k].to(got[k].dtype)) for k in sd if k.startswith("blocks."))  # it trained


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 images and 2 five-frame videos in two aspect ratios, captions in metadata.jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, num_images=4, num_videos=2, size=[(48, 32), (32, 48)], num_frames=5, seed=3)
    return root


# --- flags and config ---------------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_slice_ft.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    missing = [flag for flag in ISSUE_FLAGS if flag not in text]
    assert not missing, f"--help does not list {missing}"


def test_yaml_keys_are_flag_names_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("ff: 0.5\nffid: 1\nlearning_rate: 2e-3\nmax_train_steps: 7\ngradient_checkpointing: true\n"
                   "validation_prompts: [a red circle, blue stripes]\ndataset_name: somewhere\n"
                   "pretrained_model_name_or_path: tiny\n")
    args = train_slice_ft.parse_args(["--config", str(cfg), "--learning_rate", "1e-3", "--ffid", "0"])
    assert (args.slice_fraction, args.slice_id, args.max_train_steps) == (0.5, 0, 7)
    assert args.learning_rate == 1e-3 and args.gradient_checkpointing is True
    assert args.validation_prompts == ["a red circle", "blue stripes"]

    cfg.write_text("dataset_name: somewhere\nlearning_rat: 1e-3\n")
    with pytest.raises(ValueError, match="unknown key 'learning_rat'.*did you mean 'learning_rate'"):
        train_slice_ft.parse_args(["--config", str(cfg)])
    cfg.write_text("dataset_name: somewhere\noptimizer: sgd\n")
    with pytest.raises(ValueError, match="'optimizer'.*'sgd'.*adamw"):
        train_slice_ft.parse_args(["--config", str(cfg)])


# --- the demo -----------------------------------------------------------------------------------------------------


def test_demo_config_trains_writes_every_output_and_logs_to_wandb(tmp_path, capsys):
    out = tmp_path / "demo"
    _reset_accelerate()
    args = train_slice_ft.parse_args(["--config", str(REPO / "configs" / "demo.yaml"), "--output_dir", str(out),
                                      "--cache_dir", str(out / "cache"), "--max_train_steps", "30"])
    assert args.report_to == "wandb" and args.save_merged and args.generate_demo_corpus
    result = train_slice_ft.main(args)

    losses = np.array(result["losses"])
    assert len(losses) == 30
    assert losses[-8:].mean() < 0.85 * losses[:8].mean(), f"loss did not fall: {losses.round(3)}"

    assert (out / "demo_corpus" / "metadata.jsonl").is_file()
    assert (out / "slice" / "adapter_config.json").is_file()
    sample = out / "samples" / "step-30-0.mp4"
    import av

    with av.open(str(sample)) as video:
        assert sum(1 for _ in video.decode(video=0)) == args.validation_num_frames

    # merged = tiny base + slice, as a diffusers transformer folder
    from diffusers import WanTransformer3DModel

    import slice_adapter
    from slice_ft.tiny import build_tiny_transformer

    merged = WanTransformer3DModel.from_pretrained(str(out / "merged"))
    expected = build_tiny_transformer(0)
    slice_adapter.load_adapter(expected, out / "slice")
    slice_adapter.merge_adapters(expected)
    from slice_ft.outputs import merged_state_dict

    want = merged_state_dict(expected)
    got = merged.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], v) for k, v in build_tiny_transformer(0).state_dict().items())

    printed = capsys.readouterr().out
    for name in ("slice", "merged", "samples", "wandb"):
        assert f"  {name}" in printed, printed

    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    history, config = wandb_history_and_config(runs[0])
    assert config["slice_fraction"] == 0.25 and config["pretrained_model_name_or_path"] == "tiny"
    steps = [h for h in history if "loss" in h]
    assert [h["_step"] for h in steps] == list(range(1, 31))
    assert np.allclose([h["loss"] for h in steps], losses)
    for key in ("lr", "grad_norm", "step_time", "samples_per_sec"):
        assert all(np.isfinite(h[key]) and h[key] >= 0 for h in steps), key
    assert steps[0]["lr"] == pytest.approx(args.learning_rate)
    videos = [h for h in history if h.get("validation/_type") == "videos"]
    assert videos and videos[-1]["validation/count"] == 1


# --- checkpoints --------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@pytest.mark.parametrize("low_memory", [["--dataloader_num_workers", "2"], [
    "--gradient_checkpointing", "--blocks_to_swap", "1", "--gradient_checkpointing_cpu_offload", "--base_dtype", "fp8",
    "--optimizer", "adamw8bit", "--optimizer_args", "min_8bit_size=0"]], ids=["plain", "swapped-fp8-adamw8bit"])
def test_resume_from_latest_ends_bit_identical_to_an_uninterrupted_run(tmp_path, corpus, monkeypatch, low_memory):
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "3", "--checkpoints_total_limit", "1",
             "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear",
             "--lr_warmup_steps", "2", "--timestep_sampling", "logit_normal", *low_memory]
    train(tmp_path / "straight", *flags, dataset=corpus)

    real_save = train_slice_ft.save_checkpoint

    def save_then_crash(accelerator, output_dir, step, *a, **kw):
        path = real_save(accelerator, output_dir, step, *a, **kw)
        raise _Stop(path)

    monkeypatch.setattr(train_slice_ft, "save_checkpoint", save_then_crash)
    with pytest.raises(_Stop):
        train(tmp_path / "resumed", *flags, dataset=corpus)
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (tmp_path / "resumed" / "slice").exists()
    monkeypatch.setattr(train_slice_ft, "save_checkpoint", real_save)

    result = train(tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest", dataset=corpus)
    assert len(result["losses"]) == 3  # steps 4..6 only
    straight, resumed = slice_values(tmp_path / "straight"), slice_values(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(straight[k].abs().sum() > 0 for k in straight)
    # --checkpoints_total_limit 1: only the newest checkpoint is left
    assert [p.name for p in (tmp_path / "resumed").glob("checkpoint-*")] == ["checkpoint-6"]


# --- distributed --------------------------------------------------------------------------------------------------


# the DDP config's launch as the tests run it: one machine, float32, no dynamo
DDP_ON_CPU = ("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")


def launch(config: str, num_processes: int, *flags, timeout: int = 300, launcher_args=()) -> str:
    """`accelerate launch --config_file configs/accelerate/CONFIG --num_processes N [LAUNCHER_ARGS]
    train_slice_ft.py FLAGS` on a free port; returns its stderr (the log), failing the test on a non-zero exit or
    after `timeout` s (then the launcher and every worker are killed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    with socket.socket() as sock:  # a free port: other test runs may hold accelerate's default one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / config), "--num_processes", str(num_processes),
           "--main_process_port", str(port), *launcher_args, str(REPO / "train_slice_ft.py"), *map(str, flags)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker
        _, stderr = proc.communicate()
        pytest.fail(f"the {num_processes}-process run did not finish in {timeout} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return stderr


def two_step_run_flags(tmp_path) -> list:
    """Flags of a 2-step tiny run on a 4-image corpus (made in tmp_path) that one process and two can both run, the
    global batch and the output dir left to the caller."""
    data = tmp_path / "images"
    generate_corpus(data, num_images=4, num_videos=0, size=(48, 32), seed=5)
    return ["--pretrained_model_name_or_path", "tiny", "--dataset_name", str(data), "--report_to", "none",
            "--bucket_resolutions", "48x32", "--bucket_frame_counts", "1", "--ff", "0.25", "--ffid", "1",
            "--learning_rate", "1e-2", "--max_train_steps", "2", "--checkpointing_steps", "1000",
            "--shuffle_buffer_size", "0"]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    common = two_step_run_flags(tmp_path)
    # the README's command: a config file (or --multi_gpu) is what makes accelerate start N processes without GPUs
    stderr = launch("multi_gpu_ddp.yaml", 2, *common, "--output_dir", tmp_path / "two", "--train_batch_size", "1",
                    timeout=240, launcher_args=DDP_ON_CPU)
    assert "2 process(es) x batch 1" in stderr

    _reset_accelerate()
    train_slice_ft.main(train_slice_ft.parse_args(common + ["--output_dir", str(tmp_path / "one"),
                                                            "--train_batch_size", "2"]))
    one, two = slice_values(tmp_path / "one"), slice_values(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)
    assert any(one[k].abs().sum() > 0 for k in one)


# --- data ---------------------------------------------------------------------------------------------------------


def test_corrupt_and_uncaptioned_files_are_skipped_counted_and_logged(tmp_path, caplog):
    data = tmp_path / "data"
    generate_corpus(data, num_images=3, num_videos=1, size=(48, 32), num_frames=5, seed=1)
    write_corrupt_file(data / "broken.mp4", "truncated")
    write_corrupt_file(data / "noise.png", "garbage")
    with open(data / "metadata.jsonl", "a") as fh:  # captioned, so they fail on decoding, not on the caption
        fh.write(json.dumps({"file_name": "broken.mp4", "text": "a red circle"}) + "\n")
        fh.write(json.dumps({"file_name": "noise.png", "text": "green noise"}) + "\n")
    generate_corpus(tmp_path / "extra", num_images=1, num_videos=0, size=(48, 32), caption_format="none", seed=2)
    (tmp_path / "extra" / "img_0000_red_circles.png").rename(data / "no_caption.png")
    with caplog.at_level(logging.INFO):
        # 4 good files at batch 1: step 5 is in the second epoch, so the whole folder has been read once
        result = train(tmp_path / "out", "--max_train_steps", "5", dataset=data)
    assert result["global_step"] == 5
    skipped = result["skipped"]
    assert set(skipped) == {"no_caption", "unreadable"} and skipped["no_caption"] >= 1 and skipped["unreadable"] >= 2
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"skipped {sum(skipped.values())} unusable files" in m for m in messages), messages
    for name in ("broken.mp4", "noise.png", "no_caption.png"):
        assert any(m.startswith("skipping") and name in m for m in messages), name


def test_two_dataset_folders_train_as_one_epoch(tmp_path, corpus):
    replay = tmp_path / "replay"
    generate_corpus(replay, num_images=2, num_videos=0, size=[(48, 32)], seed=8)
    result = train(tmp_path / "out", "--num_train_epochs", "1", "--dataset_name", corpus, replay)
    assert len(result["losses"]) == 6 + 2  # one step per sample of either folder (batch 1)
    assert train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--dataset_name", "a", "b"]
                                     ).dataset_name == ["a", "b"]


def test_latent_cache_is_reused_without_decoding_media_or_calling_the_encoders(tmp_path, corpus, monkeypatch):
    cache = tmp_path / "cache"
    first = train(tmp_path / "a", "--max_train_steps", "2", "--cache_dir", cache, dataset=corpus)
    files = sorted(cache.rglob("*.safetensors"))
    assert len(list((cache / "latents").glob("*.safetensors"))) == 6
    assert len(list((cache / "text").glob("*.safetensors"))) >= 1

    import slice_ft.encoding
    import slice_ft.training

    def forbidden(*a, **k):
        raise AssertionError("an encoder ran although everything is cached")

    for module in (slice_ft.encoding, slice_ft.training):
        monkeypatch.setattr(module, "encode_videos", forbidden)
        monkeypatch.setattr(module, "encode_prompts", forbidden)
    import slice_ft.data

    decoded = []  # the loader turns a decoding failure into a skipped file, so record calls instead of raising
    monkeypatch.setattr(slice_ft.data, "load_clip", lambda *a, **k: decoded.append(a[0]))
    second = train(tmp_path / "b", "--max_train_steps", "2", "--cache_dir", cache, dataset=corpus)
    assert decoded == []  # neither the cache check nor the training loop decoded a file
    assert sorted(cache.rglob("*.safetensors")) == files
    assert first["losses"] == second["losses"]


def test_low_memory_options_train_the_float32_slice_on_an_fp8_swapped_base(tmp_path, corpus, caplog):
    with caplog.at_level(logging.INFO):
        result = train(tmp_path / "out", "--max_train_steps", "2", "--mixed_precision", "bf16", "--base_dtype", "fp8",
                       "--gradient_checkpointing", "--blocks_to_swap", "1", "--optimizer", "adafactor",
                       "--weighting_scheme", "cosmap", "--report_to", "tensorboard", dataset=corpus)
    assert all(np.isfinite(result["losses"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(result["outputs"]["tensorboard"]).Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(result["losses"])
    values = slice_values(tmp_path / "out")
    assert all(v.dtype == torch.float32 for v in values.values())
    assert any(v.abs().sum() > 0 for v in values.values())
    assert any("fp8 base: 20 block Linear weights" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("flags, match", [
    (["--blocks_to_swap", "2"], r"--blocks_to_swap 2 needs --gradient_checkpointing"),
    (["--gradient_checkpointing_cpu_offload"], r"--gradient_checkpointing_cpu_offload needs --gradient_checkpointing"),
    (["--optimizer_args", "lr"], r"--optimizer_args item 'lr' is not key=value"),
    (["--max_train_steps", "0"], r"--max_train_steps must be >= 1, got 0"),
])
def test_flag_combinations_that_cannot_work_are_refused_before_loading_anything(flags, match):
    with pytest.raises(ValueError, match=match):
        train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", *flags])


def test_adamw8bit_on_an_fp8_swapped_offloaded_base_merges_into_the_full_precision_file(tmp_path, corpus, caplog):
    sd, ckpt, cfg_dir = bf16_single_file_base(tmp_path, seed=5)
    with caplog.at_level(logging.INFO):
        result = train(tmp_path / "out", "--max_train_steps", "2", "--checkpointing_steps", "2", "--transformer_file",
                       ckpt, "--transformer_config", cfg_dir / "config.json", "--mixed_precision", "bf16",
                       "--base_dtype", "fp8", "--gradient_checkpointing", "--gradient_checkpointing_cpu_offload",
                       "--blocks_to_swap", "1", "--optimizer", "adamw8bit", "--save_merged",
                       "--validation_prompts", "a red circle", "--validation_steps", "1", "--validation_num_frames",
                       "5", "--validation_height", "32", "--validation_width", "48",
                       "--validation_num_inference_steps", "2",
                       "--optimizer_args", "min_8bit_size=0", "weight_decay=0.0", dataset=corpus)
    assert all(np.isfinite(result["losses"]))
    # WanPipeline rendered with the swapped fp8 transformer between steps, and training went on afterwards
    assert result["samples"] and all(Path(p).stat().st_size > 0 for p in result["samples"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("activation offload: " in m and " 0.0 MiB" not in m for m in messages), messages
    assert any("fp8 base: 20 block Linear weights" in m for m in messages)

    # bitsandbytes kept 8-bit moments for the slice values (min_8bit_size=0 reached the optimizer)
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.bin", weights_only=False)["state"]
    quant = [s["__bnb_optimizer_quant_state__"] for s in state.values()]  # how bitsandbytes stores its 8-bit state
    assert quant and all(q["state1"].dtype == q["state2"].dtype == torch.uint8 for q in quant)

    # merged = the bf16 file it was trained from + the float32 slice, never the fp8 training copy
    assert_merged_is_base_file_plus_slice(sd, ckpt, cfg_dir, tmp_path / "out")


def test_optimizers_cover_only_the_slice_and_adamw8bit_explains_a_missing_bitsandbytes(monkeypatch):
    from slice_ft.arguments import parse_optimizer_args
    from slice_ft.training import build_optimizer

    params = [torch.nn.Parameter(torch.ones(4, 8))]
    params[0].grad = torch.ones(4, 8)
    for name in ("adamw", "adafactor"):
        opt = build_optimizer(params, name, learning_rate=0.1)
        before = params[0].detach().clone()
        opt.step()
        assert not torch.equal(before, params[0]), name
    assert type(build_optimizer(params, "adamw8bit", learning_rate=0.1)).__name__ == "AdamW8bit"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: `import bitsandbytes` raises ImportError
        with pytest.raises(SystemExit, match="pip install bitsandbytes"):
            build_optimizer(params, "adamw8bit", learning_rate=0.1)
    with pytest.raises(ValueError, match="--optimizer 'sgd' is unknown"):
        build_optimizer(params, "sgd", learning_rate=0.1)

    # --optimizer_args: literals, strings and YAML mappings; they reach the constructor and win over the defaults
    assert parse_optimizer_args(["min_8bit_size=0", "betas=(0.8, 0.9)", "foreach=False", "name=adam", {"eps": 1e-6}]) \
        == {"min_8bit_size": 0, "betas": (0.8, 0.9), "foreach": False, "name": "adam", "eps": 1e-6}
    opt = build_optimizer(params, "adamw", learning_rate=0.1,
                          optimizer_args=parse_optimizer_args(["betas=(0.5,0.6)", "amsgrad=True"]))
    assert opt.defaults["betas"] == (0.5, 0.6) and opt.defaults["amsgrad"] is True
    for bad in ("min_8bit_size", "=3", "2x=1"):
        with pytest.raises(ValueError, match=rf"--optimizer_args item '{bad}' is not key=value"):
            parse_optimizer_args([bad])
    with pytest.raises(ValueError, match=r"--optimizer adamw .*AdamW.* rejected its arguments \['momentum'\]"):
        build_optimizer(params, "adamw", learning_rate=0.1, optimizer_args={"momentum": 0.9})


def test_every_training_config_parses_and_every_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((REPO / "configs").glob("*.yaml")):
        args = train_slice_ft.parse_args(["--config", str(path)])
        assert args.slice_fraction > 0 and args.output_dir, path
    kinds = {p.stem: load_config_from_file(str(p)).distributed_type.value
             for p in (REPO / "configs" / "accelerate").glob("*.yaml")}
    assert kinds == {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP"}  # no DeepSpeed: see README


# --- models -------------------------------------------------------------------------------------------------------


def test_single_file_original_keys_train_and_merge_back_in_the_same_format(tmp_path, corpus):
    sd, ckpt, cfg_dir = bf16_single_file_base(tmp_path, seed=7)

    train(tmp_path / "out", "--max_train_steps", "2", "--transformer_file", ckpt, "--transformer_config",
          cfg_dir / "config.json", "--save_merged", dataset=corpus)
    merged_file = tmp_path / "out" / "merged" / "wan_tiny.safetensors"
    with safe_open(str(ckpt), "pt") as a, safe_open(str(merged_file), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(k.startswith("model.diffusion_model.") for k in b.keys())
        assert "model.diffusion_model.blocks.0.self_attn.q.weight" in b.keys()
        assert all(a.get_tensor(k).dtype == b.get_tensor(k).dtype for k in a.keys())
        changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
    assert changed and all(".blocks." in k for k in changed)

    # the merged file is exactly the trained slice baked into the file it was trained from
    assert_merged_is_base_file_plus_slice(sd, ckpt, cfg_dir, tmp_path / "out")


def test_a_second_slice_stacks_on_the_merged_first_without_touching_it(tmp_path, corpus):
    from slice_ft.models import save_transformer_state_dict
    from slice_ft.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_transformer

    base = save_transformer_state_dict(build_tiny_transformer(3).state_dict(), tmp_path / "base.safetensors", "wan")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"_class_name": "WanTransformer3DModel", **TINY_TRANSFORMER_CONFIG}))
    common = ["--max_train_steps", "2", "--transformer_config", cfg, "--save_merged"]
    train(tmp_path / "one", *common, "--transformer_file", base, "--ffid", "1", dataset=corpus)
    first = tmp_path / "one" / "merged" / "base.safetensors"
    train(tmp_path / "two", *common, "--transformer_file", first, "--ffid", "2", dataset=corpus)
    second = tmp_path / "two" / "merged" / "base.safetensors"

    w0, w1, w2 = (load_file(str(p)) for p in (base, first, second))
    moved_by_1 = sum(int((w0[k] != w1[k]).sum()) for k in w0)
    moved_by_2 = sum(int((w1[k] != w2[k]).sum()) for k in w0)
    both = sum(int(((w0[k] != w1[k]) & (w1[k] != w2[k])).sum()) for k in w0)
    assert moved_by_1 > 0 and moved_by_2 > 0 and both == 0


def _tiny_a14b_pipeline(path, boundary_ratio):
    from diffusers import WanPipeline

    from slice_ft.tiny import build_tiny_components, build_tiny_transformer

    WanPipeline(**build_tiny_components(0), transformer_2=build_tiny_transformer(1),
                boundary_ratio=boundary_ratio).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("expert", ["low", "high"])
def test_wan22_expert_trains_its_transformer_on_its_side_of_the_boundary(tmp_path, corpus, expert):
    pipe = _tiny_a14b_pipeline(tmp_path / "a14b", boundary_ratio=0.6)
    result = train(tmp_path / "out", "--pretrained_model_name_or_path", pipe, "--expert", expert,
                   "--max_train_steps", "4", "--train_batch_size", "2", "--timestep_sampling", "uniform",
                   "--save_merged", dataset=corpus)
    timesteps = np.array(result["timesteps"])
    assert len(timesteps) >= 4  # one per sample; a bucket's last batch may be short
    if expert == "low":
        assert (timesteps < 600).all(), timesteps
    else:
        assert (timesteps >= 600).all() and (timesteps <= 1000).all(), timesteps
    # the merged folder is the trained expert (transformer_2 for low) with the slice baked in
    subfolder = {"low": "transformer_2", "high": "transformer"}[expert]
    merged = load_file(str(tmp_path / "out" / "merged" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(pipe / subfolder / "diffusion_pytorch_model.safetensors"))
    other = load_file(str(pipe / {"low": "transformer", "high": "transformer_2"}[expert] /
                          "diffusion_pytorch_model.safetensors"))
    total = sum(t.numel() for t in base.values())
    same_as_base = sum(int((base[k] == merged[k]).sum()) for k in base)
    same_as_other = sum(int((other[k] == merged[k]).sum()) for k in other)
    assert total > same_as_base > 0.7 * total  # a quarter of the block weights moved, nothing else
    assert same_as_other < 0.1 * total


# --- --compile ----------------------------------------------------------------------------------------------------


def test_compiled_blocks_train_like_eager_and_resume_exactly(tmp_path, corpus):
    """--compile with gradient checkpointing: the slice ends as the eager run's (within float tolerance), and a
    compiled run resumed from its checkpoint ends bit-identical to the uninterrupted compiled run."""
    flags = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--gradient_checkpointing", "--ff", "0.1",
             "--bucket_frame_counts", "1"]
    train(tmp_path / "eager", *flags, dataset=corpus)
    compiled = train(tmp_path / "compiled", *flags, "--compile", dataset=corpus)
    eager_values, compiled_values = slice_values(tmp_path / "eager"), slice_values(tmp_path / "compiled")
    assert eager_values.keys() == compiled_values.keys()
    for k in eager_values:
        torch.testing.assert_close(compiled_values[k], eager_values[k], atol=1e-4, rtol=1e-3)
    assert any(v.abs().sum() > 0 for v in compiled_values.values())

    resumed = train(tmp_path / "resumed", *flags, "--compile", "--resume_from_checkpoint",
                    tmp_path / "compiled" / "checkpoint-2", dataset=corpus)
    assert len(resumed["losses"]) == 1 and resumed["losses"][0] == compiled["losses"][-1]
    resumed_values = slice_values(tmp_path / "resumed")
    assert all(torch.equal(resumed_values[k], compiled_values[k]) for k in compiled_values)


def test_the_compile_module_imports_in_a_fresh_interpreter():
    # it patches torch's functorch config at import: that module must not rely on another import loading it first
    code = "import slice_ft.compile as c; print(sorted(c._RECOMPUTE_INPUTS.changes))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ban_recompute_materialized_backward" in proc.stdout


def test_a_machine_that_cannot_compile_is_told_so_before_anything_loads(monkeypatch):
    import torch._inductor.config as inductor_config

    from slice_ft.compile import CompileUnavailable, check_compile_works

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached kernel would need no compiler
    with pytest.raises(CompileUnavailable, match=r"--compile: .*C\+\+ compiler.*without --compile"):
        check_compile_works("cpu")
