"""AEA, adaptive expert allocation (SM4_SPEC §3): each modality's number of experts per token
``k_m``, grown or frozen after every epoch from that modality's validation loss
(``modality_validation_loss``). ``token_k(modality_ids)`` turns it into the per-token ``k`` every
sparse module accepts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ._state import _check_modalities, _to_float, _encode_float, _decode_float, _check_modality_ids, _check_config, _json_copy, STATE_VERSION


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
            "version": STATE_VERSION,
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
