"""The training loop on the bundled benchmark: it learns every task, resumes bit-identically from a
checkpoint, writes its log and checkpoints atomically, and the command lines work."""

import json

import pytest
import torch

from sm4 import experiment
from sm4.data import load_bundled
from sm4.model import ModelConfig, Setting, TrainConfig
from sm4.training import Trainer

CHANCE = {"digits": 0.1, "mnist1d": 0.1, "wine": 0.4, "cancer": 0.63}  # majority class for wine/cancer


@pytest.fixture(scope="module")
def data():
    return load_bundled()


def tiny_setting(epochs=2, **train):
    model = ModelConfig(latent_tokens=4, width=32, cross_head_dim=32, latent_heads=2, latent_head_dim=16, heads=4,
                        ffn_hidden=32, num_experts=4, top_k=2, dropout=0.1)
    return Setting("tiny", model, TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, cosine=False, **train))


def test_a_short_run_beats_chance_on_every_task(data, tmp_path):
    model, trainer, test = experiment.train(tiny_setting(epochs=3), data, str(tmp_path), progress=False)
    for task, accuracy_floor in CHANCE.items():
        assert test[task]["accuracy"] > accuracy_floor + 0.1, (task, test[task])
    assert test["diabetes"]["mse"] < 1.0  # standardised target: predicting the mean gives ~1
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2, 3]
    assert set(log[-1]["k"]) == set(data.modalities) and set(log[-1]["alp_weights"]) == set(data.modalities)
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # no temporary file left behind


def test_resume_continues_bit_identically(data, tmp_path):
    setting = tiny_setting(epochs=2)
    torch.manual_seed(0)
    straight = Trainer(experiment.build_model(setting, data), data, setting.train, str(tmp_path / "a"), progress=False)
    straight.fit()

    torch.manual_seed(0)
    first = Trainer(experiment.build_model(setting, data), data, Setting.from_dict(setting.to_dict()).train,
                    str(tmp_path / "b"), progress=False)
    first.config.epochs = 1
    first.fit()
    torch.manual_seed(123)  # whatever happens in between, the checkpoint restores every RNG
    resumed = Trainer(experiment.build_model(setting, data), data, setting.train, str(tmp_path / "b"), progress=False)
    resumed.fit(resume=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert straight.aea.k == resumed.aea.k and straight.alp.weights == resumed.alp.weights
    assert [e["val"] for e in straight.history] == [e["val"] for e in resumed.history]


def test_a_corrupt_checkpoint_is_refused_clearly(data, tmp_path):
    setting = tiny_setting(epochs=1)
    trainer = Trainer(experiment.build_model(setting, data), data, setting.train, str(tmp_path), progress=False)
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="last.pt: not a readable sm4 checkpoint"):
        trainer.fit(resume=True)


def test_command_lines(data, tmp_path, capsys):
    from sm4.__main__ import main

    setting = tmp_path / "tiny.json"
    tiny_setting(epochs=1).save(str(setting))
    run = tmp_path / "run"
    assert main(["train", "--setting", str(setting), "--out", str(run), "--quiet", "--no-alp"]) == 0
    out = capsys.readouterr().out
    assert "test:" in out and "digits" in out
    assert main(["eval", str(run / "best.pt"), "--split", "val"]) == 0
    assert "val:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])


def test_expert_usage_counts_every_assignment(data, tmp_path):
    torch.manual_seed(0)
    setting = tiny_setting()
    model = experiment.build_model(setting, data)
    model.set_modality_k({"image": 1})
    usage = experiment.expert_usage(model, data, split="val")
    assert set(usage) == {"layer0.attn.q", "layer0.attn.k", "layer0.attn.v", "layer0.ffn"}
    latents = setting.model.latent_tokens
    expected = 0
    for task, spec in data.tasks.items():
        samples = len(data.splits[task]["val"])
        expected += sum(samples * latents * (1 if m == "image" else 2) for m in spec.modalities)
    for counts in usage.values():
        assert counts["modality"].sum() == expected and counts["task"].sum() == expected
    image = model.modality_names.index("image")
    assert counts["modality"][image].sum() == len(data.splits["digits"]["val"]) * latents  # k = 1 for images
    from sm4.training.plots import plot_expert_usage

    plot_expert_usage(usage, model.modality_names, list(data.tasks), str(tmp_path / "usage.png"))
    assert (tmp_path / "usage.png").stat().st_size > 0


