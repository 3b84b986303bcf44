"""``python -m sm4 report``: tables and plots that need no training.

    python -m sm4 report flops                        # the papers' convention beside sm4's
    python -m sm4 report flops --convention sm4       # only sm4's own (FLOPs per sample)
    python -m sm4 report run runs/sm4                 # plots of a training run from its log.jsonl

``flops`` builds, per published setting, SM4 (and its dense baselines) with the papers'
tokenisation (M³SAT Tables 13-15) and a HighMMT-shaped model with HighMMT's (pixel / step tokens,
``sm4.model.highmmt``), and counts each task's inference two ways:

- **paper** (the default): the papers' "GFLOPs" are multiply-accumulates (MACs) of the linear and
  norm layers (thop / fvcore style; attention's score and value products not counted), summed
  over one evaluation batch of the task (``sm4.flops.count_macs`` of one sample times the batch:
  MACs are linear in the batch). Parameters: the shared ones plus the task's head.
- **sm4**: FLOPs (a multiply-add = 2) of one sample with torch's flop counter, attention included.

Every row carries the paper's figure (Table 8) and the relative difference. What reproducing the
figures showed about how they were counted (``SM4_TOKEN_WIDTH``, ``COUNT_BATCH``,
``HIGHMMT_COUNT_BATCH``, ``HIGHMMT_SHAPES``):

- SM4's token width is the setting's (one width for all its modalities: medium PUSH 418, not its
  own 46) in the small and medium settings; the large setting's FLOP figures come back only with
  each task's own width (AV-MNIST 284, MIMIC 21, MOSEI 310): they were counted on per-task models
  (its parameters, 0.76 M for every task, on the setting's model, as here).
- The small setting's SM4 (like HighMMT's small model) declares HighMMT's 13 modalities, MIMIC's
  and AV-MNIST's too (one-hot width 13: token width 58).
- Small PUSH (SM4 and HighMMT) was counted at HighMMT's PUSH loader batch, 18, not Table 13's 28.
- HighMMT's small model's two cross-modal blocks are not weight-tied; the large one has 20 latents, 6 heads, one block.
- HighMMT's medium figures were counted with AV-MNIST as HighMMT's large scripts load it
  (MultiBench's loader with ``to4by4``: 4x4 / 16x16 patches, its default batch 40), ENRICO and
  PUSH as its medium script does (pixels / steps): the AV-MNIST audio patches set the medium
  model's token width to 290 (256 + 26 + 8), which brings ENRICO from 10.6 to 79.1 (79.48) and
  AV-MNIST to 0.94 (0.95); with the medium script's own AV-MNIST pixels (width 37) they are 7.5x
  and 2.8x off.

Not reproducible (``NOT_REPRODUCIBLE`` gives each row's reason, the table prints it): HighMMT
medium PUSH FLOPs (+6.6 % with the width that reproduces ENRICO and AV-MNIST); SM4 large
UR-FUNNY FLOPs (0.38: 20 + 20 + 50 tokens of the task's width give 0.49); the small setting's
SM4 parameters (0.27 / 0.25 M: the model without its expert layer holds 0.257 / 0.249 M, with it
0.73 M); HighMMT small PUSH (-2.5 %) and medium PUSH / AV-MNIST parameters (the per-task counts
differ by more than the heads do).
"""

import json
import os

import torch

