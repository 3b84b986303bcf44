"""Experiments end to end: build an SM4 model for a dataset, train it, evaluate it, compare it with
a dense model of equal FLOPs; and the command lines ``python -m sm4 train`` / ``python -m sm4 eval``.

    python -m sm4 train --setting medium --epochs 10 --out runs/sm4      # AEA and ALP on
    python -m sm4 train --setting medium --dense --out runs/dense        # the dense baseline
    python -m sm4 eval runs/sm4/best.pt --json                           # test-set results
    python -m sm4 train --data multibench:/data/multibench --tasks avmnist mimic --out runs/mb
    torchrun --nproc-per-node 2 -m sm4 train --out runs/ddp              # data-parallel (gloo on CPU)
"""

import json
import os

import torch

from .model import SM4Model, get_setting


def build_model(setting, data) -> SM4Model:
    """The SM4 model of ``setting`` for a MultiTaskData's modalities and tasks."""
    modalities = {name: (spec.kind, tuple(spec.shape)) for name, spec in data.modalities.items()}
    tasks = {name: (tuple(spec.modalities), spec.num_outputs) for name, spec in data.tasks.items()}
    return SM4Model(setting.model, modalities, tasks)


def sample_inputs(data, task: str, batch: int = 1) -> dict:
    """A batch of the task's real inputs (validation split), for FLOP counting."""
    from .data import task_loader

    inputs, _ = next(iter(task_loader(data, task, "val", batch_size=batch)))
    return inputs


def inference_flops(model, data) -> dict[str, int]:
    """Per task: FLOPs of one sample's inference (torch's flop counter, sm4's ops included)."""
    from .flops import count_flops

    model.eval()
    return {task: count_flops(model, task, sample_inputs(data, task)) for task in data.tasks}


def parameter_counts(model, data) -> dict[str, int]:
    """Per task: the parameters its forward uses (shared encoder and layers + its own head)."""
    shared = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("heads."))
    return {task: shared + sum(p.numel() for p in model.heads[task].parameters()) for task in data.tasks}


def train(setting, data, out_dir: str, progress: bool = True, resume: bool = True, device: str = "cpu",
          console=None, on_start=None):
    """Train, then evaluate the best epoch on the test split. Returns (model, trainer, test results).

    The run folder is locked while this runs (a second writer gets RunFolderBusy); resume: continue
    from ``last.pt`` if it can be (ResumeMismatch, naming the differences, if not). ``setting.json``
    is written only once the run is known to start. on_start(epoch): called then too (0: fresh).
    console: one line per epoch (see Trainer).
    """
    from contextlib import nullcontext

    from .training import distributed
    from .training.run_folder import locked
    from .training.trainer import Trainer

    torch.manual_seed(setting.train.seed)
    model = build_model(setting, data)
    trainer = Trainer(model, data, setting.train, out_dir, progress=progress, device=device, console=console)

    def started(epoch):
        if distributed.rank() == 0:  # one writer under torchrun
            setting.save(os.path.join(out_dir, "setting.json"))
        if on_start is not None:
            on_start(epoch)

    with locked(out_dir) if distributed.rank() == 0 else nullcontext():
        trainer.fit(resume=resume, on_start=started)
        distributed.barrier()  # process 0 has written the last best.pt
        best = os.path.join(out_dir, "best.pt")
        if os.path.exists(best):
            trainer.load_checkpoint(best)
        return model, trainer, trainer.evaluate("test")


def relative_delta(data, ours: dict, baseline: dict) -> float:
    """The papers' Δ: mean over tasks of the relative improvement over the baseline (sign flipped
    for lower-is-better metrics), in percent."""
    deltas = []
    for task, spec in data.tasks.items():
        a, b = ours[task][spec.metric], baseline[task][spec.metric]
        change = (a - b) / abs(b) if b else 0.0
        deltas.append(change if spec.metric == "accuracy" else -change)
    return 100 * sum(deltas) / len(deltas)


