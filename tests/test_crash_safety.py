"""Nothing lost: a kill or a full disk during a checkpoint save leaves the previous checkpoint usable, `latest`
resumes the newest complete checkpoint of this run, another run's checkpoints are never resumed or deleted by
mistake, and the file writers (merge, export, slice folders) refuse to overwrite their inputs, leave nothing behind
on a full disk and honour the umask."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_slice_ft
from slice_ft import checkpointing
from slice_ft.checkpointing import checkpoint_problem, list_checkpoints
from slice_ft.corpus import generate_corpus
from slice_ft.errors import exit_on_input_error

REPO = Path(__file__).resolve().parents[1]
# 4 steps, a checkpoint every 2, keep 1: the kill hits the save of checkpoint-4 while checkpoint-2 is the only one.
RUN = ["--pretrained_model_name_or_path", "tiny", "--report_to", "none", "--bucket_resolutions", "48x32,32x48",
       "--bucket_frame_counts", "1,5", "--ff", "0.25", "--ffid", "1", "--learning_rate", "1e-2", "--max_train_steps",
       "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--seed", "3"]

KILL_DRIVER = """
import os, signal, sys
from pathlib import Path
from slice_ft import checkpointing

moment, step = sys.argv[1], sys.argv[2]

def kill(name, folder):
    if name == moment and Path(folder).name.startswith("checkpoint-" + step):
        os.kill(os.getpid(), signal.SIGKILL)

