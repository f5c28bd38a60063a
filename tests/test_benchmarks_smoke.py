"""The benchmark scripts must not rot: their seconds-long smoke run renders every table of BENCHMARKS.md."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The rows each smoke table must have (first column), in order.
EXPECTED_ROWS = {
    "## 1. Training step": ["frozen", "slice 0.001", "lora 0.001 (r=", "shira 0.001 (r=", "slice 0.01",
                            "lora 0.01 (r=", "shira 0.01 (r=", "full"],
    "## 2. Inference": ["base", "unmerged slice 0.001", "merged slice 0.001"],
    "## 3. Merge": ["plain copy", "Python streaming copy", "merge CLI, end to end", "merge alone"],
    "## 4. Planning": ["build meta model", "plan 0.001", "build + add_adapter 0.001"],
    "## Quality study": ["slice", "lora", "full"],
}
RATIO = re.compile(r"^\d+\.\d+× \(\d+\.\d+–\d+\.\d+\)$")  # median (min–max)


def first_table(section: str) -> list[list[str]]:
    """The cells of a section's first markdown table, header and separator removed."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def section(report: str, title: str) -> str:
    start = report.index(title)
    end = report.find("\n## ", start + 1)
    return report[start:end if end > 0 else len(report)]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--smoke", "--output", str(out),
                           "--json-dir", str(out / "json")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_smoke_run_writes_every_table_with_a_row_per_configuration(smoke_report):
    report = (smoke_report / "BENCHMARKS.md").read_text()
    assert "SMOKE RUN" in report
    for title, expected in EXPECTED_ROWS.items():
        names = [row[0] for row in first_table(section(report, title))]
        assert len(names) == len(expected), (title, names)
        for name, want in zip(names, expected):
            assert name.startswith(want), (title, names)
    assert "## Targets (issue 5)" in report and "## GPU (issue 6)" in report
    quality = section(report, "## Quality study")
    remedies = first_table(quality[quality.index("Forgetting remedies"):])
    assert [row[0] for row in remedies] == ["slice", "lora", "full"] and all(len(row) == 7 for row in remedies)
    gpu = first_table(section(report, "## GPU (issue 6)"))
    assert [row[0] for row in gpu][:3] == ["slice", "slice + block swap", "slice + block swap (all) + activation offload"]
    assert all(row[6] == row[7] == "not yet measured" and row[-1].startswith("`python benchmarks/gpu_lowvram.py")
               for row in gpu)
    assert "**Not yet measured**" in section(report, "## GPU (issue 6)")


def test_gpu_section_embeds_a_measured_table_when_a_gpu_run_wrote_one(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_all

    measured = tmp_path / "lowvram_14b.md"
    measured.write_text("# slice-ft low-VRAM training (Wan 14B)\n\n- GPU: NVIDIA H100\n\n| run | peak VRAM (GiB) |\n"
                        "|---|---|\n| slice + block swap (all) + activation offload | 9.87 |\n")
    text = run_all.gpu_section(measured)
    assert "| slice + block swap (all) + activation offload | 9.87 |" in text and "- GPU: NVIDIA H100" in text
    assert "not yet measured" not in text.lower() and "# slice-ft" not in text
    for not_a_result in (measured.read_text().replace("9.87", "not yet measured"),  # a CPU run's file
                         measured.read_text().replace("NVIDIA H100", "none (--smoke: tiny config on CPU)")):  # smoke
        measured.write_text(not_a_result)
        text = run_all.gpu_section(measured)
        assert "9.87" not in text and "**Not yet measured**" in text
        assert "`python benchmarks/gpu_lowvram.py --rows 6`" in text


def test_smoke_ratios_are_numbers(smoke_report):
    report = (smoke_report / "BENCHMARKS.md").read_text()
    train = first_table(section(report, "## 1. Training step"))
    for row in train:
        assert RATIO.match(row[3]) and RATIO.match(row[4]), row  # × frozen, wall and CPU
        assert re.match(r"^\d+\.\d+×$", row[6]), row  # peak × frozen
        assert row[-1].startswith("`python benchmarks/bench_train_step.py"), row
    for row in first_table(section(report, "## 2. Inference")):
        assert RATIO.match(row[2]) and RATIO.match(row[3]), row
    for row in first_table(section(report, "## 3. Merge"))[2:]:
        assert RATIO.match(row[3]) and RATIO.match(row[4]), row
    targets = first_table(section(report, "## Targets (issue 5)"))
    assert targets and all(row[-1] == "met" or row[-1].startswith("missed — ") for row in targets)


def test_smoke_plots_exist_or_the_report_says_why(smoke_report):
    report = (smoke_report / "BENCHMARKS.md").read_text()
    try:
        import matplotlib  # noqa: F401  (the `bench` extra)
    except ImportError:
        assert "matplotlib is not installed" in report
        return
    for name in ("train_step.png", "quality_loss_curves.png"):
        png = smoke_report / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"plots/{name})" in report


def test_a_partial_full_size_run_keeps_the_other_sections_and_from_json_rerenders(smoke_report, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import shutil

    import run_all

    json_dir = tmp_path / "json"
    shutil.copytree(smoke_report / "json", json_dir)
    ran = []

    def run_only(names, json_dir, plots_dir, smoke):  # stands in for the measuring subprocesses
        ran.append((list(names), smoke))
        return {}

    monkeypatch.setattr(run_all, "run_benchmarks", run_only)
    out = run_all.main(["--only", "merge", "--json-dir", str(json_dir), "--output", str(tmp_path / "report")])
    assert ran == [(["merge"], False)]
    report = out.read_text()
    for title in EXPECTED_ROWS:  # every section whose JSON is in the folder, not just the re-measured one
        assert title in report
    assert "Generated by `python benchmarks/run_all.py --only merge --json-dir" in report
    again = run_all.main(["--from-json", str(json_dir), "--output", str(tmp_path / "again")]).read_text()
    assert ran == [(["merge"], False)]  # --from-json runs nothing
    assert section(again, "## 3. Merge") == section(report, "## 3. Merge")


def test_lora_initialisation_does_not_depend_on_the_global_rng():
    # The quality study runs jobs in a process pool: LoRA's init must not depend on what a worker ran before.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch

    import common

    cfg = common.wan_layout(in_channels=4, out_channels=4, rope_max_seq_len=32, num_attention_heads=2,
                            attention_head_dim=8, ffn_dim=32, num_layers=1, text_dim=16, freq_dim=16)
    inits = []
    for consumed in (0, 7):
        torch.manual_seed(123)
        torch.randn(consumed)  # a different global RNG state before each build
        model = common.build_wan(cfg)
        common.apply_method(model, "lora", rank=2, seed=5)
        inits.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n})
    assert inits[0] and inits[0].keys() == inits[1].keys()
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])
    model = common.build_wan(cfg)
    before = torch.random.get_rng_state()
    common.apply_method(model, "lora", rank=2, seed=5)
    assert torch.equal(before, torch.random.get_rng_state())  # and the caller's RNG stream is left as it was