# The MultiBench task shapes as sm4.data.multibench's loaders produce them by default.
# task: ({modality: (kind, per-sample shape)}, outputs)
MULTIBENCH_SHAPES = {
    "avmnist": ({"avmnist.image": ("image", (7, 7, 16)), "avmnist.audio": ("image", (7, 7, 256))}, 10),
    "enrico": ({"enrico.screenshot": ("image", (16, 16, 384)), "enrico.wireframe": ("image", (16, 16, 384))}, 20),
    "push": ({"push.gripper_pos": ("sequence", (16, 3)), "push.gripper_sensors": ("sequence", (16, 7)),
              "push.control": ("sequence", (16, 7)), "push.image": ("image", (32, 32, 16))}, 32),
    "vt": ({"vt.image": ("image", (128, 128, 3)), "vt.force": ("sequence", (6, 32)), "vt.proprio": ("sequence", (1, 8)),
            "vt.depth": ("image", (128, 128, 1)), "vt.action": ("sequence", (1, 4))}, 2),
    "urfunny": ({"urfunny.vision": ("sequence", (20, 371)), "urfunny.audio": ("sequence", (20, 81)),
                 "affect.text": ("sequence", (50, 300))}, 2),
    "mosei": ({"mosei.vision": ("sequence", (50, 35)), "mosei.audio": ("sequence", (50, 74)),
               "affect.text": ("sequence", (50, 300))}, 2),
    "mimic": ({"mimic.static": ("tabular", (5, 1)), "mimic.timeseries": ("sequence", (24, 12))}, 2),
}
# SM4's tokenisation per setting (Tables 13-15) where it differs from the default shapes above:
# the small setting feeds PUSH's 16 frames as 16 x 32 x 32 pixel tokens with 3 position axes.
PAPER_SHAPES = {
    "small": {"push": ({**MULTIBENCH_SHAPES["push"][0], "push.image": ("video", (16, 32, 32, 1))}, 32)},
}

# HighMMT's tokenisation (its released scripts): pixels and steps, every declared modality (the
# one-hot counts them all). setting: ({modality: (kind, shape)}, {task: (modalities, outputs)}).
_HIGHMMT_AVMNIST = {"avmnist.image": ("image", (7, 7, 16)), "avmnist.audio": ("image", (7, 7, 256))}
_HIGHMMT_MIMIC = {"mimic.static": ("tabular", (5, 1)), "mimic.timeseries": ("image", (24, 12, 1))}
HIGHMMT_SHAPES = {
    "small": ({**{f"unused.{n}": spec for n, spec in {"static": ("tabular", (5, 1)), "timeseries": ("image", (24, 12, 1)),
                                                      "image": ("image", (28, 28, 1)), "audio": ("image", (112, 112, 1))}.items()},
               "push.gripper_pos": ("sequence", (16, 3)), "push.gripper_sensors": ("sequence", (16, 7)),
               "push.control": ("sequence", (16, 7)), "push.image": ("video", (16, 32, 32, 1)),
               "vt.image": ("image", (128, 128, 3)), "vt.force": ("sequence", (6, 32)), "vt.proprio": ("sequence", (1, 8)),
               "vt.depth": ("image", (128, 128, 1)), "vt.action": ("sequence", (1, 4))},
              {"push": (("push.gripper_pos", "push.gripper_sensors", "push.image", "push.control"), 32),
               "vt": (("vt.image", "vt.force", "vt.proprio", "vt.depth", "vt.action"), 1)}),
    # Medium: ENRICO and PUSH as HighMMT's medium script loads them (pixels / steps of one channel),
    # AV-MNIST as its large scripts and MultiBench's loader with to4by4 do (4x4 / 16x16 patches):
    # the papers' medium HighMMT figures come back only so (that sets the width, 290; module docstring).
    "medium": ({"enrico.screenshot": ("image", (256, 128, 3)), "enrico.wireframe": ("image", (256, 128, 3)),
                **_HIGHMMT_AVMNIST,
                "push.gripper_pos": ("sequence", (48, 1)), "push.gripper_sensors": ("sequence", (112, 1)),
                "push.image": ("image", (16 * 32, 32, 1)), "push.control": ("sequence", (112, 1))},
               {"enrico": (("enrico.screenshot", "enrico.wireframe"), 20),
                "avmnist": (("avmnist.image", "avmnist.audio"), 10),
                "push": (("push.gripper_pos", "push.gripper_sensors", "push.image", "push.control"), 32)}),
    "large": ({**_HIGHMMT_MIMIC, **_HIGHMMT_AVMNIST, "mosei.vision": ("sequence", (50, 35)),
               "mosei.audio": ("sequence", (50, 74)), "affect.text": ("sequence", (50, 300)),
               "urfunny.vision": ("sequence", (20, 371)), "urfunny.audio": ("sequence", (20, 81))},
              {"mimic": (tuple(_HIGHMMT_MIMIC), 2), "avmnist": (tuple(_HIGHMMT_AVMNIST), 10),
               "mosei": (("mosei.vision", "mosei.audio", "affect.text"), 2),
               "urfunny": (("urfunny.vision", "urfunny.audio", "affect.text"), 2)}),
}
HIGHMMT_BANDS = {"large": {name: 3 for name in ("mosei.vision", "mosei.audio", "affect.text", "urfunny.vision",
                                                "urfunny.audio")}}

