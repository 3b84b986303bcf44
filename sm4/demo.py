"""``python -m sm4 demo`` (``make demo``): the main job, and a check of the kernels.

The main job trains SM4 (the medium setting, AEA and ALP on) and a dense model of equal FLOPs,
the same way, on the bundled multi-modal multi-task benchmark (sm4.data), with progress bars,
then prints a table: each task's test metric for both, the papers' Δ, parameters and inference
FLOPs per task (torch's flop counter, with sm4's op formulas), and the k AEA chose per modality;
and writes plots of the runs (runs/demo/curves.png).

``python -m sm4 demo --kernels`` instead runs a sparse MoE FFN layer at the papers' medium shape
(32 sequences x 24 tokens, d = 64, h = 128, E = 32, k = 2) through the reference path in float64
(the ground truth), the reference in float32 and automatic dispatch, then every op on every
backend that implements it here, against the reference: agreement and median times.
"""

import copy
import os
import time


import torch
from torch.utils import benchmark

import sm4
from sm4 import backends, ops


def median_ms(fn, min_run_time):
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def make_layer(tokens, dim, hidden, experts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    router = torch.randn(dim, experts, generator=g, dtype=torch.float64) / dim**0.5
    w1 = torch.randn(experts, dim, hidden, generator=g, dtype=torch.float64) / dim**0.5
    b1 = torch.zeros(experts, hidden, dtype=torch.float64)
    w2 = torch.randn(experts, hidden, dim, generator=g, dtype=torch.float64) / hidden**0.5
    b2 = torch.zeros(experts, dim, dtype=torch.float64)
    return [t.to(dtype) for t in (x, router, w1, b1, w2, b2)]


def run(args):
    return run_kernels(args) if args.kernels else run_main_job(args)


def run_main_job(args):
    from . import experiment
    from .data import load_bundled
    from .model import get_setting
    from .training import machine
    from .training.plots import plot_runs
    from .training.run_folder import read_log

    data = load_bundled()
    print(f"sm4 {sm4.__version__}, torch {torch.__version__}; machine: {machine.describe()}\n{data.description}\n")
    warning = machine.oversubscription_warning()
    if warning:
        print(warning)
    setting = get_setting(args.setting)
    setting.train.epochs = args.epochs
    runs = {}
    for label in ("SM4", "dense"):
        chosen = copy.deepcopy(setting)
        if label == "dense":  # the papers' Dense Model 1 (double depth: equal FLOPs), no adaptive mechanisms
            chosen.model.dense, chosen.model.dense_kind, chosen.train.aea, chosen.train.alp = True, "double_depth", False, False
            print("baseline: the papers' Dense Model 1 (dense layers of double depth: SM4's FLOPs)")
        start = time.perf_counter()
        model, trainer, test = experiment.train(chosen, data, os.path.join(args.out, label.lower()), resume=False,
                                                console=experiment.epoch_console)
        runs[label] = {"test": test, "trainer": trainer, "params": experiment.parameter_counts(model, data),
                       "flops": experiment.inference_flops(model, data), "seconds": time.perf_counter() - start}
        print(f"{label}: trained {chosen.train.epochs} epochs in {runs[label]['seconds']:.0f} s (best epoch {trainer.best_epoch})")
    print()
    header = f"{'task':<12}{'metric':<10}{'SM4':>9}{'dense':>9}{'params SM4':>12}{'dense':>9}{'MFLOP SM4':>11}{'dense':>8}"
    print(header)
    for task, spec in data.tasks.items():
        sm, dn = runs["SM4"], runs["dense"]
        print(f"{task:<12}{spec.metric:<10}{sm['test'][task][spec.metric]:>9.4f}{dn['test'][task][spec.metric]:>9.4f}"
              f"{sm['params'][task]:>12,}{dn['params'][task]:>9,}{sm['flops'][task] / 1e6:>11.2f}{dn['flops'][task] / 1e6:>8.2f}")
    delta = experiment.relative_delta(data, runs["SM4"]["test"], runs["dense"]["test"])
    print(f"\nΔ (SM4 vs dense, mean relative improvement, sign flipped for MSE): {delta:+.2f} %")
    print(f"k per modality chosen by AEA: {runs['SM4']['trainer'].aea.k}")
    print(f"machine at the end: {machine.describe()}")
    plot_path = os.path.join(args.out, "curves.png")
    # the whole runs from their logs (the trainers hold the best epoch's checkpoint, history up to it)
    plot_runs({label: read_log(os.path.join(args.out, label.lower())) for label in runs},
              {task: spec.metric for task, spec in data.tasks.items()}, plot_path)
    from .training.plots import plot_expert_usage

    usage_path = os.path.join(args.out, "expert_usage.png")
    sm4_model = runs["SM4"]["trainer"].model
    plot_expert_usage(experiment.expert_usage(sm4_model, data), sm4_model.modality_names, list(data.tasks), usage_path)
    print(f"plots: {plot_path}, {usage_path}; logs and checkpoints: {args.out}/<run>/")


def run_kernels(args):
    print(f"sm4 {sm4.__version__}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    for name, reason in sm4.available_backends().items():
        status = "available" if reason is None else f"unavailable: {reason}"
        ops_list = ", ".join(backends.BACKENDS[name].kernels) or "-"
        print(f"  backend {name:<9} {status}\n            ops: {ops_list}")

    tokens, dim, hidden, experts, k = args.tokens, 64, 128, 32, 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nMoE FFN layer, T={tokens} d={dim} h={hidden} E={experts} k={k}, {device}")
    exact_inputs = make_layer(tokens, dim, hidden, experts, torch.float64)
    exact = ops.moe_ffn(*exact_inputs, k, backend="reference").output
    print(f"  {'path':<22}{'dtype':<10}{'max |err| vs fp64':>18}{'forward ms':>12}{'fwd+bwd ms':>12}")
    for label, backend, dtype in (
        ("reference", "reference", torch.float64),
        ("reference", "reference", torch.float32),
        ("auto dispatch", None, torch.float32),
    ):
        inputs = [t.to(device) for t in make_layer(tokens, dim, hidden, experts, dtype)]
        out = ops.moe_ffn(*inputs, k, backend=backend).output
        error = (out.double().cpu() - exact).abs().max().item()
        forward = median_ms(lambda: ops.moe_ffn(*inputs, k, backend=backend), args.min_time)
        params = [t.detach().requires_grad_(True) for t in inputs]

        def step():
            result = ops.moe_ffn(*params, k, training=True, backend=backend)
            (result.output.square().mean() + result.routing.balance_loss(0.05)).backward()

        both = median_ms(step, args.min_time)
        print(f"  {label:<22}{str(dtype).replace('torch.', ''):<10}{error:>18.2e}{forward:>12.3f}{both:>12.3f}")

    print("\nEach op on each backend that implements it, against the reference (same inputs):")
    x, router = exact_inputs[0].float().to(device), exact_inputs[1].float().to(device)
    routing = ops.topk_gating(x, router, k, backend="reference")
    metadata = ops.routing_metadata(routing.expert_ids, experts, backend="reference")
    x_sorted = ops.permute(x, metadata, backend="reference")
    calls = {
        "topk_gating": (lambda b: ops.topk_gating(x, router, k, backend=b).gates),
        "expert_histogram": (lambda b: ops.expert_histogram(routing.expert_ids, experts, backend=b)[1]),
        "routing_metadata": (lambda b: ops.routing_metadata(routing.expert_ids, experts, backend=b).assignment_row),
        "permute": (lambda b: ops.permute(x, metadata, backend=b)),
        "unpermute": (lambda b: ops.unpermute(x_sorted, routing.gates, metadata, backend=b)),
    }
    print(f"  {'op':<18}{'backend':<11}{'max |diff|':>12}{'ms':>10}{'reference ms':>14}")
    for op, call in calls.items():
        expected = call("reference")
        reference_ms = median_ms(lambda: call("reference"), args.min_time)
        for backend in backends.PREFERENCE:
            if backend.name == "reference" or op not in backend.kernels:
                continue
            if backend.not_supported_reasons(op, [x], forced=True):
                continue
            got = call(backend.name)
            diff = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
            ms = median_ms(lambda: call(backend.name), args.min_time)
            print(f"  {op:<18}{backend.name:<11}{diff:>12.2e}{ms:>10.3f}{reference_ms:>14.3f}")
    unimplemented = [op for op in backends.STEP_OPS if not any(op in b.kernels for b in backends.PREFERENCE if b.name != "reference")]
    if unimplemented:
        print(f"  reference only so far: {', '.join(unimplemented)}")


def add_parser(subparsers):
    parser = subparsers.add_parser("demo", help="the main job: train SM4 and a dense model on the bundled benchmark")
    parser.add_argument("--kernels", action="store_true", help="instead: check and time an MoE layer on every backend")
    parser.add_argument("--setting", default="medium", help="small, medium, large or a setting file")
    parser.add_argument("--epochs", type=int, default=12, help="epochs per model (default 12: about two minutes on 2 cores)")
    parser.add_argument("--out", default="runs/demo", help="folder for logs, checkpoints and plots")
    parser.add_argument("--tokens", type=int, default=32 * 24, help="tokens (default: 32 x 24, the medium setting)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per measurement")
    parser.set_defaults(func=run)
