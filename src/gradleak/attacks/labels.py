"""Label inference from the shared gradient, as pure functions.

iDLG's observation: for one example with cross-entropy over a one-hot label,
the gradient of the last Linear layer's weight row i is
``(softmax_i - y_i) * h``, where ``h`` are the layer's input features.  When
those features are non-negative (post-Sigmoid, post-ReLU) every row has the
sign of ``softmax_i - y_i``, which is negative only for the true class.  So the
label is the row whose sum is the most negative.
"""

from __future__ import annotations

import torch
from torch import nn

from gradleak.errors import AttackNotApplicable
from gradleak.types import Observation


def last_linear_weight(model: nn.Module) -> str:
    """Name of the weight of the model's last Linear layer.

    Raises:
        AttackNotApplicable: The model has no Linear layer.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise AttackNotApplicable(
            "the iDLG label rule needs a final Linear layer and this model has none; "
            "use --method dlg, which learns the label"
        )
    return f"{names[-1]}.weight" if names[-1] else "weight"


def idlg_label_from_weight_gradient(weight_gradient: torch.Tensor) -> int:
    """iDLG's rule on the gradient of the last layer's weight, ``(classes, features)``."""
    return int(weight_gradient.sum(dim=1).argmin())


def idlg_label(observation: Observation) -> int:
    """The true label of a single-example observation, by iDLG's rule.

    Raises:
        AttackNotApplicable: No final Linear layer, or more than one example.
    """
    if observation.batch_size != 1:
        raise AttackNotApplicable(
            f"the iDLG label rule reads the label of one example, but this gradient "
            f"averages {observation.batch_size}; use --batch-size 1 or --method dlg"
        )
    weight = observation.gradient(last_linear_weight(observation.model))
    if weight.shape[0] != observation.num_classes:
        raise AttackNotApplicable(
            f"the last Linear layer has {weight.shape[0]} outputs, not the "
            f"{observation.num_classes} classes; the iDLG label rule does not apply"
        )
    return idlg_label_from_weight_gradient(weight)
