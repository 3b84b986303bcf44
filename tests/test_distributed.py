"""Data-parallel training with torch.distributed: two gloo processes on CPU take half of every batch
each and, over two whole epochs of a published-style setting (router noise, dropout, the heads'
BatchNorm, the balancing loss, AEA and ALP on) and of a dense baseline (dropout in its attention),
end with the same parameters, gradients, logged
losses, validation numbers, k and ALP weights as one process taking the whole batch
(sm4/training/distributed.py says why and how)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Subset

from sm4 import experiment
from sm4.data.bundled import MultiTaskData
from sm4.model import SETTINGS, ModelConfig, Setting
from sm4.training import Trainer, distributed

from .run_helpers import small_data

TASKS = ("digits", "diabetes")  # two modalities with AEA's keep passes and ALP's weights; a regression
ROWS = {"train": 135, "val": 60, "test": 10}


def data():
    full = small_data(TASKS)
    splits = {task: {split: Subset(full.splits[task][split], range(rows)) for split, rows in ROWS.items()}
              for task in TASKS}
    return MultiTaskData(full.modalities, full.tasks, splits, "a slice of the bundled digits and diabetes")


def setting(kind="sparse"):
    """The small setting's model choices and training, at a size that trains in seconds: noise,
    dropout 0.1, the heads' BatchNorm, the balancing loss, AEA and ALP as published. A batch of
    45 rows: shares of 23 and 22 rows (the losses' weights must follow the shares).

    kind "dense": the papers' Dense Model 1 (dense attention and FFN, twice the depth), dropout
    0.1 in its attention, AEA and ALP off (as ``--dense``)."""
    small = SETTINGS["small"]
    sizes = dict(latent_tokens=4, width=16, cross_head_dim=16, latent_heads=2, latent_head_dim=8, heads=2,
                 ffn_hidden=16, num_experts=4, top_k=2)
    if kind == "dense":
        sizes.update(dense=True, dense_kind="double_depth")
    model = dataclasses.replace(small.model, **sizes)
    assert model.noise_std > 0 and model.dropout > 0 and model.head_batch_norm and model.balance_loss_weight > 0
    train = dataclasses.replace(small.train, epochs=2, batch_size=45, lr=3e-3, task_batch_size={},
                                task_train_weight={"digits": 2.0}, task_eval_weight={})
    assert train.aea and train.alp and train.epoch_schedule == "once"
    if kind == "dense":
        train = dataclasses.replace(train, aea=False, alp=False)
    return Setting("ddp", model, train)


def train_once(out_dir, kind="sparse"):
    torch.manual_seed(0)
    s = setting(kind)
    trainer = Trainer(experiment.build_model(s, data()), data(), s.train, out_dir, progress=False)
    trainer.fit(resume=False)
    return trainer


def result_of(trainer) -> dict:
    return {"model": trainer.model.state_dict(), "history": trainer.history, "k": dict(trainer.aea.k),
            "alp": dict(trainer.alp.weights),
            "grads": {name: None if p.grad is None else p.grad.clone() for name, p in trainer.model.named_parameters()}}


def count_host_reads(module_file):
    """Patch the tensor-to-host reads (tolist, item, bool, int, float) to count the calls made from
    ``module_file``; returns the counter (a one-element list)."""
    import sys

    count = [0]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename == module_file:
                count[0] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    return count


def assert_near(actual, expected, name, rel=3e-5):
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), name
        return
    error = (actual.double() - expected.double()).norm().item()
    assert error <= rel * expected.double().norm().item() + 1e-12, f"{name}: |difference| {error:.3g}, |tensor| {expected.norm():.3g}"


def _worker(index, world, init_file, out_dir, result_file, kind="sparse"):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=index, world_size=world)
    torch.set_num_threads(1)
    try:
        reads = count_host_reads(distributed.__file__)
        steps = []
        step = torch.optim.Adam.step
        torch.optim.Adam.step = lambda self, *a, **k: (steps.append(1), step(self, *a, **k))[1]
        trainer = train_once(out_dir, kind)
        torch.save({**result_of(trainer), "host_reads": reads[0], "steps": len(steps)}, f"{result_file}.{index}")
    finally:
        distributed.finish()  # a barrier, then the teardown


def test_share_splits_every_batch_exactly():
    inputs, target = {"a": torch.arange(10.0).view(5, 2)}, torch.arange(5)
    parts = [distributed.share((inputs, target), world=2, index=i) for i in range(2)]
    assert [p[0][1].tolist() for p in parts] == [[0, 2, 4], [1, 3]]
    assert sum(fraction for _, fraction in parts) == 1.0
    with pytest.raises(ValueError, match="a batch of 1 rows cannot be shared by 2 processes"):
        distributed.share(({"a": torch.zeros(1, 2)}, torch.zeros(1)), world=2, index=0)


def test_a_share_draws_its_rows_of_the_whole_batch():
    """Noise and dropout for rows 1 and 3 of a batch of 5 are rows 1 and 3 of the whole batch's draws."""
    from sm4 import reference
    from sm4.modules import batch_share

    def draws(index, world, rows):
        with batch_share.sharing(1234, 5, index, world):
            noise = reference.router_noise(rows * 3, 4, "cpu")  # 3 tokens per sample
            kept = batch_share.dropout(torch.ones(rows, 2, 6), 0.5)
        return noise.view(rows, 3, 4), kept

    whole_noise, whole_kept = draws(0, 1, 5)
    part_noise, part_kept = draws(1, 2, 2)
    torch.testing.assert_close(part_noise, whole_noise[1::2], rtol=0, atol=0)
    torch.testing.assert_close(part_kept, whole_kept[1::2], rtol=0, atol=0)
    assert set(whole_kept.unique().tolist()) == {0.0, 2.0}
    assert batch_share.current() is None and reference.sample_noise is None  # restored after the block


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_two_gloo_processes_match_one_with_the_published_settings(tmp_path, kind):
    """sparse: the published SM4 setting. dense: the Dense Model 1 baseline, whose attention
    dropout (torch's nn.MultiheadAttention before DenseAttention) drew per process."""
    result = tmp_path / "ddp.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(result), kind), nprocs=2,
                       join=True, start_method="spawn")
    single = result_of(train_once(str(tmp_path / "single"), kind))
    ranks = [torch.load(f"{result}.{index}") for index in range(2)]
    for ddp in ranks:
        # the "which parameters have a gradient" read is made once per set of them (here every step
        # has both tasks: one set), not once a step; plus GradientSum.check's once an epoch
        assert ddp["steps"] == 6 and ddp["host_reads"] == 1 + 2, (ddp["steps"], ddp["host_reads"])
    for ddp in ranks:  # both processes hold the single-process model (and made the same decisions)
        # Relative to each tensor's norm: Adam divides each element's gradient by its own scale, so
        # an element whose gradient is near zero moves by about lr whatever its rounding: compared
        # element by element, such elements differ by ~1e-5 of the largest weight after two epochs.
        for name, value in single["model"].items():
            assert_near(ddp["model"][name], value, name)
        for name, grad in single["grads"].items():  # the last step's gradient, summed over the processes
            assert (ddp["grads"][name] is None) == (grad is None), name
            if grad is not None:
                assert_near(ddp["grads"][name], grad, f"gradient of {name}")
        assert ddp["k"] == single["k"]
        assert ddp["alp"] == pytest.approx(single["alp"], abs=1e-6)
        assert len(ddp["history"]) == len(single["history"]) == 2
        for logged, expected in zip(ddp["history"], single["history"]):
            assert logged["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
            assert logged["aux_loss"] == pytest.approx(expected["aux_loss"], rel=1e-6)
            for task, values in expected["val"].items():
                assert logged["val"][task] == pytest.approx(values, rel=1e-5, abs=1e-7), task
            assert logged["k"] == expected["k"] and logged["extra"]["aea"]["active"] == expected["extra"]["aea"]["active"]
            assert logged["alp_weights"] == pytest.approx(expected["alp_weights"], abs=1e-6)
            assert logged["entropy"] == pytest.approx(expected["entropy"], rel=1e-6)
            assert logged["best_epoch"] == expected["best_epoch"]
    assert (tmp_path / "ddp" / "last.pt").exists()  # process 0 wrote the checkpoint
