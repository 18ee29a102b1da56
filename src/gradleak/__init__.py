"""gradleak: what the gradient you share in federated learning gives away."""

from gradleak.attacks import DLG, IDLG, AttackConfig, build_attack, idlg_label
from gradleak.models import build_model
from gradleak.threat import observe, observe_update
from gradleak.types import ClientOptimizer, Observation, Reconstruction, UpdateObservation

__version__ = "0.1.0"

__all__ = [
    "DLG",
    "IDLG",
    "AttackConfig",
    "Observation",
    "Reconstruction",
    "UpdateObservation",
    "ClientOptimizer",
    "build_attack",
    "build_model",
    "idlg_label",
    "observe",
    "observe_update",
]
