"""Sample-rate conversion."""
from __future__ import annotations

import numpy as np
import soxr


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample float32 audio [samples] or [channels, samples] from sr_in to sr_out Hz.

    soxr "HQ" is librosa's default (res_type="soxr_hq"), so features computed on
    the result match reference code that loads audio through librosa.
    """
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x
    # soxr takes [samples, channels].
    return np.ascontiguousarray(soxr.resample(x.T, sr_in, sr_out, quality="HQ").T)