checkpointing.on_save_moment = kill
sys.argv = ["train_slice_ft.py", *sys.argv[3:]]
import train_slice_ft
train_slice_ft.exit_on_input_error(train_slice_ft.main, train_slice_ft.parse_args(sys.argv[1:]))
"""


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(output_dir, corpus, *flags):
    _reset_accelerate()
    args = train_slice_ft.parse_args(RUN + ["--output_dir", str(output_dir), "--dataset_name", str(corpus),
                                            *map(str, flags)])
    return exit_on_input_error(train_slice_ft.main, args)


def env():
    return dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def slice_values(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "slice" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, num_images=4, num_videos=2, size=[(48, 32), (32, 48)], num_frames=5, seed=3)
    return root


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    """The uninterrupted run every resumed run must end equal to."""
    out = tmp_path_factory.mktemp("straight")
    train(out, corpus)
    return slice_values(out)


# --- kill -9 during a save ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("moment, left", [
    ("begin", "checkpoint-2"),         # checkpoint-4.partial exists, empty
    ("slice_saved", "checkpoint-2"),   # inside accelerate's save_state: the slice written, no optimizer yet
    ("state_saved", "checkpoint-2"),   # every file written, not fsynced or renamed
    ("renamed", "checkpoint-4"),       # complete, the old one not pruned yet
])
def test_a_kill_at_any_moment_of_a_save_leaves_a_checkpoint_that_resumes_to_the_same_result(
        tmp_path, corpus, straight, moment, left):
    out = tmp_path / "out"
    driver = tmp_path / "kill_during_save.py"
    driver.write_text(KILL_DRIVER)
    proc = subprocess.run([sys.executable, str(driver), moment, "4", *RUN, "--output_dir", str(out),
                           "--dataset_name", str(corpus)], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "gemm_4bit_forward" not in proc.stderr  # bitsandbytes' CPU-kernel notice is filtered
    complete = [p.name for p in list_checkpoints(out) if checkpoint_problem(p) is None]
    assert left in complete
    assert not (out / "slice").exists()

    result = train(out, corpus, "--resume_from_checkpoint", "latest")
    assert len(result["losses"]) == (2 if left == "checkpoint-2" else 0)
    resumed = slice_values(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # the partial folder is gone; killed before pruning, checkpoint-2 waits for the next save's pruning
    assert sorted(p.name for p in out.glob("checkpoint-*")) == (
        ["checkpoint-4"] if left == "checkpoint-2" else ["checkpoint-2", "checkpoint-4"])


def test_latest_skips_and_logs_an_incomplete_checkpoint_an_older_version_left(tmp_path, corpus, caplog):
    out = tmp_path / "out"
    train(out, corpus, "--max_train_steps", "2")
    import shutil

    (out / "checkpoint-6").mkdir()  # empty
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-8")
    (out / "checkpoint-8" / "optimizer.bin").write_bytes(b"")  # a 0-byte file
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-9")
    (out / "checkpoint-9" / "custom_checkpoint_0.pkl").unlink()
    assert checkpointing.resolve_resume(out, "latest", logger=__import__("logging").getLogger("t")) == \
        out / "checkpoint-2"
    assert "checkpoint-9: it has no custom_checkpoint_0.pkl" in caplog.text
    assert "checkpoint-8: it has an empty optimizer.bin" in caplog.text
    assert "checkpoint-6: it is empty" in caplog.text


# --- a full disk --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["optimizer", "slice"])
def test_a_full_disk_during_a_save_is_an_error_and_keeps_the_previous_checkpoint(
        tmp_path, corpus, straight, monkeypatch, capsys, where):
    import accelerate.checkpointing
    import slice_adapter.io

    owner, name = (accelerate.checkpointing, "save") if where == "optimizer" else (slice_adapter.io, "save_file")
    real = getattr(owner, name)

    def second_save_fails(obj, path, *args, **kwargs):  # checkpoint-2 is written, checkpoint-4 hits a full disk
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(owner, name, second_save_fails)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train(out, corpus)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"error: the disk is full while writing '[^']*checkpoint-4\.partial[^']*' \(No space left on "
                     r"device\): free space or write elsewhere.*\n$", err) and "Traceback" not in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # nothing partial left
    assert checkpoint_problem(out / "checkpoint-2") is None
    monkeypatch.undo()
    train(out, corpus, "--resume_from_checkpoint", "latest")
    resumed = slice_values(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# --- runs own their folders ---------------------------------------------------------------------------------------


def test_another_runs_checkpoints_are_set_aside_never_resumed_or_deleted(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    train(out, corpus, "--max_train_steps", "2")  # run A: checkpoint-2
    a_values = (out / "checkpoint-2" / "slice" / "adapter_model.safetensors").read_bytes()

    # run B (another learning rate) resuming 'latest' in A's folder: refused, naming the difference
    with pytest.raises(SystemExit):
        train(out, corpus, "--learning_rate", "5e-3", "--resume_from_checkpoint", "latest")
    err = capsys.readouterr().err
    assert "error: " in err and "--learning_rate: 0.01 in the checkpoint, 0.005 now" in err and "--force_resume" in err

    # run B started fresh: A's checkpoint moves to previous_runs/, B writes its own
    train(out, corpus, "--learning_rate", "5e-3", "--max_train_steps", "2")
    moved = list((out / "previous_runs").glob("*/checkpoint-2"))
    assert len(moved) == 1 and (moved[0] / "slice" / "adapter_model.safetensors").read_bytes() == a_values
    assert json.loads((out / "checkpoint-2" / "run.json").read_text())["settings"]["learning_rate"] == 5e-3

    # run A resumed explicitly from B's checkpoint: refused; --force_resume continues it
    with pytest.raises(SystemExit):
        train(out, corpus, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert "--learning_rate: 0.005 in the checkpoint, 0.01 now" in capsys.readouterr().err
    result = train(out, corpus, "--resume_from_checkpoint", "latest", "--force_resume")
    assert len(result["losses"]) == 2


def test_settings_that_do_not_change_training_are_not_part_of_the_run():
    from slice_ft.arguments import run_settings

    base = train_slice_ft.parse_args(RUN + ["--dataset_name", "d"])
    longer = train_slice_ft.parse_args(RUN + ["--dataset_name", "d", "--max_train_steps", "40", "--checkpointing_steps",
                                              "7", "--output_dir", "elsewhere", "--report_to", "tensorboard"])
    other_slice = train_slice_ft.parse_args(RUN + ["--dataset_name", "d", "--ffid", "2"])
    assert run_settings(base) == run_settings(longer)
    assert checkpointing.run_differences(run_settings(base), run_settings(other_slice)) == \
        ["--slice_id: 1 in the checkpoint, 2 now"]


def test_resuming_from_a_slice_folder_says_it_is_not_a_checkpoint(tmp_path):
    from slice_checkpoints import make_slice

    folder = make_slice(tmp_path / "slice", 0.25, 1)
    with pytest.raises(ValueError, match=r"is a slice folder .*not a checkpoint: pass a checkpoint-N folder"):
        checkpointing.resolve_resume(tmp_path, str(folder))
