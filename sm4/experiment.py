"""Experiments end to end: build an SM4 model for a dataset, train it, evaluate it, compare it with
a dense model of equal FLOPs; and the command lines ``python -m sm4 train`` / ``python -m sm4 eval``.

    python -m sm4 train --setting medium --epochs 10 --out runs/sm4      # AEA and ALP on
    python -m sm4 train --setting medium --dense --out runs/dense        # the dense baseline
    python -m sm4 eval runs/sm4/best.pt                                  # test-set table
    torchrun --nproc-per-node 2 -m sm4 train --out runs/ddp              # data-parallel (gloo on CPU)
"""

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


def train(setting, data, out_dir: str, progress: bool = True, resume: bool = True, device: str = "cpu"):
    """Train, then evaluate the best epoch on the test split. Returns (model, trainer, test results)."""
    from .training.trainer import Trainer

    torch.manual_seed(setting.train.seed)
    model = build_model(setting, data)
    from .training import distributed

    os.makedirs(out_dir, exist_ok=True)
    if distributed.rank() == 0:  # one writer under torchrun
        setting.save(os.path.join(out_dir, "setting.json"))
    trainer = Trainer(model, data, setting.train, out_dir, progress=progress, device=device)
    trainer.fit(resume=resume)
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
    setting.model.dense = args.dense or setting.model.dense
    if args.without_smoa:
        setting.model.sparse_attention = False
    if args.without_smoe:
        setting.model.sparse_ffn = False
    if args.backend:
        setting.model.backend = args.backend
    if args.router_mode:
        setting.model.router_mode = args.router_mode
    return setting.validate()


def _load_data(path):
    from .data import load_bundled

    return load_bundled(path)


def run_train(args) -> int:
    from .training import distributed

    distributed.init_from_environment(args.device)  # under torchrun: one process per share of each batch
    setting = _setting_from_args(args)
    data = _load_data(args.data)
    model, trainer, test = train(setting, data, args.out, progress=not args.quiet, resume=not args.no_resume,
                                 device=args.device)
    if distributed.rank() == 0:
        print(format_results(data, {"test": test}, trainer=trainer))
    distributed.finish()
    return 0


def run_eval(args) -> int:
    from .training.trainer import Trainer

    run_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    setting_path = os.path.join(run_dir, "setting.json")
    if not os.path.exists(setting_path):
        raise SystemExit(f"{setting_path} not found: eval needs the setting.json that train wrote beside the checkpoint")
    from .model import Setting

    setting = Setting.load(setting_path)
    data = _load_data(args.data)
    trainer = Trainer(build_model(setting, data), data, setting.train, run_dir, progress=False)
    trainer.load_checkpoint(args.checkpoint)
    print(format_results(data, {args.split: trainer.evaluate(args.split)}, trainer=trainer))
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
    train_parser = subparsers.add_parser("train", help="train SM4 (or an ablation) on a multi-task dataset")
    train_parser.add_argument("--setting", default="medium", help="small, medium, large, or a .json/.yaml setting file")
    train_parser.add_argument("--data", default=None, help="bundled benchmark file (default: the one shipped with sm4)")
    train_parser.add_argument("--out", required=True, help="run folder: log.jsonl, last.pt, best.pt, setting.json")
    train_parser.add_argument("--epochs", type=int)
    train_parser.add_argument("--batch-size", type=int)
    train_parser.add_argument("--lr", type=float)
    train_parser.add_argument("--seed", type=int)
    train_parser.add_argument("--no-aea", action="store_true", help="fixed k = k_max (no adaptive expert allocation)")
    train_parser.add_argument("--no-alp", action="store_true", help="no adaptive learning pace")
    train_parser.add_argument("--alp-mode", choices=["gradient", "loss"], help="ALP as per-token gradient scale or task-loss scale")
    train_parser.add_argument("--dense", action="store_true", help="the dense model of equal FLOPs")
    train_parser.add_argument("--without-smoa", action="store_true", help="dense attention (ablation)")
    train_parser.add_argument("--without-smoe", action="store_true", help="dense FFN (ablation)")
    train_parser.add_argument("--router-mode", choices=["shared", "modality", "task"],
                              help="one router per expert group (SM4), or per modality / per task (ablations)")
    train_parser.add_argument("--backend", help="force an sm4 backend (reference, cpu, cuda, triton)")
    train_parser.add_argument("--device", default="cpu")
    train_parser.add_argument("--no-resume", action="store_true", help="start over even if the run folder has last.pt")
    train_parser.add_argument("--quiet", action="store_true", help="no progress bars")
    train_parser.set_defaults(func=run_train)

    eval_parser = subparsers.add_parser("eval", help="evaluate a checkpoint written by train")
    eval_parser.add_argument("checkpoint", help="best.pt or last.pt of a run folder")
    eval_parser.add_argument("--data", default=None)
    eval_parser.add_argument("--split", default="test", choices=["train", "val", "test"])
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