# M³SAT Table 8 (and Table 2): (params M, GFLOPs) per setting, task and model.
PAPER_FIGURES = {
    "small": {"push": {"SM4": (0.27, 2.59), "HighMMT": (0.89, 5.14)},
              "vt": {"SM4": (0.25, 17.38), "HighMMT": (0.85, 32.48)}},
    "medium": {"enrico": {"SM4": (1.23, 1.10), "HighMMT": (0.58, 79.48)},
               "push": {"SM4": (1.25, 2.33), "HighMMT": (0.63, 21.60)},
               "avmnist": {"SM4": (1.23, 0.41), "HighMMT": (0.52, 0.95)}},
    "large": {"urfunny": {"SM4": (0.76, 0.38), "HighMMT": (0.52, 1.51)},
              "mosei": {"SM4": (0.76, 0.53), "HighMMT": (0.52, 1.65)},
              "mimic": {"SM4": (0.76, 0.15), "HighMMT": (0.52, 0.67)},
              "avmnist": {"SM4": (0.76, 0.43), "HighMMT": (0.52, 0.95)}},
}
# How the papers' figures were counted, found by reproducing them (see the module docstring).
SM4_TOKEN_WIDTH = {"small": "setting", "medium": "setting", "large": "task"}
COUNT_BATCH = {("small", "push"): 18}
# HighMMT's medium AV-MNIST: MultiBench's AV-MNIST loader's default batch (40; the large scripts
# call it without one), the loader that gives its patches.
HIGHMMT_COUNT_BATCH = {("medium", "avmnist"): 40}
# The small setting's SM4 figures come back with HighMMT's 13 declared modalities (one-hot 13,
# token width 58): M³SAT's small model kept HighMMT's modality list (with 9, its own: V&T -4.7 %).
SM4_EXTRA_MODALITIES = {"small": {name: spec for name, spec in HIGHMMT_SHAPES["small"][0].items()
                                  if name.startswith("unused.")}}  # else the setting's per-task batch size
_NO_EXPERTS = ("the model without its SM4 layer (16 experts of attention and FFN and their routers, "
               "0.473 M) holds 0.257 M for PUSH and 0.249 M for V&T (-4.9 % / -0.3 %): a count that left the "
               "expert layer out, not this model's 0.73 M")
NOT_REPRODUCIBLE = {
    ("medium", "push", "HighMMT", "gflops"): ("23.03 (+6.6 %) with the width (290) and shapes that reproduce medium ENRICO "
                                              "and AV-MNIST; no released batch or shape gives 21.60 (batch 30 would)"),
    ("large", "urfunny", "SM4", "gflops"): ("20 + 20 + 50 tokens of the task's width give 0.49 (text at 20 steps: 0.44); "
                                            "no published width or batch gives 0.38"),
    ("small", "push", "SM4", "params"): _NO_EXPERTS,
    ("small", "vt", "SM4", "params"): _NO_EXPERTS,
    ("small", "push", "HighMMT", "params"): "0.868 M (-2.5 %): PUSH's and V&T's counts differ by 0.04 M, the heads by 0.02 M",
    ("medium", "push", "HighMMT", "params"): ("0.601 M (-4.6 %): the per-task counts (0.58 / 0.63 / 0.52 M) differ by more "
                                              "than the heads (the only per-task parameters) do"),
    ("medium", "avmnist", "HighMMT", "params"): ("0.576 M (+10.8 %): the per-task counts (0.58 / 0.63 / 0.52 M) differ by "
                                                 "more than the heads (the only per-task parameters) do"),
}
# Kept for callers of the earlier table: the medium figures.
PAPER_GFLOPS = {task: {model: g for model, (_, g) in models.items()} for task, models in PAPER_FIGURES["medium"].items()}

SM4_MODELS = {"SM4": None, "dense": "equal_ffn", "Dense 1": "double_depth", "Dense 2": "wide"}


def setting_tasks(setting: str) -> tuple[str, ...]:
    from .model.config import SETTING_TASKS

    return SETTING_TASKS.get(setting, tuple(MULTIBENCH_SHAPES))


