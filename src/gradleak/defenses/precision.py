"""Lower precision: the client sends its gradient in fewer bits.

Each transform is the round trip a receiver sees: the gradient is cast (or
quantised) to the narrow format on the client and read back into the
original floating-point type on the other side.  The attacker gets exactly
what the server would decode.
"""

from __future__ import annotations

import torch

from gradleak.defenses.base import Gradients


class CastRoundTrip:
    """Cast every tensor to `dtype` and back (fp16, bf16).

    fp16 overflows to infinity above 65504 and flushes below about 6e-8;
    bf16 keeps float32's range with 8 bits of mantissa.
    """

    def __init__(self, dtype: torch.dtype, name: str) -> None:
        self.dtype = dtype
        self.name = name

    def __call__(self, gradients: Gradients) -> Gradients:
        return tuple(g.to(self.dtype).to(g.dtype) for g in gradients)

    def __repr__(self) -> str:
        return f"{self.name}()"


class Int8RoundTrip:
    """Symmetric per-tensor int8 quantisation, as a receiver would decode it.

    The client sends ``q = round(g / s)`` in [-127, 127] with one float scale
    ``s = max|g| / 127`` per tensor; the receiver reads ``q * s``.  So each
    entry moves by at most ``s / 2``, and an all-zero tensor stays zero.
    """

    def __call__(self, gradients: Gradients) -> Gradients:
        return tuple(self._one(g) for g in gradients)

    @staticmethod
    def _one(g: torch.Tensor) -> torch.Tensor:
        peak = g.abs().max()
        if float(peak) == 0.0:
            return g.clone()
        scale = peak / 127.0
        q = torch.round(g / scale).clamp(-127, 127).to(torch.int8)
        return q.to(g.dtype) * scale

    def __repr__(self) -> str:
        return "int8()"


def fp16() -> CastRoundTrip:
    """IEEE half precision (the DLG paper's lower-precision defense)."""
    return CastRoundTrip(torch.float16, "fp16")


def bf16() -> CastRoundTrip:
    """bfloat16: float32's exponent with an 8-bit mantissa."""
    return CastRoundTrip(torch.bfloat16, "bf16")


def int8() -> Int8RoundTrip:
    """Symmetric per-tensor int8 quantisation (see `Int8RoundTrip`)."""
    return Int8RoundTrip()
