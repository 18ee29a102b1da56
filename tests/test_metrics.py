"""Metrics are pure functions with known values."""

from __future__ import annotations

import math

import torch

from gradleak import metrics


def test_mse_psnr_ssim_known_values() -> None:
    original = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert metrics.mse(original, original) == 0
    assert metrics.psnr(original, original) == math.inf
    assert abs(metrics.ssim(original, original) - 1) < 1e-6
    shifted = original + 0.1
    assert abs(metrics.mse(shifted, original) - 0.01) < 1e-7  # float32 rounding of +0.1
    # PSNR clamps to [0, 1] first: that lowers the error, so PSNR >= 20 dB.
    assert metrics.psnr(shifted, original) >= 20.0
    noisy = (original + 0.3 * torch.randn(3, 32, 32)).clamp(0, 1)
    assert metrics.ssim(noisy, original) < 0.8


def test_diverged_reconstruction() -> None:
    original = torch.rand(1, 28, 28)
    blown = torch.full((1, 28, 28), float("nan"))
    assert math.isnan(metrics.mse(blown, original))
    assert math.isfinite(metrics.psnr(blown, original))  # drawn as grey
    assert metrics.fidelity([1e-4, float("nan"), 2e-2, 6e-3]) == {
        1e-2: 0.5,
        5e-3: 0.25,
        1e-3: 0.25,
        5e-4: 0.25,
        1e-4: 0.0,
    }


def test_label_correct_is_a_multiset_comparison() -> None:
    assert metrics.label_correct(3, 3) and not metrics.label_correct(3, 4)
    assert metrics.label_correct([1, 2, 2], [2, 1, 2])
    assert not metrics.label_correct([1, 2, 2], [1, 1, 2])
