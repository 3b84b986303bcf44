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