# ---- command lines ----------------------------------------------------------------------------

DATA_HELP = ("bundled (default: the benchmark shipped with sm4), a bundled-format .npz file, or multibench:ROOT "
             "for MultiBench's published files under ROOT (with --tasks to choose them)")

MULTIBENCH_DOWNLOAD = (
    "download the tasks' files as MultiBench publishes them (https://github.com/pliang279/MultiBench, its README "
    "links each dataset) and put each task in its own folder under ROOT: avmnist/, enrico/, push/, vt/, urfunny/, "
    "mosei/, mimic/ (the files each folder holds: python -c \"import sm4.data.multibench as m; help(m)\"); "
    "--tasks chooses the ones you have")

DENSE_NOTE = "--dense: AEA and ALP are off (the dense model has no experts to allocate and no routers to pace)"


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _setting_from_args(args):
    setting = get_setting(args.setting)
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    for name, value in overrides.items():
        if value is not None:
            setattr(setting.train, name, value)
    if args.no_aea:
        setting.train.aea = False
    if args.no_alp:
        setting.train.alp = False
    if args.alp_mode:
        setting.train.alp_mode = args.alp_mode
    if args.dense:
        setting.model.dense = True
    if setting.model.dense:  # AEA/ALP act on experts and routers the dense model does not have
        setting.train.aea = setting.train.alp = False
    if args.without_smoa:
        setting.model.sparse_attention = False
    if args.without_smoe:
        setting.model.sparse_ffn = False
    if args.backend:
        setting.model.backend = args.backend
    if args.router_mode:
        setting.model.router_mode = args.router_mode
    return setting.validate()


def data_source(spec: str | None, tasks: list[str] | None) -> dict:
    """The --data/--tasks choice as stored in a run folder's data.json: {"data": ..., "tasks": ...}."""
    spec = spec or "bundled"
    if tasks and not spec.startswith("multibench:"):
        raise ValueError("--tasks chooses MultiBench tasks: use it with --data multibench:ROOT")
    if spec.startswith("multibench:"):
        spec = "multibench:" + os.path.abspath(os.path.expanduser(spec.split(":", 1)[1] or "."))
    elif spec != "bundled":
        spec = os.path.abspath(spec)
    return {"data": spec, "tasks": list(tasks) if tasks else None}


def load_data(source: dict, setting: str | None = None):
    """The MultiTaskData a data_source names (MultiBench tokenised as ``setting`` needs it)."""
    spec, tasks = source["data"], source.get("tasks")
    if spec.startswith("multibench:"):
        from .data import load_multibench

        root = spec.split(":", 1)[1]
        if not os.path.isdir(root):
            raise FileNotFoundError(f"MultiBench root {root!r} not found: {MULTIBENCH_DOWNLOAD}")
        try:
            return load_multibench(root, tasks=tasks, setting=setting)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error}; {MULTIBENCH_DOWNLOAD}") from error
    from .data import load_bundled

    return load_bundled(None if spec == "bundled" else spec)


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r}: not a device ({error})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        reason = ("this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible")
        raise ValueError(f"--device {device}: CUDA is not available ({reason}, torch {torch.__version__})")


def epoch_console(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)  # above any progress bar still drawn


def run_train(args) -> int:
    from ._io import write_text_atomically
    from .training import distributed, machine

    _check_device(args.device)
    distributed.init_from_environment(args.device)  # under torchrun: one process per share of each batch
    lead = distributed.rank() == 0
    setting = _setting_from_args(args)
    source = data_source(args.data, args.tasks)
    data = load_data(source, setting.name)
    if lead:
        if setting.model.dense:
            print(DENSE_NOTE)
        warning = machine.oversubscription_warning()
        if warning:
            print(warning)

    def started(epoch):
        if lead:
            write_text_atomically(os.path.join(args.out, "data.json"), json.dumps(source, indent=2) + "\n")
            if epoch >= setting.train.epochs:
                print(f"{args.out} has finished its {epoch} epochs: evaluating its best.pt (--epochs N extends it)")
            elif epoch:
                print(f"resuming {args.out} from epoch {epoch} of {setting.train.epochs}")

    model, trainer, test = train(setting, data, args.out, progress=not args.quiet, resume=not args.no_resume,
                                 device=args.device, console=epoch_console if lead else None, on_start=started)
    if lead:
        print(format_results(data, {"test": test}, trainer=trainer))
    distributed.finish()
    return 0


