"""SM4's two adaptive training mechanisms (SM4_SPEC §3): AEA and ALP, and the gradient scale ALP uses.

* ``AdaptiveExpertAllocation`` (AEA) grows or shrinks each modality's number of experts per token
  ``k_m`` from its validation loss, once per epoch. ``token_k(modality_ids)`` turns the current
  ``k_m`` into the per-token ``k`` every sparse module accepts (``token_k=``).
* ``AdaptiveLearningPace`` (ALP) measures each modality's mean routing entropy ``H_m`` during an
  epoch (``EntropyMeter``) and gives the next epoch the weights ``w = 1 - softmax(H)``, applied as a
  per-token gradient scale (``modality_gradient_scale``, the default) or as a task-loss scale.
* ``scale_gradient`` / ``modality_gradient_scale``: identity forward, gradient times a per-token
  weight backward (works under ``torch.compile(fullgraph=True)``).

A training loop uses them like this::

    aea = AdaptiveExpertAllocation(modalities, k_max=moe.top_k)
    alp = AdaptiveLearningPace(modalities)
    for epoch in range(epochs):
        alp_w = alp.weight_tensor(device)            # once per epoch; ones in mode="loss"
        for batch in loader:                         # ids: (B, S) modality index of each token
            token_k = aea.token_k(ids)
            h = modality_gradient_scale(encoder(x), ids, alp_w)
            ...                                      # same after every SMoA / SMoE output
            for module in sparse_modules:            # each router's per-token entropy
                alp.add_routing_stats(module.routing_stats, ids)
            loss = sum(alp.task_loss_scale(task_modalities[t]) * w_t * loss_t for t ...) + aux
        val = modality_validation_loss(per_task_losses, task_modalities)
        aea.step(val)
        alp.step()

Choices the papers leave open are documented where they are made (search for "Decision").
Both classes' ``state_dict()`` are plain JSON-serialisable Python values (non-finite floats are
stored as the strings "inf", "-inf", "nan"), so they can go into a checkpoint or a JSON log.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = [
    "AdaptiveExpertAllocation",
    "AdaptiveLearningPace",
    "EntropyMeter",
    "modality_gradient_scale",
    "modality_validation_loss",
    "scale_gradient",
]

_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_modalities(modalities, owner: str) -> tuple[str, ...]:
    if isinstance(modalities, str) or not isinstance(modalities, Iterable):
        raise TypeError(f"{owner}: modalities must be a list of str, got {type(modalities).__name__}")
    modalities = tuple(modalities)
    if not modalities:
        raise ValueError(f"{owner}: modalities must not be empty")
    for m in modalities:
        if not isinstance(m, str):
            raise TypeError(f"{owner}: modality names must be str, got {m!r}")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"{owner}: modality names must be unique, got {list(modalities)}")
    return modalities


def _to_float(value, what: str) -> float:
    """A Python number or a one-element tensor as a float (the tensor case reads it to the host)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, got a bool")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    return float(value)


def _encode_float(x: float) -> float | str:
    """JSON-safe float: finite floats as they are, others as "inf" / "-inf" / "nan"."""
    return x if math.isfinite(x) else str(x)


def _decode_float(x) -> float:
    if isinstance(x, str):
        if x not in ("inf", "-inf", "nan"):
            raise ValueError(f"not an encoded float: {x!r}")
        return float(x)
    return float(x)


def _check_modality_ids(modality_ids, owner: str):
    if not isinstance(modality_ids, torch.Tensor):
        raise TypeError(f"{owner}: modality_ids must be a tensor, got {type(modality_ids).__name__}")
    if modality_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{owner}: modality_ids must be an integer tensor, got {modality_ids.dtype}")


def _check_config(saved: Mapping, owner: str, **expected) -> None:
    version = saved.get("version")
    if version != _STATE_VERSION:
        raise ValueError(f"{owner}.load_state_dict: unsupported state version {version!r} (expected {_STATE_VERSION})")
    for key, value in expected.items():
        got = saved.get(key)
        if isinstance(value, tuple):
            got = tuple(got) if isinstance(got, (list, tuple)) else got
        if got != value:
            raise ValueError(f"{owner}.load_state_dict: the state has {key}={got!r} but this instance has {value!r}")


# --------------------------------------------------------------------------------------------
# AEA
# --------------------------------------------------------------------------------------------


