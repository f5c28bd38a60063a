"""Every bad input is a clear `error: ...` with exit status 2 (the traceback only with --debug), --help answers
without the model stack, captions read whatever encoding Excel or Notepad wrote (or are skipped naming the file),
and the file writers refuse to overwrite their inputs, clean a killed writer's leftovers, leave nothing behind on a
full disk and honour the umask."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import train_slice_ft
from slice_ft.arguments import check_inputs
from slice_ft.data import load_local_corpus

from slice_checkpoints import cli, files_in, make_slice, save_base, tiny_state

REPO = Path(__file__).resolve().parents[1]


def run_trainer(*flags, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(REPO / "train_slice_ft.py"), *map(str, flags)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --- the trainer's command line -----------------------------------------------------------------------------------


def test_help_imports_neither_torch_nor_diffusers():
    probe = ("import runpy, sys\nsys.argv = ['train_slice_ft.py', '--help']\n"
             "try:\n    runpy.run_path('train_slice_ft.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in ('torch', 'diffusers', 'accelerate', 'datasets', 'transformers', "
             "'peft') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert "--pretrained_model_name_or_path" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"


def test_without_a_model_the_trainer_stops_naming_the_model_flags():
    proc = run_trainer("--generate_demo_corpus", "--output_dir", "/nonexistent/never-written")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no model: pass --pretrained_model_name_or_path")
    assert "--transformer_file" in proc.stderr and "Traceback" not in proc.stderr
    demo = train_slice_ft.parse_args(["--config", str(REPO / "configs" / "demo.yaml")])
    assert demo.pretrained_model_name_or_path == "tiny"  # the demo asks for the tiny model by name


def test_an_input_error_is_one_line_and_exit_2_and_debug_shows_the_traceback():
    proc = run_trainer("--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--ff", "0")
    assert proc.returncode == 2
    assert proc.stderr == ("error: --ff (--slice_fraction) must be in (0, 1], got 0.0: the share of the block "
                           "weights to train, e.g. 0.001 for 0.1%\n")
    proc = run_trainer("--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", "--ff", "0", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--ff", "1.5"], r"--ff \(--slice_fraction\) must be in \(0, 1\], got 1.5"),
    (["--ff", "0.25", "--ffid", "4"], r"--ffid \(--slice_id\) must be in \[0, 3\]: --ff 0.25 defines 4 disjoint"),
])
def test_slice_flags_are_named_in_their_errors(flags, message):
    with pytest.raises(ValueError, match=message):
        train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus", *flags])


def test_an_ff_too_small_to_select_a_weight_names_the_smallest_usable_value(tmp_path):
    import re

    import slice_adapter
    from slice_adapter import SliceConfig
    from slice_ft.tiny import build_tiny_transformer

    _reset_accelerate()
    args = train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus",
                                      "--output_dir", str(tmp_path), "--ff", "1e-9", "--report_to", "none"])
    with pytest.raises(ValueError, match=r"--ff 1e-09 \(--ffid 0\) selects no weight of this model") as info:
        train_slice_ft.main(args)
    usable = float(re.search(r"the smallest --ff that selects one is ([0-9.e-]+)", str(info.value)).group(1))
    model = build_tiny_transformer(0)
    assert slice_adapter.plan(model, SliceConfig(fraction=usable, slice_id=0)).selected > 0
    assert slice_adapter.plan(model, SliceConfig(fraction=usable / 1.5, slice_id=0)).selected == 0


def test_mistyped_local_paths_are_called_missing_not_unreachable_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "clips").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Wan2.1-T2V-1.3B-Diffusers").mkdir()
    monkeypatch.chdir(tmp_path)

    def args(*flags):
        return train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--dataset_name", "clips",
                                          *flags])

    with pytest.raises(ValueError, match=r"--dataset_name 'clips/clipz': no such folder"):
        check_inputs(args("--dataset_name", "clips/clipz"))
    with pytest.raises(ValueError, match=r"--dataset_name './clipz': no such folder \(in .*did you mean 'clips'"):
        check_inputs(args("--dataset_name", "./clipz"))
    with pytest.raises(ValueError, match=r"'models/Wan2.1-T2V-1.3B-Diffuser': no such folder .*did you mean "
                                         r"'Wan2.1-T2V-1.3B-Diffusers'"):
        check_inputs(args("--pretrained_model_name_or_path", "models/Wan2.1-T2V-1.3B-Diffuser"))
    with pytest.raises(ValueError, match=r"--transformer_file 'wan.safetensors' no such file"):
        check_inputs(args("--transformer_file", "wan.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"--dataset_name 'clipz': no such folder.*HF_HUB_OFFLINE is set"):
        check_inputs(args("--dataset_name", "clipz"))
    check_inputs(args())  # the real folder passes


def test_a_name_that_is_neither_a_local_folder_nor_a_hub_dataset_says_both(tmp_path, monkeypatch):
    """`data/clipz` (no `data/` here either) cannot be told from a Hub name without the network: when the Hub load
    fails, the error says it is no local folder as well, not only that the Hub could not be reached."""
    import datasets

    from slice_ft.data import build_dataset

    monkeypatch.chdir(tmp_path)

    def unreachable(name, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ValueError, match=r"dataset 'data/clipz' is not a local folder \(none at '.*data/clipz'\) "
                                         r"and could not be loaded as a `datasets` Hub dataset \(ConnectionError: "
                                         r"Couldn't reach 'data/clipz'.*pass an existing folder"):
        build_dataset("data/clipz")


def test_a_truncated_transformer_file_is_named(tmp_path):
    full = save_base(tiny_state(0), tmp_path / "wan.safetensors", fmt="wan")
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    (tmp_path / "cfg").mkdir()
    from slice_ft.tiny import TINY_TRANSFORMER_CONFIG

    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                              **TINY_TRANSFORMER_CONFIG}))
    _reset_accelerate()
    args = train_slice_ft.parse_args(["--pretrained_model_name_or_path", "tiny", "--generate_demo_corpus",
                                      "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                                      "--transformer_file", str(full), "--transformer_config", str(tmp_path / "cfg")])
    with pytest.raises(ValueError, match=rf"--transformer_file: '{full}' is truncated"):
        train_slice_ft.main(args)


# --- captions -----------------------------------------------------------------------------------------------------


def _images(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (48, 32), (200, 10, 10)).save(folder / name)


def _captions(folder) -> dict:
    return {Path(r["media_path"]).name: r["caption"] for r in load_local_corpus(folder)}


def test_sidecar_captions_with_a_bom_or_bytes_that_are_not_utf8(tmp_path, caplog):
    _images(tmp_path / "d", "a.png", "b.png", "c.png")
    (tmp_path / "d" / "a.txt").write_bytes("\ufeffsks_a a red circle".encode("utf-8"))
    (tmp_path / "d" / "b.txt").write_bytes("sks_b café".encode("cp1252"))
    (tmp_path / "d" / "c.txt").write_text("sks_c plain", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        captions = _captions(tmp_path / "d")
    assert captions == {"a.png": "sks_a a red circle", "b.png": None, "c.png": "sks_c plain"}
    assert f"skipping the caption of {tmp_path / 'd' / 'b.txt'}: byte 0xe9 at character 9 is not UTF-8" in caplog.text


def test_metadata_csv_from_excel_with_a_bom_and_one_row_that_is_not_utf8(tmp_path, caplog):
    _images(tmp_path / "d", "a.png", "b.png")
    (tmp_path / "d" / "metadata.csv").write_bytes(
        b"\xef\xbb\xbffile_name,caption\r\na.png,sks_a red\r\n" + "b.png,sks_b café\r\n".encode("cp1252"))
    with caplog.at_level(logging.WARNING):
        captions = _captions(tmp_path / "d")
    assert captions == {"a.png": "sks_a red", "b.png": None}
    assert "b.png (" in caplog.text and "metadata.csv:3)" in caplog.text and "not UTF-8" in caplog.text


def test_metadata_jsonl_with_a_bom(tmp_path):
    _images(tmp_path / "d", "a.png")
    (tmp_path / "d" / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(
        {"file_name": "a.png", "text": "sks_a \u2028 line"}).encode() + b"\n")
    assert _captions(tmp_path / "d") == {"a.png": "sks_a \u2028 line"}


# --- writes -------------------------------------------------------------------------------------------------------


@pytest.fixture()
def slice_dir(tmp_path):
    return make_slice(tmp_path / "s", 0.25, 1)


def test_merge_and_export_refuse_to_write_over_the_slice_they_read(tmp_path, slice_dir, capsys):
    base = save_base(tiny_state(0), tmp_path / "base.safetensors")
    before = {p.name: p.read_bytes() for p in slice_dir.iterdir()}
    export = cli("export_lora.py").main(["--slice", str(slice_dir), "--output",
                                         str(slice_dir / "adapter_model.safetensors"), "--overwrite"])
    merge = cli("merge_slices.py").main(["--base", str(base), "--slice", str(slice_dir), "--output",
                                         str(slice_dir / "adapter_model.safetensors"), "--overwrite",
                                         "--no_progress"])
    assert (export, merge) == (2, 2)
    err = capsys.readouterr().err
    assert err.count("is also an input of this command") == 2
    assert {p.name: p.read_bytes() for p in slice_dir.iterdir()} == before


def test_a_killed_writers_leftover_is_removed_and_a_running_ones_kept(tmp_path, slice_dir):
    from slice_adapter.merge import merge_slices

    base = save_base(tiny_state(0), tmp_path / "base.safetensors")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    (out.parent / f"merged.safetensors.partial-{int(dead.stdout)}").write_bytes(b"x" * 1000)  # its writer died
    (out.parent / ".merged.safetensors.abc123.tmp").write_bytes(b"x")  # an earlier version's hidden temp file
    (out.parent / f"merged.safetensors.partial-{os.getppid()}").write_bytes(b"x")  # a live writer's
    merge_slices(base, [slice_dir], out, progress=False)
    assert files_in(out.parent) == ["merged.safetensors", f"merged.safetensors.partial-{os.getppid()}"]


def test_a_full_disk_during_a_merge_is_an_error_and_leaves_nothing(tmp_path, slice_dir, monkeypatch, capsys):
    import slice_adapter.checkpoint as ckpt

    base = save_base(tiny_state(0), tmp_path / "base.safetensors")
    real = ckpt._write_all
    calls = {"n": 0}

    def fills_up(out, data):
        calls["n"] += 1
        if calls["n"] > 1:  # the header fits, the tensors do not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(out, data)

    def no_kernel_copy(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_all", fills_up)
    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy, raising=False)
    out = tmp_path / "out"
    out.mkdir()
    code = cli("merge_slices.py").main(["--base", str(base), "--slice", str(slice_dir), "--output",
                                        str(out / "m.safetensors"), "--no_progress"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: the disk is full")
    assert files_in(out) == []


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask):
    from slice_adapter.export import export_lora
    from slice_adapter.merge import merge_slices

    old = os.umask(umask)
    try:
        folder = make_slice(tmp_path / "s", 0.25, 1)
        base = save_base(tiny_state(0), tmp_path / "base.safetensors")
        merged = merge_slices(base, [folder], tmp_path / "m.safetensors", progress=False).output
        lora = Path(export_lora(folder, tmp_path / "l.safetensors", allow_lossy=True)["output"])
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(folder) == 0o777 & ~umask
    assert {mode(p) for p in (folder / "adapter_model.safetensors", merged, lora)} == {0o666 & ~umask}
