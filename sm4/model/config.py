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

    def validate(self):
        if self.router_mode not in ("shared", "modality", "task"):
            raise ValueError(f"ModelConfig.router_mode must be 'shared', 'modality' or 'task', got {self.router_mode!r}")
        if self.freq_schedule not in ("logspace", "linspace"):
            raise ValueError(f"ModelConfig.freq_schedule must be 'logspace' or 'linspace', got {self.freq_schedule!r}")
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

    def validate(self):
        if self.alp_mode not in ("gradient", "loss"):
            raise ValueError(f"TrainConfig.alp_mode must be 'gradient' or 'loss', got {self.alp_mode!r}")
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
                raise SystemExit(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from error
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


# The published settings (SM4_SPEC §4; C = 64, 8 heads, H = 2C, 100 epochs, Adam).
SETTINGS = {
    "small": Setting("small", ModelConfig(latent_tokens=20, num_experts=16, balance_loss_weight=0.1),
                     TrainConfig(lr=5e-4, weight_decay=0.0, cosine=False, batch_size=28)),
    "medium": Setting("medium", ModelConfig(latent_tokens=12, num_experts=32, balance_loss_weight=0.05),
                      TrainConfig(lr=1e-3, weight_decay=0.0, cosine=True, batch_size=32)),
    "large": Setting("large", ModelConfig(latent_tokens=12, num_experts=16, balance_loss_weight=0.1),
                     TrainConfig(lr=8e-4, weight_decay=1e-3, cosine=False, batch_size=32)),
}


def get_setting(name_or_path: str) -> Setting:
    """A published setting by name (small, medium, large), or a setting file (.json / .yaml)."""
    if name_or_path in SETTINGS:
        return copy.deepcopy(SETTINGS[name_or_path]).validate()
    if os.path.exists(name_or_path):
        return Setting.load(name_or_path)
    raise ValueError(f"unknown setting {name_or_path!r}: use one of {sorted(SETTINGS)} or a .json/.yaml file")