def modality_validation_loss(
    per_task_losses: Mapping[str, Mapping[str, float]],
    task_modalities: Mapping[str, Sequence[str]],
) -> dict[str, float]:
    """The per-modality validation loss ``L_m`` AEA needs (SM4_SPEC §3; not defined in the paper).

    Definition used by sm4: ``L_m`` = the mean, over the tasks that have modality ``m``, of that
    task's validation loss computed with only modality ``m`` kept (the tokens of the task's other
    modalities dropped). The caller runs those evaluations; this helper checks and averages them.

    per_task_losses: ``{task: {modality: loss with only that modality kept}}``; losses are Python
        numbers or one-element tensors.
    task_modalities: ``{task: [modalities of the task]}``.

    Decision (strict inputs): the tasks of both mappings must be the same, and each task's losses
    must cover exactly that task's modalities, so a forgotten evaluation cannot silently change an
    average. NaN losses raise ValueError (a NaN would otherwise read as "no improvement" to AEA).
    Returns ``{modality: L_m}`` in order of first appearance in ``task_modalities``.
    """
    if not isinstance(per_task_losses, Mapping) or not isinstance(task_modalities, Mapping):
        raise TypeError("modality_validation_loss: per_task_losses and task_modalities must be mappings")
    if set(per_task_losses) != set(task_modalities):
        missing = sorted(set(task_modalities) - set(per_task_losses))
        extra = sorted(set(per_task_losses) - set(task_modalities))
        raise ValueError(f"modality_validation_loss: tasks differ: missing losses for {missing}, unknown tasks {extra}")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for task, modalities in task_modalities.items():
        modalities = _check_modalities(modalities, f"modality_validation_loss (task {task!r})")
        losses = per_task_losses[task]
        if not isinstance(losses, Mapping):
            raise TypeError(f"modality_validation_loss: per_task_losses[{task!r}] must be a mapping modality -> loss")
        if set(losses) != set(modalities):
            raise ValueError(
                f"modality_validation_loss: task {task!r} has modalities {sorted(modalities)} "
                f"but losses for {sorted(losses)}"
            )
        for m in modalities:
            value = _to_float(losses[m], f"loss of task {task!r}, modality {m!r}")
            if math.isnan(value):
                raise ValueError(f"modality_validation_loss: loss of task {task!r}, modality {m!r} is NaN")
            sums[m] = sums.get(m, 0.0) + value
            counts[m] = counts.get(m, 0) + 1
    return {m: sums[m] / counts[m] for m in sums}


