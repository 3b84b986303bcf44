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


def peer_row(fastest, **extra):
    row = dict(layer="moe_ffn", mode="forward", shape="medium", dtype="fp32", threads=2, sm4_s=1e-3,
               peer_s={"torch_grouped_mm": 1.25e-3}, best_peer="torch_grouped_mm", sm4_over_best_peer=0.8,
               floor_s=0.25e-3, sm4_over_floor=4.0, sm4_fastest=fastest, compile_note="")
    row.update(extra)
    return row


def test_peer_table_flags_the_rows_sm4_loses(tmp_path, capsys):
    losing = peer_row(False, dtype="bf16", sm4_s=2e-3, sm4_over_best_peer=1.6, sm4_over_floor=8.0,
                      compile_note="torch.compile fails: Expected inputs of BF16 type")
    data = {"datetime": "2026-12-02T06:00:00", "machine_info": {}, "benchmarks": [
        result("cpu", 1e-3, peer_comparison=peer_row(True)), result("cpu", 2e-3, peer_comparison=losing),
        result("plain_loop", 2e-3)]}
    path = tmp_path / "peer.json"
    path.write_text(json.dumps(data))
    assert main(["bench", "report", "--peers", "--markdown", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| moe_ffn")]
    assert len(lines) == 2
    assert "| 0.80 |" in lines[1] and "| 4.00 |" in lines[1] and "sm4 fastest" in lines[1]  # fp32 sorts after bf16
    assert "**sm4 NOT fastest** (torch_grouped_mm wins); torch.compile fails" in lines[0] and "| 1.60 |" in lines[0]
    assert "sm4 is not the fastest in 1 of 2 rows" in out


def test_peer_table_of_a_run_without_peer_rows_is_refused(results_file):
    with pytest.raises(ValueError, match="no timed bench_peer.py rows"):
        main(["bench", "report", "--peers", str(results_file), "--debug"])
