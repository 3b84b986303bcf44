"""Modality preprocessing (SM4_SPEC §1.1): every modality becomes a sequence of tokens
``[raw features, zero padding to the widest modality, Fourier encoding of the position, one-hot
modality code]``.

Positions lie in [-1, 1] per axis: sequences and tables have one axis (the step or feature
index), images two (patch row and column), video three (frame, row, column of the patch). Per axis the encoding is
``[sin(pi f_i p) for i < B] + [cos(pi f_i p) for i < B] + [p]`` with frequencies
``f = logspace(1, log(max_freq / 2) / log(base), B, base)`` (the papers' code, the default) or
``linspace(1, max_freq / 2, B)`` (the newer Perceiver code).
"""

import math

import torch

KINDS = {"sequence": 1, "tabular": 1, "image": 2, "video": 3}  # kind -> position axes


def frequencies(num_bands: int, max_freq: float, schedule: str = "logspace", base: float = 2.0) -> torch.Tensor:
    """(num_bands,) float64 frequency schedule."""
    if schedule == "logspace":
        return torch.logspace(1.0, math.log(max_freq / 2) / math.log(base), num_bands, base=base, dtype=torch.float64)
    if schedule == "linspace":
        return torch.linspace(1.0, max_freq / 2, num_bands, dtype=torch.float64)
    raise ValueError(f"schedule must be 'logspace' or 'linspace', got {schedule!r}")


def fourier_encode(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """positions (..., axes) in [-1, 1] -> (..., axes * (2 * bands + 1)), per axis [sin..., cos..., p]."""
    scaled = positions.unsqueeze(-1) * freqs.to(positions) * math.pi  # (..., axes, bands)
    encoded = torch.cat([scaled.sin(), scaled.cos(), positions.unsqueeze(-1)], dim=-1)
    return encoded.flatten(-2)


def grid_positions(sizes: tuple[int, ...]) -> torch.Tensor:
    """(prod(sizes), len(sizes)) positions of a grid, each axis linspace(-1, 1) (0 for size 1)."""
    axes = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64) for n in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


def patchify(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Images (B, H, W, F) or videos (B, T, H, W, F) -> (B, patches, p^axes * F) and the patch grid.

    A patch is p pixels along every spatial (and time) axis; its pixels are flattened in order.
    """
    batch, *sizes, features = x.shape
    if any(size % patch for size in sizes):
        raise ValueError(f"input of {'x'.join(map(str, sizes))} does not split into patches of {patch} per axis")
    grid = tuple(size // patch for size in sizes)
    axes = len(sizes)
    split = [batch]
    for cells in grid:
        split += [cells, patch]
    x = x.reshape(*split, features)
    # (B, g0, p, g1, p, ..., F) -> (B, g0, g1, ..., p, p, ..., F)
    order = [0, *range(1, 2 * axes, 2), *range(2, 2 * axes + 1, 2), 2 * axes + 1]
    return x.permute(order).reshape(batch, -1, patch**axes * features), grid


class Tokenizer(torch.nn.Module):
    """Turns each modality's batch into tokens of one common width (no parameters).

    modalities: {name: (kind, per-sample shape)} in a fixed order (that order is the one-hot code
    and the modality id). num_bands / max_freq: the Fourier code's defaults; ``bands`` and
    ``max_freqs`` ({modality: value}) override them per modality (the papers: 3 bands for the
    affect modalities). layout:

    - "separate" (sm4's earlier layout): ``[features, zeros to the widest features, position code
      padded to the widest position code, one-hot]``; width = max features + max position width + M.
    - "packed" (the papers' / HighMMT's): ``[features, zeros, position code, one-hot]`` where the
      zeros fill up to the widest (features + position code) of all modalities; width =
      max(features_m + axes_m * (2 B_m + 1)) + M. Narrower: the papers' token width.
    """

    def __init__(self, modalities: dict[str, tuple[str, tuple[int, ...]]], num_bands: int, max_freq: float,
                 schedule: str = "logspace", base: float = 2.0, patch_size: int = 1, *, bands: dict | None = None,
                 max_freqs: dict | None = None, layout: str = "separate"):
        super().__init__()
        if layout not in ("separate", "packed"):
            raise ValueError(f"layout must be 'separate' or 'packed', got {layout!r}")
        self.layout = layout
        self.names = list(modalities)
        self.kinds = {name: kind for name, (kind, _) in modalities.items()}
        for name, kind in self.kinds.items():
            if kind not in KINDS:
                raise ValueError(f"modality {name!r}: kind must be one of {sorted(KINDS)}, got {kind!r}")
        self.patch_size = patch_size
        self.feature_widths = {}
        for name, (kind, shape) in modalities.items():
            features = shape[-1] * (patch_size**2 if kind == "image" else patch_size**3 if kind == "video" else 1)
            self.feature_widths[name] = features
        bands, max_freqs = bands or {}, max_freqs or {}
        self.bands = {name: int(bands.get(name, num_bands)) for name in self.names}
        self.position_widths = {name: KINDS[kind] * (2 * self.bands[name] + 1) for name, kind in self.kinds.items()}
        self.max_features = max(self.feature_widths.values())
        self.max_axes = max(KINDS[kind] for kind in self.kinds.values())
        self.position_width = max(self.position_widths.values())
        for index, name in enumerate(self.names):  # buffers by index: modality names may hold dots
            freqs = frequencies(self.bands[name], float(max_freqs.get(name, max_freq)), schedule, base)
            self.register_buffer(f"freqs_{index}", freqs, persistent=False)
        if layout == "packed":
            self.data_width = max(self.feature_widths[n] + self.position_widths[n] for n in self.names)
        else:
            self.data_width = self.max_features + self.position_width
        self.width = self.data_width + len(self.names)

    @property
    def freqs(self) -> torch.Tensor:
        """The first modality's frequencies (every modality's when none is overridden)."""
        return self.freqs_0

    def modality_id(self, name: str) -> int:
        return self.names.index(name)

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x: (B, *shape) of modality ``name`` -> tokens (B, n, width) in x's dtype."""
        kind = self.kinds[name]
        if kind in ("image", "video"):  # (B, H, W, F) / (B, T, H, W, F): patches, 2-D / 3-D positions
            tokens, grid = patchify(x, self.patch_size)
        else:
            tokens, grid = x, (x.shape[1],)
        batch, count, features = tokens.shape
        if features != self.feature_widths[name]:
            raise ValueError(f"modality {name!r}: expected {self.feature_widths[name]} features per token, got {features}")
        index = self.modality_id(name)
        positions = grid_positions(grid).to(x.device)  # (n, axes)
        encoded = fourier_encode(positions, getattr(self, f"freqs_{index}"))  # (n, axes * (2B + 1))
        encoded = encoded.to(x.dtype).expand(batch, -1, -1)
        onehot = torch.zeros(len(self.names), dtype=x.dtype, device=x.device)
        onehot[index] = 1
        if self.layout == "packed":
            middle = [tokens.new_zeros(batch, count, self.data_width - features - encoded.shape[-1]), encoded]
        else:
            middle = [tokens.new_zeros(batch, count, self.max_features - features),
                      torch.nn.functional.pad(encoded, (0, self.position_width - encoded.shape[-1]))]
        return torch.cat([tokens, *middle, onehot.expand(batch, count, -1)], dim=-1)