def interrupted_message(args) -> str:
    """What Ctrl-C prints: where the run stands and how to continue it."""
    from .training.run_folder import last_logged_epoch

    if getattr(args, "command", None) != "train":
        return "interrupted"
    epoch = last_logged_epoch(args.out)
    if not epoch:
        return f"interrupted before the first epoch ended: nothing saved in {args.out}"
    return (f"interrupted: {os.path.join(args.out, 'last.pt')} holds epoch {epoch}; "
            "rerun the same command to resume from there")


def run_eval(args) -> int:
    from .model import Setting
    from .training.trainer import Trainer

    run_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    setting_path = os.path.join(run_dir, "setting.json")
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"{args.checkpoint} not found")
    if not os.path.exists(setting_path):
        raise FileNotFoundError(f"{setting_path} not found: eval needs the setting.json that train wrote beside the checkpoint")
    setting = Setting.load(setting_path)
    if args.data is None and os.path.exists(os.path.join(run_dir, "data.json")):
        with open(os.path.join(run_dir, "data.json")) as handle:
            source = json.load(handle)  # the data the run was trained on
    else:
        source = data_source(args.data, args.tasks)
    data = load_data(source, setting.name)
    trainer = Trainer(build_model(setting, data), data, setting.train, run_dir, progress=False)
    trainer.load_checkpoint(args.checkpoint)
    results = trainer.evaluate(args.split)
    if args.json:
        print(json.dumps({"checkpoint": os.path.abspath(args.checkpoint), "split": args.split, "data": source,
                          "epoch": trainer.epoch, "best_epoch": trainer.best_epoch,
                          "metrics": {task: data.tasks[task].metric for task in results}, "results": results,
                          "k": trainer.aea.k, "alp_weights": trainer.alp.weights}, indent=2))
    else:
        print(format_results(data, {args.split: results}, trainer=trainer))
    return 0


def format_results(data, results_by_split: dict, trainer=None) -> str:
    lines = []
    for split, results in results_by_split.items():
        lines.append(f"{split}:")
        for task, values in results.items():
            metric = data.tasks[task].metric
            lines.append(f"  {task:<12} {metric} {values[metric]:.4f}   loss {values['loss']:.4f}")
    if trainer is not None:
        lines.append(f"best epoch {trainer.best_epoch}; k per modality {trainer.aea.k}; "
                     f"ALP weights {({m: round(w, 3) for m, w in trainer.alp.weights.items()})}")
    return "\n".join(lines)


