"""ALP, adaptive learning pace (SM4_SPEC §3): per-modality weights ``w = 1 - softmax(H)`` from the
previous epoch's mean routing entropies, applied as a per-token gradient scale or a task-loss scale."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ._state import _check_modalities, _to_float, _check_config, _json_copy, STATE_VERSION
from .entropy_meter import EntropyMeter


class AdaptiveLearningPace:
    """ALP: per-modality weights ``w = 1 - softmax(H)`` from the previous epoch's routing entropies.

    During an epoch feed the routers' per-token entropies to ``add`` / ``add_routing_stats`` (an
    ``EntropyMeter``, on device, no host syncs). ``step()`` after the epoch reads the mean entropy
    ``H_m`` of each modality, computes the weights for the next epoch and resets the meter.

    Args:
        modalities: the run's modality names; their order defines the modality index.
        enabled: False: all weights stay 1 (the meter still measures, so ``history`` logs H).
        mode: how the weights act (the paper does not say, SM4_SPEC §3):
            "gradient" (default): a per-token gradient scale. ``weight_tensor(device)`` gives the
                ``(M,)`` weights for ``modality_gradient_scale``; ``task_loss_scale`` returns 1.0.
            "loss": each task loss is scaled by the mean weight of the task's modalities
                (``task_loss_scale``); ``weight_tensor`` returns ones.
            So a loop may apply both unconditionally; ``scales_gradients`` / ``scales_losses``
            tell it which one is not a no-op.
        missing: Decision, a modality with no (finite) entropy in an epoch:
            "previous" (default): it keeps its last measured H (stale but continuous); if it was
                never measured it is left out of the softmax and gets weight 1.0;
            "neutral": it is left out of the softmax this epoch and gets weight 1.0.

    Decisions: before the first ``step`` all weights are 1.0 (no entropy measured yet). When fewer
    than two modalities take part in the softmax all weights are 1.0 (with a single modality the
    formula gives w = 0, which would stop its gradient). The weights are not renormalised: they
    sum to (number of modalities in the softmax) - 1, as the formula gives.
    """

    MODES = ("gradient", "loss")
    MISSING = ("previous", "neutral")

    def __init__(
        self, modalities: Sequence[str], enabled: bool = True, mode: str = "gradient", missing: str = "previous"
    ):
        self.modalities = _check_modalities(modalities, "AdaptiveLearningPace")
        if not isinstance(enabled, bool):
            raise TypeError(f"AdaptiveLearningPace: enabled must be a bool, got {type(enabled).__name__}")
        if mode not in self.MODES:
            raise ValueError(f"AdaptiveLearningPace: mode must be one of {self.MODES}, got {mode!r}")
        if missing not in self.MISSING:
            raise ValueError(f"AdaptiveLearningPace: missing must be one of {self.MISSING}, got {missing!r}")
        self.enabled = enabled
        self.mode = mode
        self.missing = missing
        self.meter = EntropyMeter(self.modalities)
        self._weights = {m: 1.0 for m in self.modalities}
        self._entropy: dict[str, float] = {}  # last H used per modality
        self.history: list[dict] = []
        self._tensors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # -- measuring --------------------------------------------------------------------------

    def add(self, entropy: torch.Tensor, modality_ids: torch.Tensor) -> None:
        """``EntropyMeter.add``: accumulate per-token routing entropies of this epoch."""
        self.meter.add(entropy, modality_ids)

    def add_routing_stats(self, routing_stats, modality_ids: torch.Tensor) -> None:
        """``EntropyMeter.add_routing_stats``: all routers of one sparse module's ``routing_stats``."""
        self.meter.add_routing_stats(routing_stats, modality_ids)

    # -- the weights ------------------------------------------------------------------------

    @property
    def weights(self) -> dict[str, float]:
        """The current ALP weights ``{modality: w_m}`` (a copy), whatever the mode."""
        return dict(self._weights)

    @property
    def entropy(self) -> dict[str, float]:
        """The ``H_m`` the current weights were computed from."""
        return dict(self._entropy)

    @property
    def epoch(self) -> int:
        return len(self.history)

    @property
    def scales_gradients(self) -> bool:
        return self.enabled and self.mode == "gradient"

    @property
    def scales_losses(self) -> bool:
        return self.enabled and self.mode == "loss"

    def weight_tensor(self, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(M,)`` per-modality gradient scales for ``modality_gradient_scale`` (cached until ``step``).

        The ALP weights in mode "gradient"; ones in mode "loss" or when disabled.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (device, dtype)
        tensor = self._tensors.get(key)
        if tensor is None:
            values = [self._weights[m] if self.mode == "gradient" else 1.0 for m in self.modalities]
            tensor = torch.tensor(values, dtype=dtype, device=device)
            self._tensors[key] = tensor
        return tensor

    def task_loss_scale(self, task_modalities: Sequence[str]) -> float:
        """Mode "loss": the mean ALP weight of the task's modalities; mode "gradient": 1.0."""
        modalities = _check_modalities(task_modalities, "AdaptiveLearningPace.task_loss_scale")
        unknown = [m for m in modalities if m not in self._weights]
        if unknown:
            raise ValueError(f"AdaptiveLearningPace.task_loss_scale: unknown modalities {unknown}")
        if self.mode != "loss":
            return 1.0
        return sum(self._weights[m] for m in modalities) / len(modalities)

    def step(self, entropy_means: Mapping[str, float] | None = None) -> dict[str, float]:
        """End of epoch: read the meter (or use ``entropy_means``), compute the next epoch's weights,
        reset the meter. Returns the new weights."""
        if entropy_means is None:
            means, counts = self.meter.read()
        else:
            if not isinstance(entropy_means, Mapping):
                raise TypeError("AdaptiveLearningPace.step: entropy_means must be a mapping modality -> H")
            unknown = sorted(set(entropy_means) - set(self.modalities), key=str)
            if unknown:
                raise ValueError(f"AdaptiveLearningPace.step: unknown modalities {unknown}")
            means = {}
            for m in self.modalities:
                if m in entropy_means:
                    value = _to_float(entropy_means[m], f"AdaptiveLearningPace.step: entropy of {m!r}")
                    if not math.isfinite(value):
                        raise ValueError(f"AdaptiveLearningPace.step: the entropy of {m!r} is not finite ({value})")
                    means[m] = value
            counts = None
        self.meter.reset()

        if self.missing == "previous":
            self._entropy.update(means)
        else:
            self._entropy = dict(means)
        used = {m: self._entropy[m] for m in self.modalities if m in self._entropy}
        weights = {m: 1.0 for m in self.modalities}
        if self.enabled and len(used) >= 2:
            top = max(used.values())
            exp = {m: math.exp(h - top) for m, h in used.items()}
            total = sum(exp.values())
            for m, e in exp.items():
                weights[m] = 1.0 - e / total
        self._weights = weights
        self._tensors.clear()

        self.history.append(
            {
                "epoch": len(self.history) + 1,
                "measured": dict(means),
                "tokens": counts,
                "entropy": dict(used),
                "weights": dict(weights),
            }
        )
        return dict(weights)

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain, JSON-serialisable state, including the meter's partial sums (a host read)."""
        return {
            "version": STATE_VERSION,
            "modalities": list(self.modalities),
            "enabled": self.enabled,
            "mode": self.mode,
            "missing": self.missing,
            "weights": dict(self._weights),
            "entropy": dict(self._entropy),
            "meter": self.meter.state_dict(),
            "history": [_json_copy(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict()`` output (also after a JSON round trip); the configuration
        (modalities, enabled, mode, missing) must match this instance's."""
        _check_config(
            state,
            "AdaptiveLearningPace",
            modalities=self.modalities,
            enabled=self.enabled,
            mode=self.mode,
            missing=self.missing,
        )
        self._weights = {m: float(state["weights"][m]) for m in self.modalities}
        self._entropy = {m: float(v) for m, v in state["entropy"].items() if m in self.modalities}
        self.meter.load_state_dict(state.get("meter"))
        self.history = [_json_copy(h) for h in state.get("history", [])]
        self._tensors.clear()

    def __repr__(self) -> str:
        return f"AdaptiveLearningPace(weights={self._weights}, mode={self.mode!r}, enabled={self.enabled})"
