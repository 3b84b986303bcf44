"""The papers' published figures (M³SAT Table 8: SM4 and HighMMT, small / medium / large) as
``python -m sm4 report flops --convention paper`` reproduces them: every reproducible FLOP figure
within 5 % and parameter count within 2 %, and exactly the listed rows not reproducible, each with
its reason. A change to a setting, a tokenisation, the counting or the HighMMT shapes that moves a
row out of its tolerance, or makes a listed row reproduce, fails here."""

import pytest

from sm4.report import NOT_REPRODUCIBLE, PAPER_FIGURES, model_table

TOLERANCE = {"gflops": 0.05, "params": 0.02}

# (setting, task, model, figure) that do not come back, and why (sm4.report.NOT_REPRODUCIBLE).
EXPECTED_NOT_REPRODUCIBLE = {
    ("medium", "push", "HighMMT", "gflops"),  # +6.6 % at the width that reproduces ENRICO and AV-MNIST
    ("large", "urfunny", "SM4", "gflops"),  # 0.49 from Table 15's tokens, the paper 0.38
    ("small", "push", "SM4", "params"),  # the paper's 0.27 / 0.25 M leave the expert layer (0.47 M) out
    ("small", "vt", "SM4", "params"),
    ("small", "push", "HighMMT", "params"),  # -2.5 %
    ("medium", "push", "HighMMT", "params"),  # per-task counts differ by more than the heads
    ("medium", "avmnist", "HighMMT", "params"),
}


@pytest.fixture(scope="module")
def rows():
    return {(r["setting"], r["task"], r["model"]): r
            for r in model_table(models=("SM4", "HighMMT"), sm4_convention=False)}


def test_every_published_figure_has_a_row(rows):
    published = {(s, t, m) for s, tasks in PAPER_FIGURES.items() for t, models in tasks.items() for m in models}
    assert published == set(rows) and len(published) == 18


def test_reproducible_figures_are_within_tolerance(rows):
    checked = []
    for key, row in rows.items():
        for what, tolerance in TOLERANCE.items():
            if key + (what,) in EXPECTED_NOT_REPRODUCIBLE:
                continue
            assert row[f"{what}_note"] is None, (key, what)
            assert abs(row[f"{what}_diff"]) <= tolerance, (key, what, row[f"{what}_diff"])
            checked.append(key + (what,))
    assert len(checked) == 2 * 18 - len(EXPECTED_NOT_REPRODUCIBLE) == 29


def test_exactly_the_listed_rows_are_not_reproducible_and_say_why(rows):
    assert set(NOT_REPRODUCIBLE) == EXPECTED_NOT_REPRODUCIBLE
    for setting, task, model, what in EXPECTED_NOT_REPRODUCIBLE:
        row = rows[setting, task, model]
        assert row[f"{what}_note"] == NOT_REPRODUCIBLE[setting, task, model, what] and len(row[f"{what}_note"]) > 20
        # a row marked not reproducible that does reproduce is a stale mark
        assert abs(row[f"{what}_diff"]) > TOLERANCE[what], (setting, task, model, what, row[f"{what}_diff"])


def test_the_worked_examples(rows):
    """The issue's and the report's worked examples: GMACs per sample x the counting batch."""
    assert rows["large", "avmnist", "HighMMT"]["batch"] == 40
    assert rows["large", "avmnist", "HighMMT"]["gmacs"] == pytest.approx(0.95, rel=0.01)
    assert rows["small", "push", "HighMMT"]["batch"] == 18 and rows["small", "vt", "HighMMT"]["batch"] == 64
    assert rows["large", "mimic", "HighMMT"]["gmacs"] == pytest.approx(0.67, rel=0.01)
    # HighMMT medium: AV-MNIST in patches (its loader's batch 40) makes the width 290 and brings ENRICO back
    assert rows["medium", "avmnist", "HighMMT"]["batch"] == 40
    assert rows["medium", "enrico", "HighMMT"]["gmacs"] == pytest.approx(79.48, rel=0.01)
    # SM4 medium: the 1-4 % (ENRICO 1.10, PUSH 2.33, AV-MNIST 0.41 G; 1.23 M)
    for task in ("enrico", "push", "avmnist"):
        assert abs(rows["medium", task, "SM4"]["gflops_diff"]) < 0.04