def add_parsers(subparsers) -> None:
    train_parser = subparsers.add_parser(
        "train", help="train SM4 (or an ablation) on a multi-task dataset",
        description="Train into a run folder (--out). Rerunning the same command resumes from its last.pt; "
                    "a larger --epochs extends the run (the lr schedule is rebuilt for the new length); any other "
                    "change is refused: --no-resume starts over, or choose a new --out.")
    train_parser.add_argument("--setting", default="medium", help="small, medium, large, or a .json/.yaml setting file")
    train_parser.add_argument("--data", default=None, help=DATA_HELP)
    train_parser.add_argument("--tasks", nargs="+", help="with --data multibench:ROOT: the tasks to train on "
                              "(default: every task with files under ROOT)")
    train_parser.add_argument("--out", required=True, help="run folder: log.jsonl, last.pt, best.pt, setting.json, data.json")
    train_parser.add_argument("--epochs", type=_positive_int, help="epochs to train in all (default: the setting's, "
                              "100 for the published ones); larger than a finished run's: extends it")
    train_parser.add_argument("--batch-size", type=_positive_int)
    train_parser.add_argument("--lr", type=float)
    train_parser.add_argument("--seed", type=int)
    train_parser.add_argument("--no-aea", action="store_true", help="fixed k = k_max (no adaptive expert allocation)")
    train_parser.add_argument("--no-alp", action="store_true", help="no adaptive learning pace")
    train_parser.add_argument("--alp-mode", choices=["gradient", "loss"], help="ALP as per-token gradient scale or task-loss scale")
    train_parser.add_argument("--dense", action="store_true", help="the dense model of equal FLOPs (AEA and ALP off)")
    train_parser.add_argument("--without-smoa", action="store_true", help="dense attention (ablation)")
    train_parser.add_argument("--without-smoe", action="store_true", help="dense FFN (ablation)")
    train_parser.add_argument("--router-mode", choices=["shared", "modality", "task"],
                              help="one router per expert group (SM4), or per modality / per task (ablations)")
    train_parser.add_argument("--backend", help="force an sm4 backend (reference, cpu, cuda, triton)")
    train_parser.add_argument("--device", default="cpu")
    train_parser.add_argument("--no-resume", action="store_true",
                              help="start over: the run folder's log and checkpoints are replaced")
    train_parser.add_argument("--quiet", action="store_true", help="no progress bars (the line per epoch stays)")
    train_parser.set_defaults(func=run_train)

    eval_parser = subparsers.add_parser("eval", help="evaluate a checkpoint written by train")
    eval_parser.add_argument("checkpoint", help="best.pt or last.pt of a run folder")
    eval_parser.add_argument("--data", default=None, help=DATA_HELP + "; default: the data the run was trained on")
    eval_parser.add_argument("--tasks", nargs="+", help="with --data multibench:ROOT: the tasks")
    eval_parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    eval_parser.add_argument("--json", action="store_true", help="the results as JSON")
    eval_parser.set_defaults(func=run_eval)


@torch.no_grad()
def expert_usage(model, data, split: str = "val", batch_size: int = 256) -> dict[str, dict[str, torch.Tensor]]:
    """Which experts each modality's and each task's tokens use: {router: {"modality": (M, E),
    "task": (tasks, E)}} assignment counts over a split, for every router of every sparse layer
    (named "layer<i>.<q|k|v|ffn>"). The papers' appendix heat maps."""
    from .data import task_loader
    from .modules import SparseMoEAttention, SparseMoEFFN

    model.eval()
    routers = {}
    for index, layer in enumerate(model.layers):
        for part in (layer.self_attn, getattr(layer, "ffn", None)):
            if isinstance(part, (SparseMoEAttention, SparseMoEFFN)):
                routers[f"layer{index}.{'attn' if isinstance(part, SparseMoEAttention) else 'ffn'}"] = part
    experts = model.config.num_experts
    usage = {}
    tasks = list(data.tasks)
    for task_index, task in enumerate(tasks):
        for inputs, _ in task_loader(data, task, split, batch_size=batch_size):
            model(task, inputs)
            token_modality = model.last_token_modality
            for prefix, module in routers.items():
                for name, stats in module.routing_stats.items():
                    key = f"{prefix}.{name}" if prefix.endswith("attn") else prefix
                    counts = usage.setdefault(key, {"modality": torch.zeros(len(model.modality_names), experts),
                                                    "task": torch.zeros(len(tasks), experts)})
                    ids = stats["expert_ids"]
                    active = ids >= 0
                    rows = token_modality[:, None].expand_as(ids)[active]
                    counts["modality"].index_put_((rows, ids[active]), torch.ones(rows.shape[0]), accumulate=True)
                    counts["task"][task_index].index_add_(0, ids[active], torch.ones(rows.shape[0]))
    return usage