def imbalanced_data(n=48, minority=4):
    """One MultiBench-style task whose train split carries class-balanced sampling weights (as
    ENRICO's): ``minority`` of ``n`` samples are class 1."""
    from sm4.data.bundled import SPLITS, ModalitySpec, MultiTaskData, TaskSpec
    from sm4.data.multibench import MultiBenchDataset
    from sm4.data.multibench._common import class_balanced_weights

    targets = torch.zeros(n, dtype=torch.int64)
    targets[:minority] = 1
    features = torch.randn(n, 4, 3, generator=torch.Generator().manual_seed(0))
    modalities = {"t.x": ModalitySpec("t.x", "sequence", (4, 3))}
    splits = {split: MultiBenchDataset("t", modalities, lambda row: {"t.x": features[row].numpy()}, range(n), targets, "mem")
              for split in SPLITS}
    splits["train"].sampling_weights = class_balanced_weights(targets)
    return MultiTaskData(modalities=modalities, tasks={"t": TaskSpec("t", ("t.x",), "classification", 2, "accuracy")},
                         splits={"t": splits}, description="imbalanced")


def test_the_trainer_draws_a_split_with_its_own_sampler_seeded(tmp_path):
    """MultiBench samples ENRICO's train split class-balanced (WeightedRandomSampler): the trainer
    draws through the split's sampler, from its seeded shuffle generator (the same seed, the same
    draws); validation is read in order."""
    data = imbalanced_data()
    setting = tiny_setting(epochs=1)
    setting.train.batch_size = 8

    def drawn(seed):
        setting.train.seed = seed
        trainer = Trainer(experiment.build_model(setting, data), data, setting.train, str(tmp_path / str(seed)),
                          progress=False)
        loader = trainer._loaders("train", shuffle=True)["t"]
        assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
        assert not isinstance(trainer._loaders("val", shuffle=False)["t"].sampler, torch.utils.data.WeightedRandomSampler)
        draws = torch.cat([target for _ in range(5) for _, target in loader])
        trainer.train_epoch()  # trains through it
        return draws

    first = drawn(0)
    assert torch.equal(first, drawn(0)) and not torch.equal(first, drawn(1))
    # uniform shuffling would give 4 / 48 = 8 % of class 1; balanced, about half
    assert 0.35 < first.float().mean() < 0.65, first.float().mean()


def test_bars_for_the_epoch_validation_aea_passes_and_the_test_pass(tmp_path, monkeypatch):
    """#18: a bar for training, validation, each AEA pass (one per modality of a multimodal task)
    and the test pass; none with progress=False."""
    from sm4.training import trainer as trainer_module

    from .run_helpers import small_data, tiny_setting as small_setting

    shown = []
    plain = trainer_module._progress
    monkeypatch.setattr(trainer_module, "_progress",
                        lambda iterable, description, enabled: (shown.append((description, enabled)),
                                                                plain(iterable, description, False))[1])
    from torch.utils.data import Subset

    from sm4.data.bundled import MultiTaskData

    full = small_data(("digits",))  # a slice: a few steps and batches of each kind
    splits = {"digits": {split: Subset(full.splits["digits"][split], range(rows))
                         for split, rows in {"train": 100, "val": 40, "test": 20}.items()}}
    data = MultiTaskData(full.modalities, full.tasks, splits, "a slice of digits")
    experiment.train(small_setting(epochs=1), data, str(tmp_path / "a"), progress=True)
    bars = {description for description, enabled in shown if enabled}
    assert {"epoch 1/1", "val digits", "test digits"} <= bars
    assert {f"AEA {m} digits" for m in data.tasks["digits"].modalities} <= bars
    shown.clear()
    experiment.train(small_setting(epochs=1), data, str(tmp_path / "b"), progress=False)
    assert shown and not any(enabled for _, enabled in shown)


@pytest.mark.parametrize("dense", [False, True])
def test_a_training_step_walks_no_module_tree(tmp_path, monkeypatch, dense):
    """Profile-guided: walking model.modules() each step cost more than the small models' layers;
    the trainer finds its modules once (a dense model's zero balancing loss walked it every step)."""
    import dataclasses

    from torch import nn

    from .run_helpers import small_data, tiny_setting as small_setting

    data = small_data(("wine",))
    setting = small_setting(epochs=1)
    setting = dataclasses.replace(setting, model=dataclasses.replace(setting.model, dense=dense))
    trainer = Trainer(experiment.build_model(setting, data), data, setting.train, str(tmp_path), progress=False)
    trainer.model.train()
    monkeypatch.setattr(trainer.model, "train", lambda mode=True: trainer.model)  # once an epoch, not a step
    walks = []
    for name in ("modules", "named_modules", "children", "named_children"):
        original = getattr(nn.Module, name)
        monkeypatch.setattr(nn.Module, name, lambda self, *a, _o=original, _n=name, **k: (walks.append(_n), _o(self, *a, **k))[1])
    trainer.train_epoch()
    assert walks == []
