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

The pieces live one per file: ``expert_allocation`` (AEA, ``modality_validation_loss``),
``entropy_meter`` (``EntropyMeter``), ``learning_pace`` (ALP), ``gradient_scale``; this module
gathers them under one name.
"""

from .entropy_meter import EntropyMeter
from .expert_allocation import AdaptiveExpertAllocation, modality_validation_loss
from .gradient_scale import modality_gradient_scale, scale_gradient
from .learning_pace import AdaptiveLearningPace

__all__ = [
    "AdaptiveExpertAllocation",
    "AdaptiveLearningPace",
    "EntropyMeter",
    "modality_gradient_scale",
    "modality_validation_loss",
    "scale_gradient",
]
