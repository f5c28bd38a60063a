"""FSDP2: the frozen base sharded over 2 processes (CPU, gloo), launched as a user would.

accelerate (1.15) selects FSDP only on accelerators: without a GPU its FSDP config would silently run DDP. So the
trainer shards the frozen base itself (`slice_ft.distributed.shard_model`: torch's `fully_shard` per
WanTransformerBlock + root) on the CPU as on GPUs, and these tests run the real command,
`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 train_slice_ft.py ...`: the same
trainer code path as on GPUs, where only the device and the collective backend (nccl) differ.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_slice_ft
from slice_ft.corpus import generate_corpus
from test_train import (_reset_accelerate, assert_merged_is_base_file_plus_slice, bf16_single_file_base, launch,
                        slice_values)

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ("--pretrained_model_name_or_path", "tiny")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}


def tensorboard_scalars(output_dir, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(output_dir, "logs", "slice-ft")))  # the tracker project's folder
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]


def layer_kind(key: str) -> str:
    """Which slice layer holds a saved value: ParamSlice (scale_shift_table), Elementwise (norms) or Linear."""
    if ".sliced_params." in key:
        return "ParamSlice"
    return "Elementwise" if re.search(r"\.norm\w*\.slice_values\.", key) else "Linear"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step FSDP2 run on 2 processes from a bf16 single-file base (accumulation 2, gradient checkpointing,
    hard clipping, checkpoints every 2 steps, merged output); its resume from checkpoint-2; and the same global
    batch in one process. Adam's epsilon is 1 so an update follows its gradient (bf16 noise on a near-zero gradient
    cannot flip a value's sign), which lets the runs be compared value by value."""
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "images"
    generate_corpus(data, num_images=4, num_videos=0, size=(48, 32), seed=5)
    sd, ckpt, cfg_dir = bf16_single_file_base(root, seed=3)
    common = ["--pretrained_model_name_or_path", "tiny", "--transformer_file", ckpt,
              "--transformer_config", cfg_dir / "config.json", "--dataset_name", data,
              "--report_to", "tensorboard", "--bucket_resolutions", "48x32", "--bucket_frame_counts", "1",
              "--ff", "0.25", "--ffid", "1", "--learning_rate", "1", "--adam_epsilon", "1", "--max_grad_norm", "0.05",
              "--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--gradient_checkpointing", "--shuffle_buffer_size", "0"]
    # no --mixed_precision: the accelerate config's bf16 must reach the trainer
    log = launch("fsdp.yaml", 2, *common, "--output_dir", root / "two", "--train_batch_size", "1", "--save_merged")
    (root / "resumed").mkdir()
    shutil.copytree(root / "two" / "checkpoint-2", root / "resumed" / "checkpoint-2")
    resume_log = launch("fsdp.yaml", 2, *common, "--output_dir", root / "resumed", "--train_batch_size", "1",
                        "--resume_from_checkpoint", "latest")
    _reset_accelerate()
    train_slice_ft.main(train_slice_ft.parse_args(
        [str(f) for f in common] + ["--output_dir", str(root / "one"), "--train_batch_size", "2",
                                    "--mixed_precision", "bf16"]))
    return dict(root=root, log=log, resume_log=resume_log, sd=sd, ckpt=ckpt, cfg_dir=cfg_dir)


def test_the_fsdp_config_runs_fsdp2_on_two_cpu_processes_with_its_mixed_precision(runs):
    log = runs["log"]
    assert log.count("engine: FSDP2 (2 process(es)") == 2, log[-3000:]
    assert "Mixed precision type: bf16" in log
    assert "2 process(es) x batch 1 x 2 accumulation" in log


def test_each_process_holds_about_half_of_the_frozen_base(runs):
    held = {int(r): (int(a.replace(",", "")), int(b.replace(",", ""))) for r, a, b in
            re.findall(r"\[RANK (\d)\] FSDP2: this process holds ([\d,]+) of the ([\d,]+) bytes", runs["log"])}
    assert sorted(held) == [0, 1], runs["log"][-3000:]
    (local0, total), (local1, total1) = held[0], held[1]
    assert total == total1 > 0
    assert 0.4 < local0 / total < 0.6 and 0.4 < local1 / total < 0.6
    assert total <= local0 + local1 <= 1.05 * total  # every weight is held once (plus shard padding)


def test_the_saved_slice_is_the_single_process_slice_and_merges(runs):
    root = runs["root"]
    two, one = slice_values(root / "two"), slice_values(root / "one")
    assert two.keys() == one.keys() and not any("_fsdp" in k or "_checkpoint" in k for k in two)
    configs = [json.loads((root / r / "slice" / "adapter_config.json").read_text()) for r in ("two", "one")]
    assert configs[0]["layout"] == configs[1]["layout"]
    fingerprints = set()
    for r in ("two", "one"):
        with safe_open(str(root / r / "slice" / "adapter_model.safetensors"), "pt") as f:
            fingerprints.add(f.metadata()["slice_fingerprint"])
    assert fingerprints == {configs[0]["layout"]["fingerprint"]}
    # merged/ is the bf16 base file + this slice, written by the FSDP run (load_adapter + merge_adapters agree)
    assert_merged_is_base_file_plus_slice(runs["sd"], runs["ckpt"], runs["cfg_dir"], root / "two")


