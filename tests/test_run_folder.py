"""Run folders: the logged losses, resume semantics (extend, refuse a changed configuration with
the differences named, setting.json untouched), one writer at a time, a fresh start's new log,
file modes, and the plots of a run."""

import json
import os
import shutil
import stat

import pytest
import torch

from sm4 import experiment
from sm4.training.run_folder import ResumeMismatch, RunFolderBusy, locked
from sm4.training.trainer import Trainer

from .run_helpers import small_data, tiny_setting


@pytest.fixture(scope="module")
def data():
    return small_data(("wine",))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 1-epoch run (cosine schedule); tests take copies."""
    folder = tmp_path_factory.mktemp("finished")
    experiment.train(tiny_setting(epochs=1, cosine=True), data, str(folder), progress=False)
    return folder


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def log_of(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_train_loss_and_aux_loss_are_logged_apart(data, tmp_path):
    experiment.train(tiny_setting(), data, str(tmp_path / "sm4"), progress=False)
    dense = tiny_setting()
    dense.model.dense, dense.train.aea, dense.train.alp = True, False, False
    experiment.train(dense, data, str(tmp_path / "dense"), progress=False)
    (sparse_entry,), (dense_entry,) = log_of(tmp_path / "sm4"), log_of(tmp_path / "dense")
    assert sparse_entry["aux_loss"] > 0 and sparse_entry["train_loss"] != sparse_entry["aux_loss"]
    assert dense_entry["aux_loss"] == 0.0 and dense_entry["train_loss"] > 0.1  # no experts, no balancing loss


def test_extending_a_run_rebuilds_the_schedule_for_the_new_length(data, finished, tmp_path):
    tmp_path = copy_of(finished, tmp_path)
    finished = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    longer = tiny_setting(epochs=2, cosine=True)
    torch.manual_seed(0)
    trainer = Trainer(experiment.build_model(longer, data), data, longer.train, str(tmp_path), progress=False)
    starts = []
    trainer.fit(resume=True, on_start=starts.append)
    assert starts == [1]  # resumed from epoch 1
    # epoch 2 of 2 trains at the cosine's midpoint lr (the 1-epoch schedule had ended at 0)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the end of the 2-epoch schedule
    lr_of_epoch_2 = trainer.history[-1]  # the log holds both epochs
    assert [e["epoch"] for e in log_of(tmp_path)] == [1, 2] and lr_of_epoch_2["epoch"] == 2
    changed = [name for name, value in trainer.model.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, finished[name])]
    assert changed, "epoch 2 changed no parameter"


def test_rebuilt_schedule_is_the_new_lengths(data, finished, tmp_path):
    tmp_path = copy_of(finished, tmp_path)
    longer = tiny_setting(epochs=4, cosine=True)
    trainer = Trainer(experiment.build_model(longer, data), data, longer.train, str(tmp_path), progress=False)
    trainer.load_checkpoint(str(tmp_path / "last.pt"), check=True)
    # after 1 of 4 epochs: lr * (1 + cos(pi / 4)) / 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * (1 + 2**-0.5) / 2, rel=1e-9)


@pytest.mark.parametrize("change, named", [
    (lambda s: setattr(s.train, "lr", 0.01), "train.lr 0.003 -> 0.01"),
    (lambda s: setattr(s.train, "alp", False), "train.alp True -> False"),
    (lambda s: setattr(s.model, "num_experts", 8), "model.num_experts 4 -> 8"),
])
def test_a_resume_with_another_configuration_is_refused_before_anything_is_written(data, finished, tmp_path, change,
                                                                                    named):
    tmp_path = copy_of(finished, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("setting.json", "log.jsonl", "last.pt", "best.pt")}
    other = tiny_setting(epochs=2, cosine=True)
    change(other)
    with pytest.raises(ResumeMismatch, match="only --epochs may change") as error:
        experiment.train(other, data, str(tmp_path), progress=False)
    assert named in str(error.value) and "--no-resume" in str(error.value) and "--out" in str(error.value)
    assert "\n" not in str(error.value)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # nothing rewritten


def test_a_checkpoint_of_another_model_is_refused_in_one_line(data, finished, tmp_path):
    tmp_path = copy_of(finished, tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    del state["configuration"]  # as an older sm4 wrote it
    torch.save(state, tmp_path / "last.pt")
    other = tiny_setting(cosine=True)
    other.model.num_experts = 8
    with pytest.raises(ResumeMismatch, match="belongs to another model") as error:
        experiment.train(other, data, str(tmp_path), progress=False)
    assert "\n" not in str(error.value)


def test_a_second_writer_is_refused(data, tmp_path):
    with locked(str(tmp_path)):
        with pytest.raises(RunFolderBusy, match=f"{tmp_path} is in use by another training \\(pid {os.getpid()}\\)"):
            experiment.train(tiny_setting(), data, str(tmp_path), progress=False)
    assert not (tmp_path / "setting.json").exists()
    with locked(str(tmp_path)):  # released when the holder leaves
        pass


def test_a_fresh_start_begins_a_new_log(data, finished, tmp_path):
    tmp_path = copy_of(finished, tmp_path)
    experiment.train(tiny_setting(cosine=True), data, str(tmp_path), progress=False, resume=False)
    assert [e["epoch"] for e in log_of(tmp_path)] == [1]


def test_files_get_the_users_umask(data, tmp_path):
    previous = os.umask(0o027)
    try:
        experiment.train(tiny_setting(), data, str(tmp_path), progress=False)
        # and the atomic writes get the umask, not a temporary file's 0600
        from sm4._io import write_text_atomically

        write_text_atomically(str(tmp_path / "note.txt"), "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "note.txt").stat().st_mode) == 0o640
    for name in ("setting.json", "log.jsonl", "last.pt", "best.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_plots_label_their_axes_and_share_one_colour_scale(data, tmp_path, monkeypatch):
    from sm4.training import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.append(figure))
    history = [{"epoch": e, "val": {"wine": {"accuracy": 0.5 + e / 10}}, "k": {"chem": 1 + e // 2},
                "alp_weights": {"chem": 1.0}} for e in (1, 2, 3)]
    plots.plot_runs({"SM4": history, "dense": history}, {"wine": "accuracy"}, str(tmp_path / "c.png"))
    task_axis, k_axis, alp_axis = figures[0].axes[:3]
    assert task_axis.get_ylabel() == "validation accuracy" and k_axis.get_ylabel() and alp_axis.get_ylabel()
    assert all(tick == int(tick) for tick in k_axis.get_yticks())
    assert task_axis.get_legend() is None and figures[0].legends  # the runs' legend sits below the panels
    usage = {"layer0.ffn": {"modality": torch.tensor([[3.0, 1.0]]), "task": torch.tensor([[1.0, 1.0]])},
             "layer1.ffn": {"modality": torch.tensor([[0.0, 2.0]]), "task": torch.tensor([[4.0, 0.0]])}}
    plots.plot_expert_usage(usage, ["chem"], ["wine"], str(tmp_path / "u.png"))
    images = [image for axis in figures[1].axes for image in axis.images]
    assert len(images) == 4 and {image.get_clim() for image in images} == {(0.0, 1.0)}
    assert len(figures[1].axes) == 5  # four panels and the colour bar


def test_the_demo_plots_the_whole_runs(data, tmp_path, monkeypatch, capsys):
    import argparse

    import sm4.data
    from sm4 import demo
    from sm4.training import plots

    monkeypatch.setattr(sm4.data, "load_bundled", lambda: data)
    plotted = {}
    monkeypatch.setattr(plots, "plot_runs", lambda histories, metrics, path: plotted.update(histories))
    monkeypatch.setattr(plots, "plot_expert_usage", lambda *args: None)
    monkeypatch.setattr(Trainer, "score", lambda self, results: -len(self.history))  # epoch 1 is the best
    setting = tmp_path / "tiny.json"
    tiny_setting().save(str(setting))
    demo.run_main_job(argparse.Namespace(setting=str(setting), epochs=3, out=str(tmp_path / "demo")))
    assert {label: [e["epoch"] for e in history] for label, history in plotted.items()} == {"SM4": [1, 2, 3],
                                                                                         "dense": [1, 2, 3]}
    out = capsys.readouterr().out  # the figure's machine and load, at the start and the end
    assert "machine: " in out and "machine at the end: " in out and out.count("load average") >= 2
