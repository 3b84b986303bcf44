"""``python -m sm4 report``: the model FLOP table and run plots."""

import json

import pytest

from sm4.__main__ import main
from sm4.report import model_table


def test_the_papers_figures_come_back_in_their_convention():
    """Every FLOP figure Table 8 publishes within 5 % and every parameter count within 2 %, except
    the rows the report marks as not reproducible (each with its reason)."""
    rows = model_table(models=("SM4", "HighMMT"), sm4_convention=False)
    assert len(rows) == 2 * 9
    checked = 0
    for row in rows:
        for what, tolerance in (("gflops", 0.05), ("params", 0.02)):
            if row[f"{what}_note"] is None:
                assert abs(row[f"{what}_diff"]) <= tolerance, row
                checked += 1
            else:
                assert abs(row[f"{what}_diff"]) > tolerance, row  # a note on a figure that does reproduce is stale
    assert checked >= 26
    # The worked examples (HighMMT: GMAC per sample x batch).
    by = {(r["setting"], r["task"], r["model"]): r for r in rows}
    assert by["large", "avmnist", "HighMMT"]["batch"] == 40 and abs(by["large", "avmnist", "HighMMT"]["gmacs"] - 0.95) < 0.01
    assert by["small", "push", "HighMMT"]["batch"] == 18 and by["small", "vt", "HighMMT"]["batch"] == 64
    assert abs(by["large", "mimic", "HighMMT"]["gmacs"] - 0.67) < 0.01


def test_dense_baselines_have_the_flops_of_sm4_and_the_table_says_its_convention(capsys):
    rows = model_table(settings=["medium"], tasks=["avmnist"], models=("SM4", "dense", "Dense 1", "Dense 2"))
    assert [r["model"] for r in rows] == ["SM4", "dense", "Dense 1", "Dense 2"]
    sm4_row = rows[0]
    assert sm4_row["paper_gflops"] == 0.41 and all(r["paper_gflops"] is None for r in rows[1:])
    for row in rows[1:]:
        assert sm4_row["params"] > 2 * row["params"]  # experts: more parameters ...
        assert abs(row["gmacs"] / sm4_row["gmacs"] - 1) < 0.05  # ... at about the same MACs
    assert all(r["gflops_sample"] > 0 for r in rows)
    assert main(["report", "flops", "--settings", "medium", "--tasks", "avmnist", "--models", "SM4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("the papers' convention: GMACs") and "GFLOP/sample" in out
    assert main(["report", "flops", "--settings", "medium", "--tasks", "avmnist", "--models", "SM4",
                 "--convention", "sm4"]) == 0
    assert capsys.readouterr().out.startswith("sm4's convention: FLOPs of ONE sample")


def test_run_plots_from_a_log(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    entries = [{"epoch": e, "val": {"wine": {"loss": 1.0 / e, "accuracy": 0.5 + 0.1 * e}}, "k": {"chem": 1},
                "alp_weights": {"chem": 1.0}} for e in (1, 2)]
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert main(["report", "run", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="log.jsonl not found"):
        main(["report", "run", str(tmp_path / "missing"), "--debug"])
    (run / "log.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        main(["report", "run", str(run), "--debug"])
