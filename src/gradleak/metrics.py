"""How close a reconstruction is to the truth: pure functions of tensors.

MSE is computed on the raw reconstruction, as the iDLG paper does (a blown-up
attack shows as a huge MSE rather than being hidden by clamping).  PSNR and
SSIM describe the picture a person sees, so they use the reconstruction
clamped to the valid pixel range [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from pytorch_msssim import ssim as _ssim
from scipy.optimize import linear_sum_assignment

FIDELITY_THRESHOLDS: tuple[float, ...] = (1e-2, 5e-3, 1e-3, 5e-4, 1e-4)


def mse(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    """Mean squared pixel error; NaN/inf when the attack diverged."""
    diff = reconstruction.detach().double().cpu() - original.detach().double().cpu()
    return float((diff**2).mean())


def psnr(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1] (inf when exact)."""
    clamped = _valid(reconstruction).clamp(0, 1)
    error = float(((clamped - original.detach().double().cpu()) ** 2).mean())
    return math.inf if error == 0 else 10.0 * math.log10(1.0 / error)


def ssim(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    """Structural similarity (Gaussian window 11, sigma 1.5) on pixels in [0, 1].

    Accepts ``(C, H, W)`` or ``(N, C, H, W)``; returns the mean over the batch.
    """
    rec = _valid(reconstruction).clamp(0, 1).float()
    ref = original.detach().float().cpu()
    if rec.dim() == 3:
        rec, ref = rec.unsqueeze(0), ref.unsqueeze(0)
    # The window must fit the image; shrink it (odd) for tiny inputs.
    window = min(11, min(ref.shape[-2:]) // 2 * 2 - 1)
    return float(_ssim(rec, ref, data_range=1.0, win_size=max(window, 3)))


def label_correct(predicted: int | Sequence[int], true: int | Sequence[int]) -> bool:
    """Whether the recovered label(s) equal the true ones, as multisets for batches."""
    if isinstance(predicted, int) and isinstance(true, int):
        return predicted == true
    p = [predicted] if isinstance(predicted, int) else list(predicted)
    t = [true] if isinstance(true, int) else list(true)
    return sorted(p) == sorted(t)


def match_reconstructions(
    reconstructions: torch.Tensor, originals: torch.Tensor
) -> tuple[list[int], list[float]]:
    """Pair each original with a reconstruction so that the total MSE is smallest.

    A mean gradient does not tell which example came first, so a batch's
    reconstructions come in any order; this finds the optimal assignment
    (Hungarian algorithm) on the matrix of pairwise MSEs.

    Args:
        reconstructions: ``(B, *shape)``, in the attack's order.
        originals: ``(B, *shape)``, in the batch's order.

    Returns:
        ``(permutation, per_pair_mse)``: original ``i`` is matched to
        reconstruction ``permutation[i]`` with MSE ``per_pair_mse[i]``.  A
        non-finite reconstruction costs infinity and is matched last.
    """
    if reconstructions.shape != originals.shape:
        raise ValueError(
            f"shapes differ: {tuple(reconstructions.shape)} vs {tuple(originals.shape)}"
        )
    rec = reconstructions.detach().double().cpu().flatten(1)
    ref = originals.detach().double().cpu().flatten(1)
    cost = ((ref[:, None, :] - rec[None, :, :]) ** 2).mean(dim=-1)  # (original, reconstruction)
    # Non-finite pairs cost more than any assignment of finite ones, so they go last.
    ok = torch.isfinite(cost)
    worst = float(cost[ok].max()) if bool(ok.any()) else 0.0
    priced = torch.where(ok, cost, torch.full_like(cost, (worst + 1.0) * (len(cost) + 1)))
    rows, cols = linear_sum_assignment(priced.numpy())
    permutation = [int(c) for _, c in sorted(zip(rows, cols, strict=True))]
    return permutation, [float(cost[i, j]) for i, j in enumerate(permutation)]


def fidelity(
    mses: Iterable[float], thresholds: Sequence[float] = FIDELITY_THRESHOLDS
) -> dict[float, float]:
    """Share of experiments whose MSE is below each threshold (iDLG's Figure 1).

    A non-finite MSE (a diverged attack) counts as a failure.
    """
    values = list(mses)
    if not values:
        return {t: math.nan for t in thresholds}
    return {
        t: sum(1 for v in values if math.isfinite(v) and v < t) / len(values) for t in thresholds
    }


def _valid(x: torch.Tensor) -> torch.Tensor:
    # A diverged reconstruction holds NaN/inf; as a picture that is noise, not an error.
    x = x.detach().double().cpu()
    return torch.nan_to_num(x, nan=0.5, posinf=1.0, neginf=0.0)


def psnr_affine_corrected(reconstruction: torch.Tensor, original: torch.Tensor) -> float:
    """PSNR after the best per-channel scale and shift of the reconstruction (fitted to the truth).

    Not PSNR: it uses the truth to undo what train-mode BatchNorm hides (each
    input channel's scale and shift), so it says how good the shapes are,
    never how good the picture an attacker holds is.  ``(C, H, W)`` or
    ``(N, C, H, W)``: fitted per image and channel by least squares, then
    clamped to [0, 1].
    """
    rec = _valid(reconstruction).clamp(0, 1)
    ref = original.detach().double().cpu()
    flat_rec = rec.reshape(-1, rec.shape[-2] * rec.shape[-1])
    flat_ref = ref.reshape(flat_rec.shape)
    mean_rec = flat_rec.mean(1, keepdim=True)
    mean_ref = flat_ref.mean(1, keepdim=True)
    centred = flat_rec - mean_rec
    var = (centred**2).sum(1, keepdim=True)
    scale = torch.where(var > 0, (centred * (flat_ref - mean_ref)).sum(1, keepdim=True) / var, 0.0)
    fitted = (mean_ref + scale * centred).clamp(0, 1)
    error = float(((fitted - flat_ref) ** 2).mean())
    return math.inf if error == 0 else 10.0 * math.log10(1.0 / error)
