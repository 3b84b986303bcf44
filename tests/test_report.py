"""``python -m sm4 report``: the model FLOP table and run plots."""

import json

import pytest

from sm4.__main__ import main
from sm4.report import model_table


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
