"""A HighMMT-shaped model (Liang et al. 2022, the papers' dense baseline), for the FLOP and
parameter comparison of ``python -m sm4 report flops`` and as a trainable baseline.

HighMMT tokenises every modality as pixels / steps (no patches), with the packed token layout of
``sm4.model.tokenize`` (width = the widest modality's channels + position code, plus the one-hot),
encodes each modality with one shared Perceiver block (cross-attention of N latents, a GEGLU
feed-forward, latent self-attention and its feed-forward), then for every ordered pair (i, j) of
the task's modalities runs ``cross_depth`` cross-modal blocks (modality i's latents attend to
modality j's with ``cross_heads`` heads, then the feed-forward / self-attention / feed-forward),
keeps the last latent of each, and classifies the concatenation (M (M - 1) C features) with a
LayerNorm and a Linear per task.

    inputs {modality: (B, *shape)} --Tokenizer--> (B, n_m, D) --PerceiverEncoder--> (B, N, C)
        --pairs (i, j), i != j: cross blocks--> (B, C) each --concat--> (B, M (M - 1) C) --head-->

``HIGHMMT_SETTINGS`` holds the shapes of HighMMT's released scripts (``roboticstasks.py`` for the
small setting, ``medium_tasks.py``, ``fourmultitask.py`` for the large one).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .sm4_model import Attention, PerceiverEncoder, encoder_feed_forward
from .tokenize import Tokenizer


@dataclass
class HighMMTConfig:
    """latent_tokens N, width C, latent_heads of the Perceiver block; cross_depth blocks per
    modality pair with cross_heads heads (of 64); ``tied_cross``: the cross blocks share one set
    of weights (HighMMT's weight_tie_layers) or each has its own."""

    latent_tokens: int = 20
    width: int = 64
    latent_heads: int = 8
    cross_depth: int = 2
    cross_heads: int = 4
    head_dim: int = 64
    num_freq_bands: int = 6
    max_freq: float = 1.0
    freq_bands: dict | None = None
    tied_cross: bool = True

    def perceiver_config(self) -> ModelConfig:
        return ModelConfig(latent_tokens=self.latent_tokens, width=self.width, cross_heads=1, cross_head_dim=self.head_dim,
                           latent_heads=self.latent_heads, latent_head_dim=self.head_dim, encoder_ff="geglu")


HIGHMMT_SETTINGS = {
    "small": HighMMTConfig(latent_tokens=20, latent_heads=8, cross_depth=2, tied_cross=False),
    "medium": HighMMTConfig(latent_tokens=12, latent_heads=8, cross_depth=2),
    "large": HighMMTConfig(latent_tokens=20, latent_heads=6, cross_depth=1),
}


class CrossModalBlock(nn.Module):
    """Latents (B, N, C) attend to another modality's latents (B, N, C), then the Perceiver's
    feed-forward / self-attention / feed-forward, all pre-norm and residual."""

    def __init__(self, config: HighMMTConfig):
        super().__init__()
        width, mult = config.width, 4
        self.norm_query, self.norm_context = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross_attn = Attention(width, width, config.cross_heads, config.head_dim)
        self.norm_ff1, self.ff1 = nn.LayerNorm(width), encoder_feed_forward("geglu", width, mult)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, width, config.latent_heads, config.head_dim)
        self.norm_ff2, self.ff2 = nn.LayerNorm(width), encoder_feed_forward("geglu", width, mult)

    def forward(self, x, context):
        x = x + self.cross_attn(self.norm_query(x), self.norm_context(context))
        x = x + self.ff1(self.norm_ff1(x))
        normed = self.norm_self(x)
        x = x + self.self_attn(normed, normed)
        return x + self.ff2(self.norm_ff2(x))


class HighMMTModel(nn.Module):
    """modalities: {name: (kind, per-sample shape)} as for SM4Model (give pixel / step shapes:
    HighMMT does not patch); tasks: {name: (modality names, outputs)}."""

    def __init__(self, config: HighMMTConfig, modalities, tasks):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer(modalities, config.num_freq_bands, config.max_freq, bands=config.freq_bands or {},
                                   layout="packed")
        self.tasks = {name: tuple(mods) for name, (mods, _) in tasks.items()}
        self.encoder = PerceiverEncoder(self.tokenizer.width, config.perceiver_config())
        blocks = 1 if config.tied_cross else config.cross_depth
        self.cross_blocks = nn.ModuleList(CrossModalBlock(config) for _ in range(blocks))
        self.heads = nn.ModuleDict()
        for task, (mods, outputs) in tasks.items():
            pairs = max(1, len(mods) * (len(mods) - 1))
            features = pairs * config.width if len(mods) > 1 else config.latent_tokens * config.width
            self.heads[task] = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, outputs))

    def forward(self, task: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """inputs {modality: (B, *shape)} -> (B, outputs)."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; tasks: {sorted(self.tasks)}")
        latents = [self.encoder(self.tokenizer(name, inputs[name])) for name in self.tasks[task]]
        if len(latents) == 1:
            return self.heads[task](latents[0].flatten(1))
        outs = []
        for i, own in enumerate(latents):
            for j, context in enumerate(latents):
                if i == j:
                    continue
                x = own
                for step in range(self.config.cross_depth):
                    x = self.cross_blocks[0 if self.config.tied_cross else step](x, context)
                outs.append(x[:, -1])  # HighMMT keeps the last latent of each pair
        return self.heads[task](torch.cat(outs, dim=1))
