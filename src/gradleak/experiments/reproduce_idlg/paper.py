"""The numbers the iDLG paper reports, kept in one place.

Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients" (2020),
https://arxiv.org/abs/2001.02610.  Table 1 gives label accuracy exactly.
Figure 1 gives fidelity only as a plot: the values below were read off it by
eye at the two ends of the threshold axis, and the points in between are
filled in linearly along that axis (its ticks are evenly spaced), so they are
approximate and labelled as such wherever they are shown.
"""

from __future__ import annotations

from gradleak.metrics import FIDELITY_THRESHOLDS

PAPER_TITLE = "iDLG: Improved Deep Leakage from Gradients (Zhao, Mopuri, Bilen; 2020)"
PAPER_URL = "https://arxiv.org/abs/2001.02610"
FIDELITY_SOURCE = "paper (read off Fig. 1, approx.)"

# Table 1: share of experiments whose recovered label is right.
LABEL_ACCURACY: dict[str, dict[str, float]] = {
    "mnist": {"dlg": 0.899, "idlg": 1.0},
    "cifar100": {"dlg": 0.833, "idlg": 1.0},
    "lfw": {"dlg": 0.791, "idlg": 1.0},
}

# Figure 1, read by eye: share of experiments below the loosest (1e-2) and the
# strictest (1e-4) MSE threshold.
_FIDELITY_ENDS: dict[str, dict[str, tuple[float, float]]] = {
    "mnist": {"dlg": (0.76, 0.76), "idlg": (0.89, 0.87)},
    "cifar100": {"dlg": (0.66, 0.57), "idlg": (0.83, 0.70)},
    "lfw": {"dlg": (0.52, 0.47), "idlg": (0.91, 0.83)},
}


def paper_fidelity(dataset: str, method: str) -> dict[float, float]:
    """Figure 1's approximate fidelity of `method` on `dataset`, per threshold.

    Returns:
        Share of experiments (0-1) with MSE below each of
        `gradleak.metrics.FIDELITY_THRESHOLDS`, loosest first.
    """
    first, last = _FIDELITY_ENDS[dataset][method]
    steps = len(FIDELITY_THRESHOLDS) - 1
    return {
        t: round(first + (last - first) * i / steps, 4) for i, t in enumerate(FIDELITY_THRESHOLDS)
    }