class AdaptiveExpertAllocation:
    """AEA: a per-modality number of experts per token ``k_m``, adapted after every epoch.

    State per modality ``m``: ``k_m`` (starts at 1), ``best_m`` (+inf), ``improved_m`` (True),
    ``active_m`` (True). ``step(val_losses)`` applies SM4_SPEC §3 to every active modality:

    * ``L_m < best_m``: ``best_m = L_m``, ``improved_m = True``;
    * else if ``improved_m``: ``k_m += 1``, ``improved_m = False`` (plateau: grow capacity);
    * else: ``active_m = False``, ``k_m -= 1`` (the increase did not help: revert, frozen for good);

    then clamps ``k_m`` to ``[1, k_max]``.

    Args:
        modalities: the run's modality names; their order defines the modality index used by
            ``token_k`` (the ``modality_ids`` of the tokens).
        k_max: the largest k (the sparse modules' ``top_k``; 1 <= k_max).
        enabled: False gives the papers' fixed-k baseline: every ``k_m`` is ``k_max`` and stays
            so (``step`` checks its input and logs it to ``history`` but changes nothing).
        literal_clamp: Decision, the rule at the clamp. True (default, the rule exactly as
            written): a growth clamped away at ``k_max`` still counts as a growth, so the revert
            that follows it lowers ``k_m`` to ``k_max - 1``. False: a revert only undoes a growth
            that really happened (a modality whose growth was clamped away freezes at ``k_max``).
            The two differ only when ``k_m`` reaches ``k_max`` (with the published ``top_k = 2``,
            any modality that grew once).

    Decisions: a modality missing from ``val_losses`` is left completely unchanged that epoch
    (no plateau is counted); names not in ``modalities`` and NaN losses raise ValueError.
    """

    def __init__(self, modalities: Sequence[str], k_max: int, enabled: bool = True, literal_clamp: bool = True):
        self.modalities = _check_modalities(modalities, "AdaptiveExpertAllocation")
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
            raise ValueError(f"AdaptiveExpertAllocation: k_max must be an int >= 1, got {k_max!r}")
        for name, flag in (("enabled", enabled), ("literal_clamp", literal_clamp)):
            if not isinstance(flag, bool):
                raise TypeError(f"AdaptiveExpertAllocation: {name} must be a bool, got {type(flag).__name__}")
        self.k_max = k_max
        self.enabled = enabled
        self.literal_clamp = literal_clamp
        start = 1 if enabled else k_max
        self._k = {m: start for m in self.modalities}
        self._best = {m: math.inf for m in self.modalities}
        self._improved = {m: True for m in self.modalities}
        self._active = {m: True for m in self.modalities}
        self._grew = {m: False for m in self.modalities}  # last plateau really raised k (literal_clamp=False)
        self.history: list[dict] = []
        self._tables: dict[torch.device, torch.Tensor] = {}

    # -- reading the state ------------------------------------------------------------------

    @property
    def k(self) -> dict[str, int]:
        """Current ``{modality: k_m}`` (a copy)."""
        return dict(self._k)

    @property
    def best(self) -> dict[str, float]:
        return dict(self._best)

    @property
    def improved(self) -> dict[str, bool]:
        return dict(self._improved)

    @property
    def active(self) -> dict[str, bool]:
        return dict(self._active)

    @property
    def epoch(self) -> int:
        """Number of ``step`` calls so far."""
        return len(self.history)

    def k_table(self, device=None) -> torch.Tensor:
        """``(M,)`` int64 tensor of ``k_m`` in ``modalities`` order on ``device`` (cached until k changes)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        table = self._tables.get(device)
        if table is None:
            table = torch.tensor([self._k[m] for m in self.modalities], dtype=torch.int64, device=device)
            self._tables[device] = table
        return table

    def token_k(self, modality_ids: torch.Tensor) -> torch.Tensor:
        """Each token's ``k``: ``modality_ids`` (any shape, ints in ``[0, M)``) -> int64 of the same shape.

        A lookup in ``k_table`` on the ids' device: no Python loop over tokens and no host sync.
        Out-of-range ids raise on CPU; on an accelerator they are not checked (it would need a sync).
        """
        _check_modality_ids(modality_ids, "AdaptiveExpertAllocation.token_k")
        table = self.k_table(modality_ids.device)
        return table.index_select(0, modality_ids.reshape(-1).long()).reshape(modality_ids.shape)

    # -- the rule ---------------------------------------------------------------------------

    def step(self, val_losses: Mapping[str, float]) -> dict[str, int]:
        """Apply AEA to one epoch's per-modality validation losses; returns the new ``k``.

        ``val_losses``: ``{modality: L_m}`` (e.g. from ``modality_validation_loss``); a subset of
        the modalities is allowed (the others are left unchanged).
        """
        if not isinstance(val_losses, Mapping):
            raise TypeError(
                f"AdaptiveExpertAllocation.step: val_losses must be a mapping, got {type(val_losses).__name__}"
            )
        unknown = sorted(set(val_losses) - set(self.modalities), key=str)
        if unknown:
            raise ValueError(
                f"AdaptiveExpertAllocation.step: unknown modalities {unknown} (known: {list(self.modalities)})"
            )
        losses = {}
        for m in self.modalities:
            if m in val_losses:
                value = _to_float(val_losses[m], f"AdaptiveExpertAllocation.step: loss of {m!r}")
                if math.isnan(value):
                    raise ValueError(f"AdaptiveExpertAllocation.step: the loss of {m!r} is NaN")
                losses[m] = value

        if self.enabled:
            for m, loss in losses.items():
                if not self._active[m]:
                    continue
                k = self._k[m]
                if loss < self._best[m]:
                    self._best[m] = loss
                    self._improved[m] = True
                elif self._improved[m]:
                    new_k = min(max(k + 1, 1), self.k_max)
                    self._grew[m] = new_k > k
                    self._k[m] = new_k
                    self._improved[m] = False
                else:
                    self._active[m] = False
                    if self.literal_clamp or self._grew[m]:
                        self._k[m] = min(max(k - 1, 1), self.k_max)
            self._tables.clear()

        self.history.append(
            {
                "epoch": len(self.history) + 1,
                "val_loss": {m: _encode_float(v) for m, v in losses.items()},
                "k": dict(self._k),
                "best": {m: _encode_float(v) for m, v in self._best.items()},
                "improved": dict(self._improved),
                "active": dict(self._active),
            }
        )
        return dict(self._k)

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain, JSON-serialisable state (``best`` +inf is stored as the string "inf")."""
        return {
            "version": _STATE_VERSION,
            "modalities": list(self.modalities),
            "k_max": self.k_max,
            "enabled": self.enabled,
            "literal_clamp": self.literal_clamp,
            "k": dict(self._k),
            "best": {m: _encode_float(v) for m, v in self._best.items()},
            "improved": dict(self._improved),
            "active": dict(self._active),
            "grew": dict(self._grew),
            "history": [_json_copy(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict()`` output (also after a JSON round trip). The configuration
        (modalities, k_max, enabled, literal_clamp) must match this instance's."""
        _check_config(
            state,
            "AdaptiveExpertAllocation",
            modalities=self.modalities,
            k_max=self.k_max,
            enabled=self.enabled,
            literal_clamp=self.literal_clamp,
        )
        k = {m: int(state["k"][m]) for m in self.modalities}
        bad = {m: v for m, v in k.items() if not 1 <= v <= self.k_max}
        if bad:
            raise ValueError(f"AdaptiveExpertAllocation.load_state_dict: k outside [1, {self.k_max}]: {bad}")
        self._k = k
        self._best = {m: _decode_float(state["best"][m]) for m in self.modalities}
        self._improved = {m: bool(state["improved"][m]) for m in self.modalities}
        self._active = {m: bool(state["active"][m]) for m in self.modalities}
        self._grew = {m: bool(state.get("grew", {}).get(m, False)) for m in self.modalities}
        self.history = [_json_copy(h) for h in state.get("history", [])]
        self._tables.clear()

    def __repr__(self) -> str:
        return (
            f"AdaptiveExpertAllocation(k={self._k}, active={self._active}, k_max={self.k_max}, enabled={self.enabled})"
        )


def _json_copy(value):
    """Deep copy of nested dict/list/scalars (history entries)."""
    if isinstance(value, Mapping):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# ALP
# --------------------------------------------------------------------------------------------


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
            "version": _STATE_VERSION,
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


# --------------------------------------------------------------------------------------------
# gradient scale
# --------------------------------------------------------------------------------------------


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a per-token weight (no grad for it)."""

    @staticmethod
    def forward(x, weight):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        # multiply in at least fp32, round once to the gradient's dtype (bf16/fp16 stay exact-ish)
        compute = torch.promote_types(grad.dtype, torch.float32)
        scaled = grad.to(compute) * weight.to(compute).unsqueeze(-1)
        return scaled.to(grad.dtype), None


def scale_gradient(x: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass; in the backward pass ``grad_x = grad * token_weight[..., None]``.

    x: ``(..., T, C)`` (or ``(T, C)``), any floating dtype. token_weight: floating tensor
    broadcastable to ``x.shape[:-1]`` (one weight per token, or a scalar); it gets no gradient.
    Returns ``x`` itself when autograd would not track the result (no grad mode, or ``x`` does not
    require grad). Works under ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("scale_gradient: x must be a floating-point tensor of shape (..., T, C)")
    if not isinstance(token_weight, torch.Tensor):
        token_weight = torch.as_tensor(token_weight, dtype=torch.float32, device=x.device)
    if not token_weight.is_floating_point():
        raise TypeError(f"scale_gradient: token_weight must be a floating-point tensor, got {token_weight.dtype}")
    token_dims = x.shape[:-1]
    try:
        ok = torch.broadcast_shapes(token_weight.shape, token_dims) == token_dims
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"scale_gradient: token_weight of shape {tuple(token_weight.shape)} does not broadcast to "
            f"x's token dims {tuple(token_dims)}"
        )
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _ScaleGradient.apply(x, token_weight.detach())


def modality_gradient_scale(x: torch.Tensor, modality_ids: torch.Tensor, weights_tensor: torch.Tensor) -> torch.Tensor:
    """``scale_gradient`` with each token's weight looked up from its modality.

    x: ``(..., T, C)``; modality_ids: int tensor broadcastable to ``x.shape[:-1]`` (values in
    ``[0, M)``); weights_tensor: ``(M,)`` per-modality weights (e.g. ``alp.weight_tensor(device)``),
    moved to ``x``'s device if needed. No host sync.
    """
    _check_modality_ids(modality_ids, "modality_gradient_scale")
    if not isinstance(weights_tensor, torch.Tensor) or weights_tensor.dim() != 1:
        raise ValueError("modality_gradient_scale: weights_tensor must be a (M,) tensor")
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
        return x
    table = weights_tensor.detach().to(device=x.device)
    ids = modality_ids.to(device=x.device)
    token_weight = table.index_select(0, ids.reshape(-1).long()).reshape(ids.shape)
    return scale_gradient(x, token_weight)
