"""Analysis windows."""
from __future__ import annotations

import numpy as np


def hann(n: int) -> np.ndarray:
    """Periodic Hann window [n] float32, as scipy's get_window("hann", n) rounded to float32.

    Computed in float64 and rounded once, which is what the official HiFT uses;
    torch.hann_window(n) computes in float32 and differs by a few ulp (< 3e-7).
    """
    k = np.arange(n, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)).astype(np.float32)
