"""``python -m sm4 report``: tables and plots that need no training.

    python -m sm4 report flops            # per-task parameters and inference FLOPs (papers' Table 2 columns)
    python -m sm4 report run runs/sm4     # plots of a training run from its log.jsonl

``flops`` builds SM4 at each published setting, and the dense model of equal FLOPs, for the
MultiBench task shapes that ``sm4.data.multibench`` produces by default (no data files needed:
the shapes are the loaders' defaults), counts one sample's inference with torch's flop counter
(sm4's ops included) and prints the papers' own numbers beside ours where they published them.
"""

import json
import os

import torch

# The MultiBench task shapes as sm4.data.multibench's loaders produce them by default.
# task: ({modality: (kind, per-sample shape)}, outputs)
MULTIBENCH_SHAPES = {
    "avmnist": ({"avmnist.image": ("image", (7, 7, 16)), "avmnist.audio": ("image", (7, 7, 256))}, 10),
    "enrico": ({"enrico.screenshot": ("image", (32, 16, 192)), "enrico.wireframe": ("image", (32, 16, 192))}, 20),
    "push": ({"push.gripper_pos": ("sequence", (16, 3)), "push.gripper_sensors": ("sequence", (16, 7)),
              "push.control": ("sequence", (16, 7)), "push.image": ("image", (32, 32, 16))}, 32),
    "mosei": ({"mosei.vision": ("sequence", (50, 35)), "mosei.audio": ("sequence", (50, 74)),
               "affect.text": ("sequence", (50, 300))}, 2),
    "mimic": ({"mimic.static": ("tabular", (5, 1)), "mimic.timeseries": ("sequence", (24, 12))}, 2),
}

# Per-task inference GFLOPs the papers report for the medium setting (SM4_SPEC §4).
PAPER_GFLOPS = {"enrico": {"SM4": 1.10, "HighMMT": 79.48}, "push": {"SM4": 2.33, "HighMMT": 21.60},
                "avmnist": {"SM4": 0.41, "HighMMT": 0.95}}


def model_table(settings=("small", "medium", "large"), tasks=None) -> list[dict]:
    """One row per (task, setting, model): parameters used by the task and one sample's FLOPs."""
    from .flops import count_flops
    from .model import SM4Model, get_setting

    rows = []
    for task in tasks or MULTIBENCH_SHAPES:
        modalities, outputs = MULTIBENCH_SHAPES[task]
        sample = {name: torch.rand(1, *shape) for name, (_, shape) in modalities.items()}
        for name in settings:
            for label, dense in (("SM4", False), ("dense", True)):
                config = get_setting(name).model
                config.dense = dense
                torch.manual_seed(0)
                model = SM4Model(config, modalities, {task: (tuple(modalities), outputs)}).eval()
                rows.append({
                    "task": task, "setting": name, "model": label,
                    "params": sum(p.numel() for p in model.parameters()),
                    "gflops": count_flops(model, task, sample) / 1e9,
                    "paper_gflops": PAPER_GFLOPS.get(task, {}).get(label if label == "SM4" else "HighMMT")
                    if name == "medium" else None,
                })
    return rows


def format_model_table(rows: list[dict]) -> str:
    lines = [f"{'task':<9}{'setting':<8}{'model':<7}{'params':>12}{'GFLOPs':>10}{'paper GFLOPs':>14}"]
    for row in rows:
        paper = "" if row["paper_gflops"] is None else f"{row['paper_gflops']:.2f}"
        lines.append(f"{row['task']:<9}{row['setting']:<8}{row['model']:<7}{row['params']:>12,}{row['gflops']:>10.3f}{paper:>14}")
    lines.append("paper GFLOPs: SM4 (medium) beside our SM4 rows; HighMMT (the papers' dense Perceiver baseline) "
                 "beside our dense rows. Ours count one sample with torch's flop counter (a multiply-add = 2 FLOPs) "
                 "on the MultiBench loaders' default patch tokenisation; the papers do not say how they counted or "
                 "tokenised, so compare the ratios between rows, not the absolute values.")
    return "\n".join(lines)


def run_flops(args) -> int:
    print(format_model_table(model_table(settings=args.settings, tasks=args.tasks)))
    return 0


def run_plots(args) -> int:
    from .training.plots import plot_runs

    histories, metrics = {}, {}
    for folder in args.runs:
        path = os.path.join(folder, "log.jsonl")
        try:
            with open(path) as handle:
                history = [json.loads(line) for line in handle if line.strip()]
        except FileNotFoundError as error:
            raise SystemExit(f"{path} not found: give run folders written by `python -m sm4 train`") from error
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}: line {error.lineno} is not JSON ({error.msg})") from error
        if not history:
            raise SystemExit(f"{path} has no epochs yet")
        histories[os.path.basename(os.path.normpath(folder))] = history
        for task, values in history[-1]["val"].items():
            metrics[task] = next(key for key in values if key != "loss")
    out = args.out or os.path.join(args.runs[0], "curves.png")
    plot_runs(histories, metrics, out)
    print(f"plot written to {out}")
    return 0


def add_parser(subparsers) -> None:
    report = subparsers.add_parser("report", help="model FLOP tables and training-run plots").add_subparsers(
        required=True, dest="report_command")
    flops = report.add_parser("flops", help="per-task parameters and inference FLOPs of SM4 and the dense model")
    flops.add_argument("--settings", nargs="+", default=["small", "medium", "large"])
    flops.add_argument("--tasks", nargs="+", choices=sorted(MULTIBENCH_SHAPES))
    flops.set_defaults(func=run_flops)
    plots = report.add_parser("run", help="plots of one or more training runs (their log.jsonl)")
    plots.add_argument("runs", nargs="+", help="run folders written by `python -m sm4 train`")
    plots.add_argument("--out", help="PNG path (default: <first run>/curves.png)")
    plots.set_defaults(func=run_plots)
