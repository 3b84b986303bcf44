"""Configuration of the SM4 model and its training (SM4_SPEC §1, §3, §4), as dataclasses that load
from and save to JSON (and YAML when PyYAML is installed).

``SETTINGS`` holds the three published settings (small, medium, large; SM4_SPEC §4). Every
choice the papers leave open is a field here, with the default that matches the papers.
"""

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field

from .._io import write_text_atomically


@dataclass
class ModelConfig:
    """The architecture. Sizes per SM4_SPEC §1; the MoE keywords per §2.

    latent_tokens N and width C of the shared Perceiver encoder; its cross-attention has
    ``cross_heads`` x ``cross_head_dim``, its latent self-attention ``latent_heads`` x
    ``latent_head_dim``. The SM4 encoder: ``depth`` layers of ``heads`` heads, FFN hidden width
    ``ffn_hidden`` (H = 2C reproduces the published parameter counts), ``num_experts`` per group,
    ``top_k`` (k_max; the per-modality k of AEA stays within it). Ablations: ``sparse_attention``
    (False: without SMoA), ``sparse_ffn`` (False: without SMoE), ``dense`` (both dense, FFN hidden
    top_k * ffn_hidden: about the same FLOPs per token as the sparse FFN).
    Tokenisation: Fourier position encoding with ``num_freq_bands`` bands up to ``max_freq``;
    ``freq_schedule`` "logspace" (the papers' code) or "linspace" (the newer Perceiver code);
    ``patch_size`` for images. ``router_mode``: "shared" (one router per expert group, the
    papers' SM4), "modality" or "task" (one router per modality / per task over the same experts:
    the papers' routing ablations).

    The papers' model (M³SAT Tables 13-15, HighMMT's code) differs from sm4's earlier defaults in
    these fields, which the published settings set to the papers' values:
    ``encoder_ff`` "geglu" (Linear(C, 8C) -> GEGLU -> Linear(4C, C), the Perceiver code's) or
    "gelu" (Linear(C, mult C) -> GELU -> Linear, half the parameters); ``head_pool`` "mean" (each
    modality's N latents averaged: a head of M*C inputs, the papers' 128/20, 256/32, ...) or
    "flatten" (all M*N*C fused tokens: N times larger head, finer); ``token_layout`` "packed"
    (per modality [features, zeros, its position code] up to the widest modality's
    features + positions, then the one-hot: the papers' width) or "separate" (features and position
    codes in their own columns: wider, but a column always means the same thing);
    ``freq_bands`` / ``max_freqs``: per-modality overrides of ``num_freq_bands`` / ``max_freq``
    (the papers use 3 bands for the affect modalities, 6 elsewhere, max_freq 1);
    ``dense_kind`` for ``dense=True``: "equal_ffn" (sm4's: FFN hidden top_k * H, same FLOPs per
    token as the sparse FFN), "double_depth" (the papers' Dense Model 1: 2 x depth dense layers
    of hidden H: equal FLOPs) or "wide" (the papers' Dense Model 2: FFN hidden 4 x H).
    """

    latent_tokens: int = 12
    width: int = 64
    cross_heads: int = 1
    cross_head_dim: int = 64
    latent_heads: int = 8
    latent_head_dim: int = 64
    encoder_ff_mult: int = 4
    depth: int = 1
    heads: int = 8
    ffn_hidden: int = 128
    num_experts: int = 32
    top_k: int = 2
    noise_std: float = 1.0
    balance_loss_weight: float = 0.05
    sparse_attention: bool = True
    sparse_ffn: bool = True
    dense: bool = False
    dropout: float = 0.1
    num_freq_bands: int = 6
    max_freq: float = 10.0
    freq_base: float = 2.0
    freq_schedule: str = "logspace"
    patch_size: int = 1
    head_batch_norm: bool = True
    router_mode: str = "shared"
    backend: str | None = None
    # The papers' choices (SETTINGS use them; the field defaults keep sm4's earlier ones, see each).
    encoder_ff: str = "gelu"
    head_pool: str = "flatten"
    token_layout: str = "separate"
    freq_bands: dict = field(default_factory=dict)
    max_freqs: dict = field(default_factory=dict)
    dense_kind: str = "equal_ffn"

    def validate(self):
        if self.router_mode not in ("shared", "modality", "task"):
            raise ValueError(f"ModelConfig.router_mode must be 'shared', 'modality' or 'task', got {self.router_mode!r}")
        if self.freq_schedule not in ("logspace", "linspace"):
            raise ValueError(f"ModelConfig.freq_schedule must be 'logspace' or 'linspace', got {self.freq_schedule!r}")
        for name, allowed in (("encoder_ff", ("gelu", "geglu")), ("head_pool", ("flatten", "mean")),
                              ("token_layout", ("separate", "packed")),
                              ("dense_kind", ("equal_ffn", "double_depth", "wide"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("freq_bands", "max_freqs"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"ModelConfig.{name} must be a dict {{modality: value}}, got {type(getattr(self, name)).__name__}")
        if any(not isinstance(b, int) or b < 1 for b in self.freq_bands.values()):
            raise ValueError(f"ModelConfig.freq_bands values must be integers >= 1, got {self.freq_bands}")
        if any(not f > 0 for f in self.max_freqs.values()):
            raise ValueError(f"ModelConfig.max_freqs values must be > 0, got {self.max_freqs}")
        if self.width % self.heads:
            raise ValueError(f"ModelConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"ModelConfig.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        for name in ("latent_tokens", "width", "depth", "ffn_hidden", "num_experts", "num_freq_bands", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        return self


@dataclass
class TrainConfig:
    """The training loop (SM4_SPEC §3): Adam with ``lr`` and ``weight_decay``, optional cosine
    schedule, ``epochs``, ``batch_size`` per task, and the two adaptive mechanisms."""

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    cosine: bool = True
    aea: bool = True
    alp: bool = True
    alp_mode: str = "gradient"
    seed: int = 0
    grad_clip: float | None = None
    # Per task (MultiBench task names; absent tasks use batch_size / the TaskSpec's weights):
    # the papers' Tables 13-15. epoch_schedule "cycle": every step takes a batch of every task
    # (smaller tasks cycle, sm4's earlier loop); "once": each sample once per epoch, in HighMMT's
    # step order (a task with n batches takes the epoch's last n steps; see sm4.training.schedule).
    task_batch_size: dict = field(default_factory=dict)
    task_train_weight: dict = field(default_factory=dict)
    task_eval_weight: dict = field(default_factory=dict)
    epoch_schedule: str = "cycle"

    def validate(self):
        if self.alp_mode not in ("gradient", "loss"):
            raise ValueError(f"TrainConfig.alp_mode must be 'gradient' or 'loss', got {self.alp_mode!r}")
        if self.epoch_schedule not in ("cycle", "once"):
            raise ValueError(f"TrainConfig.epoch_schedule must be 'cycle' or 'once', got {self.epoch_schedule!r}")
        if any(not isinstance(b, int) or b < 1 for b in self.task_batch_size.values()):
            raise ValueError(f"TrainConfig.task_batch_size values must be integers >= 1, got {self.task_batch_size}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"TrainConfig needs epochs >= 1, batch_size >= 1, lr > 0; got {self.epochs}, {self.batch_size}, {self.lr}")
        return self


@dataclass
class Setting:
    """A named experiment setting: the model and its training."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self):
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Setting":
        unknown = set(data) - {"name", "model", "train"}
        if unknown:
            raise ValueError(f"unknown setting fields {sorted(unknown)} (expected name, model, train)")
        return cls(
            name=data.get("name", "custom"),
            model=_dataclass_from(ModelConfig, data.get("model", {}), "model"),
            train=_dataclass_from(TrainConfig, data.get("train", {}), "train"),
        ).validate()

    def save(self, path: str) -> None:
        """Write JSON (or YAML for .yaml/.yml) atomically."""
        write_text_atomically(path, _dump(self.to_dict(), path))

    @classmethod
    def load(cls, path: str) -> "Setting":
        with open(path) as handle:
            text = handle.read()
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as error:
                raise ImportError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from error
            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error})") from error
        return cls.from_dict(data)


def _dataclass_from(kind, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {where} fields {sorted(unknown)}; known: {sorted(names)}")
    return kind(**values)


def _dump(data: dict, path: str) -> str:
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2) + "\n"


# The published settings (SM4_SPEC §4; M³SAT Tables 13-15): C = 64, 8 heads of 8, H = 2C,
# 100 epochs, Adam, and the papers' model choices (GEGLU encoder feed-forward, mean-pooled heads of
# M*C inputs, the packed token layout, max_freq 1, 3 Fourier bands for the affect modalities and
# MIMIC's time series); per-task batch sizes and loss / evaluation weights as published. Table
# 14's weight and batch rows carry four values for three tasks; the last three are the tasks'
# (the batch row, 32 32 32 32, shows the first is not a task's).
_PAPER_MODEL = dict(encoder_ff="geglu", head_pool="mean", token_layout="packed", max_freq=1.0, num_freq_bands=6)
_AFFECT_BANDS = {name: 3 for name in ("mosei.vision", "mosei.audio", "mosei.text", "urfunny.vision", "urfunny.audio",
                                      "urfunny.text", "affect.text", "mimic.timeseries")}
SETTINGS = {
    "small": Setting("small", ModelConfig(latent_tokens=20, num_experts=16, balance_loss_weight=0.1, **_PAPER_MODEL),
                     TrainConfig(lr=5e-4, weight_decay=0.0, cosine=False, batch_size=28, epoch_schedule="once",
                                 task_batch_size={"push": 28, "vt": 64},
                                 task_train_weight={"push": 100.0, "vt": 1.0},
                                 task_eval_weight={"push": 100.0, "vt": 1.0})),
    "medium": Setting("medium", ModelConfig(latent_tokens=12, num_experts=32, balance_loss_weight=0.05, **_PAPER_MODEL),
                      TrainConfig(lr=1e-3, weight_decay=0.0, cosine=True, batch_size=32, epoch_schedule="once",
                                  task_batch_size={"enrico": 32, "push": 32, "avmnist": 32},
                                  task_train_weight={"enrico": 10.0, "push": 10.0, "avmnist": 0.8},
                                  task_eval_weight={"enrico": 10.0, "push": 10.0, "avmnist": 1.0})),
    "large": Setting("large", ModelConfig(latent_tokens=12, num_experts=16, balance_loss_weight=0.1,
                                          freq_bands=dict(_AFFECT_BANDS), **_PAPER_MODEL),
                     TrainConfig(lr=8e-4, weight_decay=1e-3, cosine=False, batch_size=32, epoch_schedule="once",
                                 task_batch_size={"urfunny": 32, "mosei": 32, "mimic": 20, "avmnist": 40},
                                 task_train_weight={"urfunny": 0.2, "mosei": 1.0, "mimic": 1.2, "avmnist": 0.9},
                                 task_eval_weight={"urfunny": 1.0, "mosei": 1.0, "mimic": 1.0, "avmnist": 1.0})),
}
# The tasks of each setting (M³SAT Table 1), for reports and schedules.
SETTING_TASKS = {"small": ("push", "vt"), "medium": ("enrico", "push", "avmnist"),
                 "large": ("urfunny", "mosei", "mimic", "avmnist")}


def get_setting(name_or_path: str) -> Setting:
    """A published setting by name (small, medium, large), or a setting file (.json / .yaml)."""
    if name_or_path in SETTINGS:
        return copy.deepcopy(SETTINGS[name_or_path]).validate()
    if os.path.exists(name_or_path):
        return Setting.load(name_or_path)
    raise ValueError(f"unknown setting {name_or_path!r}: use one of {sorted(SETTINGS)} or a .json/.yaml file")
