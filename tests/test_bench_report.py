"""``python -m sm4 bench report``: tables, Markdown and the plot from a pytest-benchmark JSON file."""

import json

import pytest

from sm4 import bench_report
from sm4.__main__ import main


def result(backend, median, **extra):
    info = dict(op="moe_ffn_forward", shape="medium", backend=backend, device="cpu", flops=1e9, bytes=1e6,
                TFLOPs=1e9 / median / 1e12, GBps=1e6 / median / 1e9, fraction_of_matmul_roofline=0.25,
                torch="2.13.0", sm4="0.1.0", roofline={"matmul_TFLOPs": 0.19, "copy_GBps": 10.0}, **extra)
    return {"name": f"test[{backend}]", "stats": {"median": median, "iqr": median / 10}, "extra_info": info}


@pytest.fixture
def results_file(tmp_path):
    data = {
        "datetime": "2026-11-25T12:00:00",
        "machine_info": {"cpu": {"brand_raw": "Test CPU"}},
        "benchmarks": [
            result("cpu", 0.5e-3, speedup_over_plain_loop=4.0, speedup_over_reference=5.0),
            result("plain_loop", 2e-3),
            result("reference", 2.5e-3, speedup_over_plain_loop=0.8),
            {"name": "untimed", "stats": None, "extra_info": {"op": "x", "shape": "y", "backend": "cpu"}},
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_text_report_groups_backends_beside_their_baselines(results_file, capsys):
    assert main(["bench", "report", str(results_file)]) == 0
    out = capsys.readouterr().out
    assert "Test CPU" in out and "moe_ffn_forward [medium]" in out
    lines = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("  backend")]
    assert lines == ["plain_loop", "reference", "cpu"]  # baselines first
    assert "4.00× vs plain_loop, 5.00× vs reference" in out and "500 µs" in out


def test_markdown_report(results_file, capsys):
    main(["bench", "report", "--markdown", str(results_file)])
    out = capsys.readouterr().out
    assert "| backend | median |" in out and "| cpu | 500 µs |" in out


def test_plot_is_written(results_file, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "plot.png"
    main(["bench", "report", str(results_file), "--plot", str(target)])
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".png"] == ["plot.png"]  # no temporary left


def test_a_file_that_is_not_a_benchmark_run_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        bench_report.load(str(path))