def test_every_slice_layer_type_trains_and_matches_one_process_with_the_same_global_batch(runs):
    root = runs["root"]
    two, one = slice_values(root / "two"), slice_values(root / "one")
    moved = {layer_kind(k) for k, v in two.items() if v.abs().max() > 0}
    assert moved == {"Linear", "Elementwise", "ParamSlice"}
    assert {layer_kind(k) for k in two} == moved
    for k in one:  # bf16 compute: a few per mille of each tensor's scale
        scale = one[k].abs().max()
        assert scale > 0, k
        if ".to_k.slice_values.bias" in k:
            # softmax ignores a bias shared by every key: its exact gradient is zero and what it gets is bf16
            # rounding noise, so it is held to the scale of its layer's weight values instead of its own
            scale = one[k.replace(".bias", ".weight")].abs().max()
        assert (two[k] - one[k]).abs().max() <= 0.02 * scale, k
    # clipping (max 0.05, always active here) used the global norm, and that is what rank 0 logged
    norms_two, norms_one = tensorboard_scalars(root / "two", "grad_norm"), tensorboard_scalars(root / "one", "grad_norm")
    assert len(norms_two) == len(norms_one) == 4 and min(norms_one) > 0.05
    assert norms_two == pytest.approx(norms_one, rel=0.02)


def test_resume_from_a_checkpoint_ends_bit_identical(runs):
    root = runs["root"]
    assert "resuming from" in runs["resume_log"] and "training 4 steps from step 2" in runs["resume_log"]
    straight, resumed = slice_values(root / "two"), slice_values(root / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# --- refused before any model is loaded ---------------------------------------------------------------------------


@pytest.mark.parametrize("env, flags, match", [
    (FSDP_ENV, ["--gradient_checkpointing", "--blocks_to_swap", "2"], r"--blocks_to_swap 2 cannot run under FSDP"),
    (FSDP_ENV, ["--validation_prompts", "a cat"], r"--validation_prompts under FSDP: .*drop --validation_prompts"),
    ({**FSDP_ENV, "FSDP_VERSION": "1"}, ["--mixed_precision", "bf16"],
     r"fsdp_version: 1 \(FSDP1\) cannot train a slice: .*a bf16 base .*set fsdp_version: 2"),
    ({**FSDP_ENV, "FSDP_OFFLOAD_PARAMS": "true"}, [], r"fsdp_offload_params: true is not supported"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}, [],
     r"asks for DeepSpeed, which slice-ft does not support.*configs/accelerate/fsdp.yaml"),
])
def test_engine_conflicts_are_refused_at_parse_time(monkeypatch, env, flags, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        train_slice_ft.parse_args([*TINY_ARGS, "--generate_demo_corpus", *flags])


def test_mixed_precision_defaults_to_the_accelerate_config_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    args = train_slice_ft.parse_args([*TINY_ARGS, "--generate_demo_corpus"])
    assert (args.mixed_precision, args.base_dtype) == ("bf16", "bf16")
    args = train_slice_ft.parse_args([*TINY_ARGS, "--generate_demo_corpus", "--mixed_precision", "no"])
    assert (args.mixed_precision, args.base_dtype) == ("no", "fp32")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert train_slice_ft.parse_args([*TINY_ARGS, "--generate_demo_corpus"]).mixed_precision == "no"


def test_the_gpu_fsdp_check_runs_ddp_and_fsdp2_to_the_same_losses_in_a_cpu_dry_run(tmp_path):
    """benchmarks/gpu_fsdp.py (the GPU check) on the CPU: the tiny rows, one process each, so it cannot rot."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_fsdp

    out = tmp_path / "gpu_fsdp"
    assert gpu_fsdp.main(["--dry-run", "--nproc", "1", "--steps", "2", "--only", "tiny", "--output", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["losses_agree"] and [r["engine"] for r in result["rows"]] == ["ddp", "fsdp2"]
    assert "| tiny | fsdp2 | 1 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_sharded_forward_and_slice_gradients_equal_the_unsharded_model(base):
    """`shard_model` in this process (a 1-process gloo group): same loss and slice gradients as the plain model, for
    every slice layer type, on a bf16 and an fp8 base; parameter names do not change."""
    import copy

    from conftest import wan_inputs
    from slice_adapter import SliceConfig
    from slice_ft import distributed
    from slice_ft.components import _cast_like_from_pretrained
    from slice_ft.offload import quantize_base_to_fp8
    from slice_ft.tiny import build_tiny_transformer

    model = build_tiny_transformer(0)
    _cast_like_from_pretrained(model, torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(SliceConfig(fraction=0.25, slice_id=1, init_weights=False))
    if base == "fp8":
        quantize_base_to_fp8(model)
    plain = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    inputs = wan_inputs(batch=2, dtype=torch.bfloat16)

    def loss_and_grads(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**inputs, return_dict=False)[0]
        loss = out.float().pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        sharded = distributed.shard_model(model, distributed.Engine(distributed.FSDP), torch.device("cpu"))
        assert [n for n, _ in sharded.named_parameters()] == names
        loss, grads = loss_and_grads(sharded)
    finally:
        torch.distributed.destroy_process_group()
    want_loss, want = loss_and_grads(plain)
    assert grads.keys() == want.keys() and {layer_kind(k) for k in grads} == {"Linear", "Elementwise", "ParamSlice"}
    assert torch.equal(loss, want_loss)
    for k in want:
        assert torch.equal(grads[k], want[k]), k
        assert grads[k].abs().sum() > 0, k
