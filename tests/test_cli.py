"""The command line: errors are one line with exit status 2 (a traceback only with --debug), Ctrl-C
says where to resume (130), a resume says where it starts, eval --json, MultiBench from --data."""

import json

import pytest

from sm4 import experiment
from sm4.__main__ import main

from .run_helpers import small_data, tiny_setting


@pytest.fixture(scope="module")
def data():
    return small_data(("wine",))


@pytest.fixture
def tiny(tmp_path, data, monkeypatch):
    """A tiny setting file, and --data bundled giving the small data."""
    monkeypatch.setattr(experiment, "load_data", lambda source, setting=None: data)
    path = tmp_path / "tiny.json"
    tiny_setting(epochs=1).save(str(path))
    return str(path)


def one_line_error(capsys, code, expected_code=2):
    assert code == expected_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_resume_and_eval_json(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--setting", tiny, "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1 *  train loss" in out and "chem k=" in out and "test:" in out
    assert main(["train", "--setting", tiny, "--out", str(run), "--quiet", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} from epoch 1 of 2" in out and "epoch 2/2" in out
    assert main(["eval", str(run / "best.pt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and set(result["results"]) == {"wine"} and result["data"]["data"] == "bundled"


def test_dense_turns_the_adaptive_mechanisms_off(tiny, tmp_path, capsys):
    assert main(["train", "--setting", tiny, "--out", str(tmp_path / "d"), "--quiet", "--dense"]) == 0
    assert "--dense: AEA and ALP are off" in capsys.readouterr().out
    saved = json.loads((tmp_path / "d" / "setting.json").read_text())
    assert saved["model"]["dense"] and not saved["train"]["aea"] and not saved["train"]["alp"]


@pytest.mark.parametrize("arguments, message", [
    (["--setting", "enormous"], "unknown setting 'enormous'"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--tasks", "avmnist"], "--tasks chooses MultiBench tasks"),
])
def test_errors_are_one_line_and_exit_2(tiny, tmp_path, capsys, arguments, message):
    err = one_line_error(capsys, main(["train", "--out", str(tmp_path / "r"), "--quiet", *arguments]))
    assert message in err


def test_bad_json_and_a_corrupt_checkpoint(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in one_line_error(capsys, main(["train", "--setting", str(bad), "--out", str(tmp_path / "r")]))
    run = tmp_path / "run"
    run.mkdir()
    tiny_setting().save(str(run / "setting.json"))
    (run / "best.pt").write_bytes(b"garbage")
    assert "not a readable sm4 checkpoint" in one_line_error(capsys, main(["eval", str(run / "best.pt")]))
    with pytest.raises(ValueError):  # --debug: the exception itself, traceback and all
        main(["eval", str(run / "best.pt"), "--debug"])


def test_epochs_zero_is_refused_by_the_parser(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--setting", tiny, "--out", str(tmp_path / "r"), "--epochs", "0"])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_ctrl_c_says_where_to_resume(tiny, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--setting", tiny, "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "train", interrupted)
    assert main(["train", "--setting", tiny, "--out", str(run), "--quiet", "--epochs", "3"]) == 130
    err = capsys.readouterr().err
    assert "holds epoch 1; rerun the same command to resume" in err


def test_multibench_root_missing_says_what_to_download(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    err = one_line_error(capsys, main(["train", "--data", f"multibench:{missing}", "--tasks", "avmnist",
                                       "--out", str(tmp_path / "r")]))
    assert f"MultiBench root {str(missing)!r} not found" in err and "download" in err and "avmnist/" in err
    assert not missing.exists() and not (tmp_path / "r" / "setting.json").exists()


def test_multibench_trains_from_the_command_line(tmp_path, monkeypatch, data, capsys):
    import sm4.data

    calls = []

    def fake_load_multibench(root, tasks=None, setting=None):
        calls.append((root, tasks))
        return data

    monkeypatch.setattr(sm4.data, "load_multibench", fake_load_multibench)
    setting = tmp_path / "tiny.json"
    tiny_setting().save(str(setting))
    (tmp_path / "mb").mkdir()
    assert main(["train", "--data", f"multibench:{tmp_path / 'mb'}", "--tasks", "avmnist", "mimic", "--setting",
                 str(setting), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert calls == [(str(tmp_path / "mb"), ["avmnist", "mimic"])]
    assert json.loads((tmp_path / "r" / "data.json").read_text())["tasks"] == ["avmnist", "mimic"]
    assert main(["eval", str(tmp_path / "r" / "best.pt")]) == 0  # eval reads the run's data.json
    assert calls[-1] == (str(tmp_path / "mb"), ["avmnist", "mimic"])


def test_oversubscription_is_warned_about():
    from sm4.training.machine import oversubscription_warning

    assert "OMP_NUM_THREADS=1" in oversubscription_warning(load=5.0, available=2, threads=2)
    assert "OMP_NUM_THREADS=1" in oversubscription_warning(load=1.0, available=2, threads=2)  # one other process
    assert oversubscription_warning(load=0.2, available=2, threads=2) is None  # quiet
    assert oversubscription_warning(load=5.0, available=2, threads=1) is None
