"""The SM4 multi-modal multi-task model (SM4_SPEC §1): tokenise each modality, encode it with one
shared Perceiver block into N latent tokens, concatenate a task's modalities along the sequence,
run the SM4 encoder layers (sparse MoE attention and FFN with a per-modality k), and finish with
the task's head.

    inputs {modality: (B, *shape)} --Tokenizer--> (B, n_m, D) --PerceiverEncoder--> (B, N, C)
        --concat over the task's modalities--> (B, M*N, C) --SM4EncoderLayer x depth-->
        --head (flatten, or mean per modality -> Linear -> BatchNorm)--> (B, outputs)

The encoder layers are shared by all tasks (their experts and routers see every task's tokens;
the per-token k comes from each token's modality, set by AEA through ``set_modality_k``). ALP's
per-modality gradient scale (``set_modality_weights``) is applied to the tokens at the Perceiver
output and at the output of every SMoA and SMoE block (forward hooks), identity in the forward.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import SM4EncoderLayer, SparseMoEAttention, SparseMoEFFN
from ..modules.dense_attention import DenseAttention
from ..training.adaptive import modality_gradient_scale
from .batch_norm import BatchNorm1d  # nn.BatchNorm1d, whole-batch statistics under data parallelism
from .config import ModelConfig
from .tokenize import Tokenizer


class Attention(nn.Module):
    """Multi-head attention with its own inner width (heads x head_dim), query and context widths."""

    def __init__(self, query_dim, context_dim, heads, head_dim, dropout=0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x, context):
        batch = x.shape[0]
        split = lambda t: t.view(batch, t.shape[1], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(x))
        k, v = (split(t) for t in self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(batch, x.shape[1], -1))


class FeedForward(nn.Sequential):
    """Linear(dim, mult dim) -> GELU -> Linear(mult dim, dim): sm4's earlier encoder feed-forward."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim))