def task_shapes(setting: str, task: str):
    return PAPER_SHAPES.get(setting, {}).get(task, MULTIBENCH_SHAPES[task])


def count_batch(setting_name: str, task: str, model: str = "SM4") -> int:
    """The evaluation batch the papers' figure of (setting, task, model) was counted over."""
    from .model import get_setting

    if model == "HighMMT" and (setting_name, task) in HIGHMMT_COUNT_BATCH:
        return HIGHMMT_COUNT_BATCH[setting_name, task]
    train = get_setting(setting_name).train
    return COUNT_BATCH.get((setting_name, task), train.task_batch_size.get(task, train.batch_size))


def _sample(modalities: dict, names) -> dict:
    g = torch.Generator().manual_seed(0)
    return {name: torch.rand(1, *modalities[name][1], generator=g) for name in names}


def _task_params(model, task: str) -> int:
    shared = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("heads."))
    return shared + sum(p.numel() for p in model.heads[task].parameters())


def _counts(model, task, sample, batch, sm4_convention: bool) -> dict:
    from .flops import count_flops, count_macs

    model.eval()
    return {"params": _task_params(model, task), "gmacs": count_macs(model, task, sample) * batch / 1e9,
            "gflops_sample": count_flops(model, task, sample) / 1e9 if sm4_convention else None, "batch": batch}


def sm4_model(setting_name: str, task: str, kind: str | None = None, width: str | None = None):
    """SM4 (kind None) or a dense baseline ("equal_ffn", "double_depth", "wide") built with the
    setting's modalities and tasks (width "setting": one token width, the model as trained) or the
    task's alone (width "task"); default: as the papers counted FLOPs (``SM4_TOKEN_WIDTH``).
    Returns (model, modalities)."""
    from .model import SM4Model, get_setting

    config = get_setting(setting_name).model
    if kind is not None:
        config.dense, config.dense_kind = True, kind
    width = width or SM4_TOKEN_WIDTH.get(setting_name, "setting")
    tasks = setting_tasks(setting_name) if width == "setting" else (task,)
    modalities, specs = dict(SM4_EXTRA_MODALITIES.get(setting_name, {})) if width == "setting" else {}, {}
    for name in tasks:
        mods, outputs = task_shapes(setting_name, name)
        modalities.update(mods)
        specs[name] = (tuple(mods), outputs)
    torch.manual_seed(0)
    return SM4Model(config, modalities, specs), modalities


def highmmt_model(setting_name: str):
    """The HighMMT-shaped model of a setting (sm4.model.highmmt) and its modalities."""
    import copy

    from .model.highmmt import HIGHMMT_SETTINGS, HighMMTModel

    config = copy.deepcopy(HIGHMMT_SETTINGS[setting_name])
    config.freq_bands = HIGHMMT_BANDS.get(setting_name, {})
    modalities, tasks = HIGHMMT_SHAPES[setting_name]
    torch.manual_seed(0)
    return HighMMTModel(config, modalities, tasks), modalities


MODELS = ("SM4", "dense", "Dense 1", "Dense 2", "HighMMT")


def model_table(settings=("small", "medium", "large"), tasks=None, models=MODELS, sm4_convention: bool = True) -> list[dict]:
    """One row per (setting, task, model): params used by the task, GMACs of one evaluation
    batch (the papers' convention), GFLOPs of one sample (sm4's; None unless sm4_convention),
    the paper's figures and the relative differences (None where the paper has no figure)."""
    rows = []
    for setting_name in settings:
        for task in setting_tasks(setting_name):
            if tasks and task not in tasks:
                continue
            for label in models:
                batch = count_batch(setting_name, task, label)
                if label == "HighMMT":
                    if setting_name not in HIGHMMT_SHAPES:
                        continue
                    model, modalities = highmmt_model(setting_name)
                else:
                    model, modalities = sm4_model(setting_name, task, SM4_MODELS[label])
                row = {"setting": setting_name, "task": task, "model": label,
                       **_counts(model, task, _sample(modalities, model.tasks[task]), batch, sm4_convention)}
                if label != "HighMMT":  # parameters: the model as trained (the papers' too: 0.76 M for every large task)
                    row["params"] = _task_params(sm4_model(setting_name, task, SM4_MODELS[label], "setting")[0], task)
                paper = PAPER_FIGURES.get(setting_name, {}).get(task, {}).get(label)
                row["paper_params"], row["paper_gflops"] = paper if paper else (None, None)
                for what, ours, theirs in (("params", row["params"] / 1e6, row["paper_params"]),
                                           ("gflops", row["gmacs"], row["paper_gflops"])):
                    row[f"{what}_diff"] = None if theirs is None else ours / theirs - 1
                    row[f"{what}_note"] = NOT_REPRODUCIBLE.get((setting_name, task, label, what))
                rows.append(row)
    return rows


