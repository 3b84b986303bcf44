"""Data-parallel training with torch.distributed: two gloo processes on CPU take half of every batch
each and, over a whole epoch, end with the same parameters, the same logged losses and the same
validation numbers as one process taking the whole batch (for a deterministic model: see
sm4/training/distributed.py for why the published settings are a different draw)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sm4 import experiment
from sm4.model import ModelConfig, Setting, TrainConfig
from sm4.training import Trainer, distributed

from .run_helpers import small_data


def setting():
    # Deterministic across processes: no router noise, no dropout, no batch statistics; the
    # balancing loss is per process (its CV^2 sees local tokens), so it is off for the comparison.
    model = ModelConfig(latent_tokens=4, width=16, cross_head_dim=16, latent_heads=2, latent_head_dim=8, heads=2,
                        ffn_hidden=16, num_experts=4, top_k=2, dropout=0.0, noise_std=0.0, balance_loss_weight=0.0,
                        head_batch_norm=False)
    return Setting("ddp", model, TrainConfig(epochs=1, batch_size=64, lr=1e-3, cosine=False))


def train_once(out_dir):
    data = small_data(("wine", "cancer"))  # two modalities, a few steps: an epoch is quick
    torch.manual_seed(0)
    s = setting()
    trainer = Trainer(experiment.build_model(s, data), data, s.train, out_dir, progress=False)
    trainer.fit(resume=False)
    return trainer


def _worker(index, world, init_file, out_dir, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=index, world_size=world)
    torch.set_num_threads(1)
    try:
        trainer = train_once(out_dir)
        if index == 0:
            torch.save({"model": trainer.model.state_dict(), "alp": trainer.alp.weights, "k": trainer.aea.k,
                        "history": trainer.history}, result_file)
    finally:
        distributed.finish()  # a barrier, then the teardown


def test_share_splits_every_batch_exactly():
    inputs, target = {"a": torch.arange(10.0).view(5, 2)}, torch.arange(5)
    parts = [distributed.share((inputs, target), world=2, index=i) for i in range(2)]
    assert [p[0][1].tolist() for p in parts] == [[0, 2, 4], [1, 3]]
    assert sum(fraction for _, fraction in parts) == 1.0


def test_two_gloo_processes_match_one(tmp_path):
    single = train_once(str(tmp_path / "single"))
    result = tmp_path / "ddp.pt"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(result)), nprocs=2,
                       join=True, start_method="spawn")
    ddp = torch.load(result)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp["model"][name], value, atol=2e-5, rtol=1e-4, msg=name)
    (logged,), (expected,) = ddp["history"], single.history  # the whole epoch's entry
    # the logged losses are the whole batch's (they were once summed twice: train loss = aux loss, doubled)
    assert logged["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert logged["aux_loss"] == pytest.approx(expected["aux_loss"], abs=1e-7)
    for task, values in expected["val"].items():
        assert logged["val"][task] == pytest.approx(values, rel=1e-4, abs=1e-5), task
    assert ddp["k"] == single.aea.k
    assert ddp["alp"] == pytest.approx(single.alp.weights, abs=1e-6)
    assert (tmp_path / "ddp" / "last.pt").exists()  # process 0 wrote the checkpoint
