"""The per-modality running mean of routing entropies that ALP reads once per epoch, kept on the
entropies' device (no host sync while adding)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._state import _check_modalities, _check_modality_ids


class EntropyMeter:
    """Per-modality running sum and count of routing entropies, kept on the entropies' device.

    ``add`` does no host sync (an ``index_add_`` into a ``(2, M)`` float64 accumulator: row 0 the
    sum of entropies, row 1 the token count); ``epoch_means`` is the one host read.
    Non-finite entropies (NaN from non-finite tokens, inf) are ignored: they add to neither row.
    Ids must lie in ``[0, M)``; out-of-range ids raise on CPU and are not checked on an accelerator.
    For data-parallel training all-reduce ``meter.accumulator`` (a sum) before ``epoch_means``.
    """

    def __init__(self, modalities: Sequence[str]):
        self.modalities = _check_modalities(modalities, "EntropyMeter")
        self.accumulator: torch.Tensor | None = None  # (2, M) float64, created on the first add

    def add(self, entropy: torch.Tensor, modality_ids: torch.Tensor) -> None:
        """Accumulate per-token entropies ``(T,)`` (or any shape) with the tokens' modality ids (same numel)."""
        if not isinstance(entropy, torch.Tensor) or not entropy.is_floating_point():
            raise TypeError("EntropyMeter.add: entropy must be a floating-point tensor")
        _check_modality_ids(modality_ids, "EntropyMeter.add")
        if entropy.numel() != modality_ids.numel():
            raise ValueError(
                f"EntropyMeter.add: entropy has {entropy.numel()} tokens ({tuple(entropy.shape)}) but "
                f"modality_ids has {modality_ids.numel()} ({tuple(modality_ids.shape)})"
            )
        e = entropy.detach().reshape(-1).to(torch.float64)
        ids = modality_ids.reshape(-1).to(device=e.device, dtype=torch.long)
        if self.accumulator is None:
            self.accumulator = torch.zeros(2, len(self.modalities), dtype=torch.float64, device=e.device)
        elif self.accumulator.device != e.device:
            self.accumulator = self.accumulator.to(e.device)
        valid = torch.isfinite(e)
        source = torch.stack(
            [torch.where(valid, e, torch.zeros((), dtype=e.dtype, device=e.device)), valid.to(e.dtype)]
        )
        self.accumulator.index_add_(1, ids, source)

    def add_routing_stats(
        self, routing_stats: Mapping[str, Mapping[str, torch.Tensor]], modality_ids: torch.Tensor
    ) -> None:
        """Add every router's per-token ``"entropy"`` of one sparse module's ``routing_stats``.

        All routers count (SM4_SPEC §3: the mean over all routers and layers). Each router's
        entropy must have as many tokens as ``modality_ids`` (for cross-attention key/value
        routers pass the key tokens' ids in a separate call with those stats).
        """
        for name, stats in routing_stats.items():
            entropy = stats.get("entropy") if isinstance(stats, Mapping) else None
            if entropy is None:
                raise ValueError(f"EntropyMeter.add_routing_stats: router {name!r} has no 'entropy'")
            self.add(entropy, modality_ids)

    def read(self) -> tuple[dict[str, float], dict[str, int]]:
        """``(means, counts)`` for the modalities that had at least one finite entropy (one host read)."""
        if self.accumulator is None:
            return {}, {}
        sums, counts = self.accumulator.cpu().tolist()
        means = {m: s / c for m, s, c in zip(self.modalities, sums, counts) if c > 0}
        return means, {m: int(c) for m, c in zip(self.modalities, counts) if c > 0}

    def epoch_means(self) -> dict[str, float]:
        """``{modality: mean entropy}`` since the last reset; modalities without tokens are omitted."""
        return self.read()[0]

    def reset(self) -> None:
        if self.accumulator is not None:
            self.accumulator.zero_()

    def state_dict(self) -> dict | None:
        if self.accumulator is None:
            return None
        sums, counts = self.accumulator.cpu().tolist()
        return {"sums": sums, "counts": counts}

    def load_state_dict(self, state: Mapping | None) -> None:
        if state is None:
            self.accumulator = None
            return
        device = self.accumulator.device if self.accumulator is not None else torch.device("cpu")
        acc = torch.tensor([list(state["sums"]), list(state["counts"])], dtype=torch.float64)
        if acc.shape != (2, len(self.modalities)):
            raise ValueError(
                f"EntropyMeter.load_state_dict: expected {len(self.modalities)} modalities, got {acc.shape[1]}"
            )
        self.accumulator = acc.to(device)
