"""Training-loop helpers for SM4 (SM4_SPEC §3)."""

from .adaptive import (
    AdaptiveExpertAllocation,
    AdaptiveLearningPace,
    EntropyMeter,
    modality_gradient_scale,
    modality_validation_loss,
    scale_gradient,
)

from .trainer import Trainer

__all__ = [
    "Trainer",
    "AdaptiveExpertAllocation",
    "AdaptiveLearningPace",
    "EntropyMeter",
    "modality_gradient_scale",
    "modality_validation_loss",
    "scale_gradient",
]
