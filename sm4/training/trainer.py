"""The multi-task training loop of SM4 (SM4_SPEC §3).

Each optimiser step takes one batch of every task (``TrainConfig.epoch_schedule``, see
``sm4.training.schedule``: smaller tasks cycle, or each sample once per epoch); the loss is the sum of
the weighted task losses and every sparse module's balancing loss; one Adam step. After each
epoch: validation (each task's loss and metric), AEA (per-modality k from each modality's
validation loss with only that modality kept), ALP (per-modality gradient weights from the
epoch's mean routing entropy), a JSON-lines log entry, and checkpoints written atomically
(``last.pt`` every epoch, ``best.pt`` at the best epoch by Σ eval_weight · metric, with the sign
flipped for lower-is-better metrics). ``fit(resume=True)`` continues from ``last.pt`` exactly:
model, optimiser, AEA/ALP state, and the RNG states (shuffling, torch's and Python's generators;
the router noise and dropout of each training forward are drawn from a stream keyed on the seed,
epoch, step and task, ``sm4.modules.batch_share``, so that data-parallel processes draw what one
process draws for their rows, see ``sm4.training.distributed``); the learning-rate schedule is rebuilt for the configured number of epochs and brought to the
checkpoint's epoch, so extending a run (more epochs) continues its schedule over the new length.
A checkpoint trained with another configuration is refused (``run_folder.check_resumable``); a
fresh start empties the folder's log and removes its old checkpoints.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._io import write_atomically, write_text_atomically
from ..modules import SparseMoEModule, batch_share
from . import distributed, schedule
from .expert_allocation import AdaptiveExpertAllocation, modality_validation_loss
from .learning_pace import AdaptiveLearningPace
from .run_folder import ResumeMismatch, check_resumable

HIGHER_IS_BETTER = {"accuracy": True, "mse": False}


def save_atomically(obj, path: str) -> None:
    """torch.save through a temporary file and a rename: a crash never leaves half a checkpoint."""
    write_atomically(path, lambda temporary: torch.save(obj, temporary))


def task_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "classification":
        return F.cross_entropy(output.float(), target)
    return F.mse_loss(output.float(), target.float().view_as(output))


def task_metric(metric: str, output: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """(sum of the metric over the batch, batch size): accuracy counts, or squared errors."""
    if metric == "accuracy":
        return float((output.argmax(-1) == target).sum()), target.shape[0]
    return float(F.mse_loss(output.float(), target.float().view_as(output), reduction="sum") / output.shape[1]), target.shape[0]


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    aux_loss: float
    val: dict
    score: float
    k: dict
    alp_weights: dict
    entropy: dict
    best_epoch: int
    extra: dict = field(default_factory=dict)


class Trainer:
    """Trains an SM4Model on a MultiTaskData (sm4.data) with a Setting's TrainConfig.

    out_dir receives ``log.jsonl``, ``last.pt`` and ``best.pt``. progress: tqdm bars (training
    steps, validation, AEA's passes). console: called with one line per epoch (train loss,
    validation metrics, k and ALP weight per modality), e.g. ``print``; None: silent.
    """

    def __init__(self, model, data, train_config, out_dir: str, progress: bool = True, device: str | torch.device = "cpu",
                 console=None):
        train_config.validate()
        self.model, self.data, self.config = model.to(device), data, train_config
        self.out_dir, self.progress, self.device = out_dir, progress, torch.device(device)
        self.console = console if distributed.rank() == 0 else None
        self.tasks = list(data.tasks)
        self.task_modalities = {task: list(spec.modalities) for task, spec in data.tasks.items()}
        # found once: walking model.modules() after every forward costs more than the small models' layers
        self.sparse_modules = [m for m in model.modules() if isinstance(m, SparseMoEModule)]
        self.optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
        self.scheduler = self._make_scheduler()
        self._gradient_sum = distributed.GradientSum(model.parameters())
        modalities = list(model.modality_names)
        # literal_clamp=False: "revert" undoes only a growth that happened (a plateau at k_max does
        # not grow, so a second one freezes the modality at k_max instead of dropping it below).
        self.aea = AdaptiveExpertAllocation(modalities, model.config.top_k, enabled=train_config.aea, literal_clamp=False)
        self.alp = AdaptiveLearningPace(modalities, enabled=train_config.alp, mode=train_config.alp_mode)
        self.shuffle = torch.Generator().manual_seed(train_config.seed)
        self.epoch = 0
        self.best_score, self.best_epoch = -math.inf, 0
        self.history: list[dict] = []
        self._apply_adaptive_state()

    def _make_scheduler(self):
        """The epoch-wise learning-rate schedule for ``config.epochs`` epochs (None: constant lr)."""
        if not self.config.cosine:
            return None
        return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.config.epochs)

    def _rebuild_scheduler(self, epoch: int) -> None:
        """The schedule for ``config.epochs`` brought to ``epoch``: from the base lr, ``epoch`` steps
        (the same float operations the run took, so a plain resume is bit-identical)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = self.config.lr
        self.scheduler = self._make_scheduler()
        if self.scheduler is None:
            return
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(epoch):
                self.scheduler.step()

    def configuration(self) -> dict:
        """What a checkpoint must have been trained with to be resumed: {"model": ..., "train": ...}."""
        return {"model": dataclasses.asdict(self.model.config), "train": dataclasses.asdict(self.config)}

    # ---- one epoch ----------------------------------------------------------------------------

    def _loaders(self, split: str, shuffle: bool, tasks=None):
        from ..data import task_loader

        loaders = {}
        for task in tasks or self.tasks:
            # Training drops a last partial batch (a batch of one breaks the heads' BatchNorm),
            # unless the split is smaller than one batch.
            batch_size = schedule.task_batch_size(self.config, task)
            drop_last = shuffle and len(self.data.splits[task][split]) >= batch_size
            # own_sampler: a split's own sampler (MultiBench ENRICO's class-balanced one), seeded by self.shuffle
            loaders[task] = task_loader(self.data, task, split, batch_size, shuffle=shuffle,
                                        generator=self.shuffle if shuffle else None, drop_last=drop_last, own_sampler=True)
        return loaders

    def _to_device(self, batch):
        inputs, target = batch
        return {name: x.to(self.device) for name, x in inputs.items()}, target.to(self.device)

    def _record_entropy(self):
        ids = self.model.last_token_modality
        for module in self.sparse_modules:
            for stats in module.routing_stats.values():
                if stats["entropy"].shape == ids.shape:
                    self.alp.add(stats["entropy"], ids)

    def train_epoch(self) -> tuple[float, float]:
        self.model.train()
        loaders = self._loaders("train", shuffle=True)
        steps = schedule.steps_per_epoch(loaders)
        stream = schedule.epoch_batches(loaders, self.config.epoch_schedule)
        # two accumulators, read once at the end (one tensor bound to both names summed the aux loss into the task loss)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_total = torch.zeros((), dtype=torch.float64, device=self.device)
        world, index = distributed.world_size(), distributed.rank()
        if world > 1:
            # The router noise and every dropout of sm4's models come from the shares' streams below;
            # anything else drawing from torch's generator (a user's own module) draws its own per
            # process, from the seed, the epoch and the rank (a resume continues it).
            # The shuffle generator stays common: every process draws the same batches.
            torch.manual_seed((self.config.seed * 1_000_003 + self.epoch) * 1009 + index)
        reduce = distributed.all_sum if world > 1 else None
        bar = _progress(range(steps), f"epoch {self.epoch + 1}/{self.config.epochs}", self.progress and index == 0)
        for step, (_, step_batches) in enumerate(zip(bar, stream)):
            self.optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            aux = 0.0
            for task, batch in step_batches:
                rows = batch[1].shape[0]
                batch, fraction = distributed.share(batch)  # this process's rows (all of them alone)
                inputs, target = self._to_device(batch)
                spec = self.data.tasks[task]
                # Per-sample draws of the whole batch and whole-batch statistics (batch_share): the
                # same forward for these rows whatever the number of processes.
                with batch_share.sharing(self._draw_key(step, task), rows, index, world, reduce):
                    output = self.model(task, inputs)
                weight = schedule.task_train_weight(self.config, task, spec.train_weight) * fraction
                if self.config.alp and self.config.alp_mode == "loss":
                    weight *= self.alp.task_loss_scale(self.task_modalities[task])
                loss = loss + weight * task_loss(spec.kind, output, target)
                # alike on every process (whole-batch CV^2): each takes 1/W of it (distributed.py)
                aux = aux + self._aux_loss() / world
                self._record_entropy()
            total_loss = loss + aux
            total_loss.backward()
            self._gradient_sum()  # over the processes (nothing alone)
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            total += loss.detach()
            aux_total += aux.detach() if torch.is_tensor(aux) else aux
        if self.scheduler is not None:
            self.scheduler.step()
        distributed.sum_(total)
        distributed.sum_(aux_total)
        self._gradient_sum.check()
        return float(total) / steps, float(aux_total) / steps

    def _draw_key(self, step: int, task: str) -> int:
        """The seed of one step's draws for one task: from the run's seed, the epoch, the step and
        the task (a resume draws what the uninterrupted run drew, with no generator state)."""
        text = f"{self.config.seed}/{self.epoch}/{step}/{task}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1

    def _aux_loss(self):
        losses = [m.aux_loss for m in self.sparse_modules if m.aux_loss is not None]
        if not losses:  # a dense model: a zero (collect_aux_loss would walk the module tree every step)
            return torch.zeros((), device=self.device)
        return torch.stack([loss.float() for loss in losses]).sum()

    @torch.no_grad()
    def evaluate(self, split: str = "val", keep: dict[str, list[str]] | None = None, tasks=None, label: str | None = None) -> dict:
        """{task: {"loss", metric name}} on a split (of ``tasks``, default all); keep: {task:
        modalities} to drop the others' tokens. label: the progress bar's name (default: the split)."""
        self.model.eval()
        results = {}
        show = self.progress and distributed.rank() == 0
        for task, loader in self._loaders(split, shuffle=False, tasks=tasks).items():
            spec = self.data.tasks[task]
            loss_sum = metric_sum = count = 0.0
            for batch in _progress(loader, f"{label or split} {task}", show):
                inputs, target = self._to_device(batch)
                output = self.model(task, inputs, keep=None if keep is None else keep.get(task))
                loss_sum += float(task_loss(spec.kind, output, target)) * target.shape[0]
                value, n = task_metric(spec.metric, output, target)
                metric_sum += value
                count += n
            results[task] = {"loss": loss_sum / max(count, 1), spec.metric: metric_sum / max(count, 1)}
        return results

    def score(self, results: dict) -> float:
        total = 0.0
        for task, values in results.items():
            spec = self.data.tasks[task]
            sign = 1.0 if HIGHER_IS_BETTER[spec.metric] else -1.0
            total += schedule.task_eval_weight(self.config, task, spec.eval_weight) * sign * values[spec.metric]
        return total

    def _modality_losses(self) -> dict[str, float]:
        """Each modality's validation loss: the loss of each task that has it with only that
        modality's tokens kept, averaged over those tasks (SM4_SPEC §3)."""
        per_task = {}
        for task, mods in self.task_modalities.items():
            if len(mods) == 1:  # only one modality: its loss is the task's
                per_task[task] = {mods[0]: self._val[task]["loss"]}
                continue
            per_task[task] = {m: self.evaluate("val", keep={task: [m]}, tasks=[task], label=f"AEA {m}")[task]["loss"]
                              for m in mods}
        return modality_validation_loss(per_task, self.task_modalities)

    def _apply_adaptive_state(self):
        self.model.set_modality_k(self.aea.k)
        self.model.set_modality_weights(self.alp.weights if self.config.alp and self.config.alp_mode == "gradient" else None)

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self, resume: bool = True, on_start=None) -> list[dict]:
        """Train up to ``config.epochs``. resume: continue from ``last.pt`` if the folder has one
        (ResumeMismatch if it cannot be continued, before anything is written); otherwise a fresh
        start. on_start(epoch): called once the run is known to start, with the epoch it starts
        from (0 for a fresh start), before the first epoch."""
        last = os.path.join(self.out_dir, "last.pt")
        resuming = resume and os.path.exists(last)
        if resuming:
            self.load_checkpoint(last, check=True)
        distributed.barrier()  # every process decided (and read last.pt) before process 0 changes the folder
        if distributed.rank() == 0:
            self._start_log(resuming)
        if on_start is not None:
            on_start(self.epoch)
        while self.epoch < self.config.epochs:
            train_loss, aux_loss = self.train_epoch()
            self._val = self.evaluate("val")
            k = self.aea.step(self._modality_losses()) if self.config.aea else self.aea.k
            if self.alp.meter.accumulator is not None:  # every process then computes the same weights
                distributed.sum_(self.alp.meter.accumulator)
            weights = self.alp.step()
            entropy = self.alp.entropy  # the epoch's mean routing entropy per modality
            self.epoch += 1
            self._apply_adaptive_state()
            score = self.score(self._val)
            writer = distributed.rank() == 0
            if score > self.best_score:
                self.best_score, self.best_epoch = score, self.epoch
                if writer:
                    save_atomically(self.checkpoint(), os.path.join(self.out_dir, "best.pt"))
            aea_state = {"best_loss": {m: (v if math.isfinite(v) else None) for m, v in self.aea.best.items()},
                         "active": dict(self.aea.active)}
            entry = EpochLog(self.epoch, train_loss, aux_loss, self._val, score, dict(k), dict(weights), entropy,
                             self.best_epoch, {"aea": aea_state}).__dict__
            self.history.append(entry)
            if writer:
                _append_jsonl(os.path.join(self.out_dir, "log.jsonl"), entry)
                save_atomically(self.checkpoint(), last)
            if self.console is not None:
                self.console(self.epoch_line(entry))
        return self.history

    def _start_log(self, resuming: bool) -> None:
        """Resume: the log is rewritten from the checkpoint's history (a crash between a log line
        and its checkpoint leaves no extra line). Fresh start: an empty log, no old checkpoints."""
        os.makedirs(self.out_dir, exist_ok=True)
        if not resuming:
            for name in ("last.pt", "best.pt"):
                path = os.path.join(self.out_dir, name)
                if os.path.exists(path):
                    os.remove(path)
        lines = "".join(json.dumps(entry, default=float) + "\n" for entry in self.history) if resuming else ""
        write_text_atomically(os.path.join(self.out_dir, "log.jsonl"), lines)

    def epoch_line(self, entry: dict) -> str:
        """One console line for a log entry: losses, each task's validation metric, k and ALP weight per modality."""
        metrics = "  ".join(f"{task} {self.data.tasks[task].metric} {values[self.data.tasks[task].metric]:.4f}"
                            for task, values in entry["val"].items())
        modalities = "  ".join(f"{m} k={entry['k'][m]} w={entry['alp_weights'][m]:.3f}" for m in entry["k"])
        best = " *" if entry["best_epoch"] == entry["epoch"] else ""
        return (f"epoch {entry['epoch']}/{self.config.epochs}{best}  train loss {entry['train_loss']:.4f} "
                f"(aux {entry['aux_loss']:.4f})  val: {metrics}  |  {modalities}")

    def checkpoint(self) -> dict:
        return {
            "epoch": self.epoch,
            "configuration": self.configuration(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "aea": self.aea.state_dict(),
            "alp": self.alp.state_dict(),
            "best": (self.best_score, self.best_epoch),
            "history": self.history,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "shuffle": self.shuffle.get_state()},
        }

    def load_checkpoint(self, path: str, check: bool = False) -> None:
        """Restore a checkpoint of this trainer's model. check: refuse (ResumeMismatch) one trained
        with a configuration a resume cannot continue (see run_folder); either way a checkpoint of
        another model is refused with one message, not a list of tensor mismatches."""
        try:
            state = torch.load(path, weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{path}: not a readable sm4 checkpoint ({type(error).__name__}: {error})") from error
        missing = [key for key in ("epoch", "model", "optimizer", "aea", "alp", "rng") if key not in state]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {missing}")
        saved = state.get("configuration")
        if check and saved is not None:
            check_resumable(path, saved, self.configuration(), state["epoch"])
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.aea.load_state_dict(state["aea"])
            self.alp.load_state_dict(state["alp"])
        except (RuntimeError, ValueError, KeyError) as error:
            what = (f"{path} belongs to another model or training configuration than this one"
                    if saved is None else f"{path} was trained with another configuration")
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ResumeMismatch(f"{what} ({first}); start over with --no-resume or use a new --out") from error
        self.best_score, self.best_epoch = state["best"]
        self.history = list(state.get("history", []))
        self.epoch = state["epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.shuffle.set_state(state["rng"]["shuffle"])
        self._rebuild_scheduler(self.epoch)
        self._apply_adaptive_state()


def _append_jsonl(path: str, entry: dict) -> None:
    # One line per epoch, appended and flushed: a crash loses at most the line being written.
    with open(path, "a") as handle:
        handle.write(json.dumps(entry, default=float) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        return _Plain(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False)


class _Plain:
    """An iterable standing in for a tqdm bar, without output."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)
