"""``python -m sm4 report``: the model FLOP table and run plots."""

import json

import pytest

from sm4.__main__ import main
from sm4.report import model_table


def test_model_table_has_sm4_and_dense_rows_with_the_papers_numbers():
    rows = model_table(settings=["medium"], tasks=["avmnist"])
    assert [(r["model"], r["setting"]) for r in rows] == [("SM4", "medium"), ("dense", "medium")]
    sm4_row, dense_row = rows
    assert sm4_row["paper_gflops"] == 0.41 and dense_row["paper_gflops"] == 0.95
    assert sm4_row["params"] > dense_row["params"]  # experts: more parameters ...
    assert 0.8 < sm4_row["gflops"] / dense_row["gflops"] < 1.3  # ... at about the same FLOPs


def test_run_plots_from_a_log(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    entries = [{"epoch": e, "val": {"wine": {"loss": 1.0 / e, "accuracy": 0.5 + 0.1 * e}}, "k": {"chem": 1},
                "alp_weights": {"chem": 1.0}} for e in (1, 2)]
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert main(["report", "run", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="log.jsonl not found"):
        main(["report", "run", str(tmp_path / "missing")])
    (run / "log.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match="line 1 is not JSON"):
        main(["report", "run", str(run)])
