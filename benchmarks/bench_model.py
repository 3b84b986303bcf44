"""The SM4 model end to end: one batch's inference per MultiBench task shape (sm4.report's shapes,
the loaders' default tokenisation), SM4 at the medium setting on each backend beside the dense
model of equal FLOPs (``dense_model``, the papers' HighMMT-style dense baseline) and SM4 on the
reference path. ``extra_info`` also carries the task's parameters; the FLOPs are torch's flop
counter's, with sm4's op formulas (``sm4.flops``). ``python -m sm4 report flops`` prints the
per-sample table with the papers' numbers beside ours.
"""

import pytest
import torch

from sm4.flops import count_flops
from sm4.model import SM4Model, get_setting
from sm4.report import MULTIBENCH_SHAPES

from .bench_grouped_gemm import skip_reason, sync

BATCH = 32
PATHS = ["dense_model", "reference", "cpu", "cuda", "triton"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("task", ["avmnist", "enrico", "mimic"])
def test_sm4_model_inference(benchmark, record, device, task, path):
    reason = None if path == "dense_model" else skip_reason(path, device, op="expert_ffn")
    if reason:
        pytest.skip(reason)
    modalities, outputs = MULTIBENCH_SHAPES[task]
    config = get_setting("medium").model
    config.dense = path == "dense_model"
    config.backend = None if path == "dense_model" else path
    torch.manual_seed(0)
    model = SM4Model(config, modalities, {task: (tuple(modalities), outputs)}).to(device).eval()
    inputs = {name: torch.rand(BATCH, *shape, device=device) for name, (_, shape) in modalities.items()}
    flops = count_flops(model, task, inputs)

    def run():
        with torch.no_grad():
            model(task, inputs)
        sync(device)

    benchmark(run)
    parameters = sum(p.numel() for p in model.parameters())
    benchmark.extra_info["parameters"] = parameters
    record("sm4_model_inference", f"medium_{task}_batch{BATCH}", path,
           flops=flops, bytes_moved=4 * (parameters + sum(x.numel() for x in inputs.values())))


@pytest.mark.parametrize("path", ["torch_grouped_mm", "cpu"])  # the baseline first: the speedup needs it
def test_sm4_model_training_step(benchmark, record, device, path):
    """One training step of SM4 at the medium setting on the bundled benchmark, as Trainer.train_epoch
    takes it: a batch of every task, each task's loss and the balancing losses, one backward, one
    Adam step. ``torch_grouped_mm``: the same model with its experts and gating swapped onto the
    transformers-style peer (benchmarks/peers/swap.py). Target (issue #13): cpu >= 1.5x it."""
    if device.type != "cpu":
        pytest.skip("the torch_grouped_mm model is the CPU peer here")
    from sm4.data import load_bundled, task_loader
    from sm4.experiment import build_model
    from sm4.modules import collect_aux_loss
    from sm4.training.trainer import task_loss

    from .peers.swap import use_torch_grouped_mm_experts

    data = load_bundled()
    setting = get_setting("medium")
    setting.model.backend = "cpu"
    torch.manual_seed(0)
    model = build_model(setting, data).to(device).train()
    if path == "torch_grouped_mm":
        use_torch_grouped_mm_experts(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=setting.train.lr)
    batches = {task: next(iter(task_loader(data, task, "train", setting.train.batch_size))) for task in data.tasks}

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for task, (inputs, target) in batches.items():
            loss = loss + data.tasks[task].train_weight * task_loss(data.tasks[task].kind, model(task, inputs), target)
            loss = loss + collect_aux_loss(model)
        loss.backward()
        optimizer.step()

    benchmark(step)
    parameters = sum(p.numel() for p in model.parameters())
    record("sm4_model_training_step", f"medium_bundled_batch{setting.train.batch_size}", path,
           flops=0, bytes_moved=4 * 2 * parameters)
