"""gradleak: what the gradient you share in federated learning gives away."""

from gradleak.attacks import DLG, IDLG, AttackConfig, build_attack, idlg_label
from gradleak.models import build_model
from gradleak.threat import observe
from gradleak.types import Observation, Reconstruction

__version__ = "0.1.0"

__all__ = [
    "DLG",
    "IDLG",
    "AttackConfig",
    "Observation",
    "Reconstruction",
    "build_attack",
    "build_model",
    "idlg_label",
    "observe",
]
