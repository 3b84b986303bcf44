"""The command line: errors are one line with exit status 2 (a traceback only with --debug), Ctrl-C
says where to resume (130), a resume says where it starts, eval --json, MultiBench from --data."""

import json
import re

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
    # one line per epoch: train loss, each task's validation metric, k and ALP weight per modality
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 1 and "val: wine accuracy 0." in epoch_lines[0] and re.search(r"\|\s+chem k=[12] w=1\.000$", epoch_lines[0])
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


# The whole process, as a user runs it: optional packages hidden (as on an install without them),
# the worktree's sm4.
_CLI = "import sys; sys.modules.update(dict.fromkeys({hide!r})); from sm4.__main__ import main; sys.exit(main())"


def run_cli(*arguments, hide=("yaml",)):
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", _CLI.format(hide=list(hide)), *arguments], capture_output=True,
                          text=True, cwd=root, timeout=300)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "run").mkdir()
    (folder / "run" / "log.jsonl").write_text("{not json\n")
    (folder / "empty").mkdir()
    (folder / "empty" / "log.jsonl").write_text("")
    (folder / "bench.json").write_text(json.dumps({"benchmarks": [], "machine_info": {}}))
    (folder / "setting.yaml").write_text("model: {}\n")
    return folder


@pytest.mark.parametrize("arguments, message", [
    (["report", "run", "{f}/missing"], "log.jsonl not found"),
    (["report", "run", "{f}/run"], "line 1 is not JSON"),
    (["report", "run", "{f}/empty"], "has no epochs yet"),
    (["bench", "report", "--peers", "{f}/bench.json"], "has no timed bench_peer.py rows"),
    (["train", "--setting", "{f}/setting.yaml", "--out", "{f}/out"], "reading YAML needs PyYAML"),
    (["train", "--epochs", "0", "--out", "{f}/out"], "must be at least 1"),
])
def test_every_cli_error_is_one_line_and_status_2_in_a_real_process(bad_inputs, arguments, message):
    """Each of these exited 1 (``raise SystemExit(message)``) or printed argparse's usage block."""
    result = run_cli(*(argument.format(f=bad_inputs) for argument in arguments))
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert not (bad_inputs / "out").exists()


def test_debug_keeps_the_traceback_and_is_in_help(bad_inputs):
    result = run_cli("report", "run", f"{bad_inputs}/missing", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "FileNotFoundError" in result.stderr
    assert "--debug" in run_cli("--help").stdout


def test_plots_without_matplotlib_say_how_to_install_it(bad_inputs):
    run = bad_inputs / "logged"
    run.mkdir(exist_ok=True)
    entry = {"epoch": 1, "val": {"wine": {"loss": 1.0, "accuracy": 0.5}}, "k": {"chem": 1}, "alp_weights": {"chem": 1.0}}
    (run / "log.jsonl").write_text(json.dumps(entry) + "\n")
    result = run_cli("report", "run", str(run), hide=("matplotlib", "matplotlib.pyplot"))
    err = result.stderr.strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1 and 'pip install "sm4[plots]"' in err, err


def test_hdf5_without_h5py_says_how_to_install_it(monkeypatch):
    import sys

    from sm4.data.multibench import _common

    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="needs h5py \\(pip install h5py\\)"):
        _common._h5py()


def test_info_shows_the_built_backends_and_help_documents_epochs(capsys):
    assert main(["info"]) == 0
    assert "sm4: built backends:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS epochs to train in all (default: the setting's, 100 for the published ones)" in help_text