class GEGLU(nn.Module):
    """(..., 2h) -> (..., h): the first half times GELU of the second (Shazeer's GLU variant)."""

    def forward(self, x):
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class GEGLUFeedForward(nn.Sequential):
    """Linear(dim, 2 mult dim) -> GEGLU -> Linear(mult dim, dim): the Perceiver code's feed-forward,
    which the papers' encoder uses (C = 64: Linear(64, 512) -> GEGLU -> Linear(256, 64))."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__(nn.Linear(dim, 2 * dim * mult), GEGLU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim))


def encoder_feed_forward(kind: str, dim: int, mult: int) -> nn.Module:
    return GEGLUFeedForward(dim, mult) if kind == "geglu" else FeedForward(dim, mult)


class PerceiverEncoder(nn.Module):
    """The shared unimodal encoder: N x C learned latents cross-attend (pre-norm on latents and
    inputs) to a modality's tokens, then a feed-forward, then latent self-attention and its
    feed-forward (as in the perceiver-pytorch code the papers built on); all residual, depth 1."""

    def __init__(self, input_dim, config: ModelConfig):
        super().__init__()
        width = config.width
        self.latents = nn.Parameter(torch.randn(config.latent_tokens, width) * 0.02)
        self.norm_latents, self.norm_inputs = nn.LayerNorm(width), nn.LayerNorm(input_dim)
        self.cross_attn = Attention(width, input_dim, config.cross_heads, config.cross_head_dim)
        self.norm_ff1 = nn.LayerNorm(width)
        self.ff1 = encoder_feed_forward(config.encoder_ff, width, config.encoder_ff_mult)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, width, config.latent_heads, config.latent_head_dim)
        self.norm_ff2 = nn.LayerNorm(width)
        self.ff2 = encoder_feed_forward(config.encoder_ff, width, config.encoder_ff_mult)

    def forward(self, tokens):
        """tokens (B, n, input_dim) -> latents (B, N, C)."""
        latents = self.latents.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        latents = latents + self.cross_attn(self.norm_latents(latents), self.norm_inputs(tokens))
        latents = latents + self.ff1(self.norm_ff1(latents))
        normed = self.norm_self(latents)
        latents = latents + self.self_attn(normed, normed)
        return latents + self.ff2(self.norm_ff2(latents))


def make_tokenizer(config: ModelConfig, modalities) -> Tokenizer:
    return Tokenizer(modalities, config.num_freq_bands, config.max_freq, config.freq_schedule, config.freq_base,
                     config.patch_size, bands=config.freq_bands, max_freqs=config.max_freqs, layout=config.token_layout)


def dense_shape(config: ModelConfig, sparse_ffn: bool) -> tuple[int, int]:
    """(FFN hidden width, depth) of the encoder layers. Sparse FFN: (H, depth). A dense FFN
    (``dense_kind``): "equal_ffn" (top_k * H in one layer: the sparse FFN's FLOPs per token),
    "double_depth" (the papers' Dense Model 1: H, 2 x depth: the FLOPs of top_k = 2 experts in
    attention and FFN), "wide" (the papers' Dense Model 2: 4 H)."""
    if sparse_ffn:
        return config.ffn_hidden, config.depth
    if config.dense and config.dense_kind == "double_depth":
        return config.ffn_hidden, 2 * config.depth
    if config.dense and config.dense_kind == "wide":
        return 4 * config.ffn_hidden, config.depth
    return config.ffn_hidden * config.top_k, config.depth


class SM4Model(nn.Module):
    """SM4 for a set of modalities and tasks.

    modalities: {name: (kind, per-sample shape)}, kind "sequence", "tabular" or "image" (the last
    dim of the shape is the feature width). tasks: {name: (modality names, number of outputs)}.
    """

    def __init__(self, config: ModelConfig, modalities: dict[str, tuple[str, tuple[int, ...]]],
                 tasks: dict[str, tuple[tuple[str, ...], int]]):
        super().__init__()
        config.validate()
        self.config = config
        self.tokenizer = make_tokenizer(config, modalities)
        self.modality_names = list(modalities)
        self.tasks = {name: tuple(mods) for name, (mods, _) in tasks.items()}
        for task, mods in self.tasks.items():
            unknown = [m for m in mods if m not in modalities]
            if unknown:
                raise ValueError(f"task {task!r} uses unknown modalities {unknown}; known: {self.modality_names}")
        self.encoder = PerceiverEncoder(self.tokenizer.width, config)
        sparse_attention = config.sparse_attention and not config.dense
        sparse_ffn = config.sparse_ffn and not config.dense
        ffn_hidden, depth = dense_shape(config, sparse_ffn)
        num_routers = {"shared": 1, "modality": len(self.modality_names), "task": len(self.tasks)}[config.router_mode]
        self.layers = nn.ModuleList(
            SM4EncoderLayer(config.width, config.heads, dim_feedforward=ffn_hidden, dropout=config.dropout,
                            batch_first=True, norm_first=True, num_experts=config.num_experts, top_k=config.top_k,
                            noise_std=config.noise_std, balance_loss_weight=config.balance_loss_weight,
                            sparse_attention=sparse_attention, sparse_ffn=sparse_ffn, num_routers=num_routers,
                            backend=config.backend)
            for _ in range(depth)
        )
        for layer in self.layers:
            if not layer.sparse_attention:
                # torch's nn.MultiheadAttention draws its dropout per process; DenseAttention (same
                # parameters and state dict) draws it per sample, so data-parallel runs equal one process.
                layer.self_attn = DenseAttention.from_multihead(layer.self_attn)
        self.final_norm = nn.LayerNorm(config.width)
        head_tokens = 1 if config.head_pool == "mean" else config.latent_tokens
        self.heads = nn.ModuleDict({
            task: nn.Sequential(
                nn.Flatten(), nn.Linear(len(mods) * head_tokens * config.width, outputs),
                BatchNorm1d(outputs) if config.head_batch_norm else nn.Identity(),
            )
            for task, (mods, outputs) in tasks.items()
        })
        if config.head_batch_norm:
            # The final LayerNorm's bias and the heads' Linear biases add one constant per output,
            # which the heads' BatchNorm subtracts in training: their gradient is zero up to
            # rounding, and Adam (dividing each gradient by its own scale) would turn that rounding
            # into steps of about lr, a random walk that only moves the running means. Frozen (kept
            # in the state_dict); also what keeps data-parallel runs equal to one process's.
            self.final_norm.bias.requires_grad_(False)
            for head in self.heads.values():
                head[1].bias.requires_grad_(False)
        # AEA's k and ALP's gradient weights per modality (buffers: saved with the model).
        self.register_buffer("modality_k", torch.full((len(self.modality_names),), config.top_k, dtype=torch.long))
        self.register_buffer("modality_weight", torch.ones(len(self.modality_names)))
        self.scale_gradients = False
        self._token_modality = None  # (B, L) modality ids of the current forward, for the hooks
        self.last_token_modality = None  # (B * L,) modality id of each token the layers saw
        for layer in self.layers:
            for part in (layer.self_attn, getattr(layer, "ffn", None)):
                if isinstance(part, (SparseMoEAttention, SparseMoEFFN)):
                    part.register_forward_hook(self._scale_output_hook)

    def set_modality_k(self, k: dict[str, int]) -> None:
        """Per-modality k (AEA), each in [1, top_k]."""
        with torch.no_grad():
            for name, value in k.items():
                if not 1 <= int(value) <= self.config.top_k:
                    raise ValueError(f"k for modality {name!r} must be in [1, top_k={self.config.top_k}], got {value}")
                self.modality_k[self.modality_names.index(name)] = int(value)

    def set_modality_weights(self, weights: dict[str, float] | None) -> None:
        """ALP's per-modality gradient weights; None turns the gradient scaling off."""
        self.scale_gradients = weights is not None
        if weights:
            with torch.no_grad():
                for name, value in weights.items():
                    self.modality_weight[self.modality_names.index(name)] = float(value)

    def _scale(self, x):
        if not self.scale_gradients or self._token_modality is None:
            return x
        return modality_gradient_scale(x, self._token_modality, self.modality_weight)

    def _scale_output_hook(self, module, inputs, output):
        if isinstance(output, tuple):  # attention: (output, weights)
            return (self._scale(output[0]), *output[1:])
        return self._scale(output)

    def forward(self, task: str, inputs: dict[str, torch.Tensor], keep: list[str] | None = None) -> torch.Tensor:
        """inputs: {modality: (B, *shape)} for the task's modalities -> (B, outputs).

        keep: only these modalities' tokens enter the encoder layers (the others' slots in the
        head's input are zeros): AEA's per-modality validation loss.
        """
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; tasks: {sorted(self.tasks)}")
        mods = self.tasks[task]
        missing = [m for m in mods if m not in inputs]
        if missing:
            raise ValueError(f"task {task!r} needs modalities {list(mods)}; missing {missing}")
        used = [m for m in mods if keep is None or m in keep]
        if not used:
            raise ValueError(f"keep={keep} leaves no modality of task {task!r} ({list(mods)})")
        latents, ids = [], []
        for name in used:
            encoded = self.encoder(self.tokenizer(name, inputs[name]))  # (B, N, C)
            latents.append(encoded)
            ids.append(torch.full(encoded.shape[:2], self.modality_names.index(name), dtype=torch.long, device=encoded.device))
        x = torch.cat(latents, dim=1)
        modality_ids = torch.cat(ids, dim=1)  # (B, L)
        self._token_modality = modality_ids
        self.last_token_modality = modality_ids.reshape(-1)
        x = self._scale(x)
        token_k = self.modality_k[modality_ids]
        routing = {"token_k": token_k}
        if self.config.router_mode == "modality":
            routing["router_index"] = modality_ids
        elif self.config.router_mode == "task":
            routing["router_index"] = torch.full_like(modality_ids, list(self.tasks).index(task))
        for layer in self.layers:
            x = layer(x, **routing)
        x = self.final_norm(x)
        self._token_modality = None
        # Head input in the task's modality order, zeros for modalities left out by `keep`.
        n = self.config.latent_tokens
        slots = {name: x[:, i * n:(i + 1) * n] for i, name in enumerate(used)}
        full = [slots.get(name, x.new_zeros(x.shape[0], n, x.shape[2])) for name in mods]
        if self.config.head_pool == "mean":  # one token per modality: the papers' M*C head inputs
            full = [slot.mean(dim=1, keepdim=True) for slot in full]
        return self.heads[task](torch.cat(full, dim=1))