def _or_blank(value, width: int) -> str:
    return f"{'':>{width}}" if value is None else f"{value:>{width}.4f}"


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:+.1f}%"


def format_model_table(rows: list[dict], convention: str = "paper") -> str:
    if convention == "sm4":
        lines = ["sm4's convention: FLOPs of ONE sample (a multiply-add = 2), torch's flop counter, attention included",
                 f"{'setting':<8}{'task':<9}{'model':<9}{'params':>11}{'GFLOP/sample':>14}"]
        lines += [f"{r['setting']:<8}{r['task']:<9}{r['model']:<9}{r['params']:>11,}{r['gflops_sample']:>14.4f}" for r in rows]
        return "\n".join(lines)
    lines = ["the papers' convention: GMACs (linear + norm layers, attention products not counted) summed over one "
             "evaluation batch; beside it sm4's own (GFLOPs of one sample, attention included)",
             f"{'setting':<8}{'task':<9}{'model':<9}{'batch':>6}{'params M':>10}{'paper':>7}{'diff':>8}"
             f"{'GMAC/batch':>12}{'paper':>8}{'diff':>8}{'GFLOP/sample':>14}"]
    notes = []
    for r in rows:
        paper_p = "" if r["paper_params"] is None else f"{r['paper_params']:.2f}"
        paper_g = "" if r["paper_gflops"] is None else f"{r['paper_gflops']:.2f}"
        marks = ""
        for what in ("params", "gflops"):
            if r[f"{what}_note"]:
                notes.append(f"  * {r['setting']} {r['task']} {r['model']} {what}: not reproducible: {r[what + '_note']}")
                marks += "*"
        lines.append(f"{r['setting']:<8}{r['task']:<9}{r['model']:<9}{r['batch']:>6}{r['params'] / 1e6:>10.3f}{paper_p:>7}"
                     f"{_percent(r['params_diff']):>8}{r['gmacs']:>12.3f}{paper_g:>8}{_percent(r['gflops_diff']):>8}"
                     f"{_or_blank(r['gflops_sample'], 14)} {marks}")
    lines.append("models: SM4; its dense ablations: dense (FFN hidden top_k x H), Dense 1 (the papers' Dense Model 1: "
                 "double depth), Dense 2 (Dense Model 2: 4x wider FFN); HighMMT (the papers' baseline, pixel tokens).")
    return "\n".join(lines + notes)


def run_flops(args) -> int:
    rows = model_table(settings=args.settings, tasks=args.tasks, models=args.models)
    print(format_model_table(rows, convention=args.convention))
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
            raise FileNotFoundError(f"{path} not found: give run folders written by `python -m sm4 train`") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno} is not JSON ({error.msg})") from error
        if not history:
            raise ValueError(f"{path} has no epochs yet")
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
    flops = report.add_parser("flops", help="per-task parameters and inference FLOPs of SM4, its dense baselines and HighMMT")
    flops.add_argument("--settings", nargs="+", default=["small", "medium", "large"], choices=["small", "medium", "large"])
    flops.add_argument("--tasks", nargs="+", choices=sorted(MULTIBENCH_SHAPES))
    flops.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    flops.add_argument("--convention", choices=["paper", "sm4"], default="paper",
                       help="paper: GMACs per evaluation batch beside sm4's FLOPs per sample (default); sm4: only the latter")
    flops.set_defaults(func=run_flops)
    plots = report.add_parser("run", help="plots of one or more training runs (their log.jsonl)")
    plots.add_argument("runs", nargs="+", help="run folders written by `python -m sm4 train`")
    plots.add_argument("--out", help="PNG path (default: <first run>/curves.png)")
    plots.set_defaults(func=run_plots)
