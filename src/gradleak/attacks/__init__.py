"""Gradient inversion attacks: they see an `Observation`, never the victim."""

from gradleak.attacks.dlg import (
    ATTACKS,
    DLG,
    IDLG,
    AttackConfig,
    GradientInversion,
    StepCallback,
    build_attack,
)
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.attacks.labels import idlg_label, idlg_label_from_weight_gradient, last_linear_weight
from gradleak.attacks.matching import matching_loss, soft_label_cross_entropy, squared_distance

__all__ = [
    "ATTACKS",
    "DLG",
    "IDLG",
    "AttackConfig",
    "GradientInversion",
    "IGConfig",
    "InvertingGradients",
    "StepCallback",
    "build_attack",
    "idlg_label",
    "idlg_label_from_weight_gradient",
    "last_linear_weight",
    "matching_loss",
    "soft_label_cross_entropy",
    "squared_distance",
]
