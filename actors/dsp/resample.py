"""Sample-rate conversion: soxr (what librosa uses) and torchaudio's windowed-sinc resampler."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import soxr


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample float32 audio [samples] or [channels, samples] from sr_in to sr_out Hz.

    As librosa.resample with its defaults: soxr "HQ" (res_type="soxr_hq"), and the
    result cut or zero-padded to ceil(samples * (sr_out / sr_in)) (soxr itself rounds),
    so features computed on the result match reference code that loads audio through librosa.
    """
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x
    # soxr takes [samples, channels].
    y = np.ascontiguousarray(soxr.resample(x.T, sr_in, sr_out, quality="HQ").T)
    # librosa's own arithmetic (ratio first): ceil(176400 * (24000 / 44100)) is 96001, not 96000
    n = math.ceil(x.shape[-1] * (float(sr_out) / sr_in))
    if y.shape[-1] >= n:
        return y[..., :n]
    return np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n - y.shape[-1])])


@lru_cache(maxsize=8)
def _sinc_kernel(up: int, down: int, zero_crossings: int, rolloff: float) -> tuple[np.ndarray, int]:
    """Polyphase filters [up, 2*half + down] (float32) and the half-width `half` in input samples.

    Output phase j (time j/up of an output period) is the Hann-windowed ideal
    low-pass (cutoff rolloff * min(up, down) / 2 per reduced period) evaluated at
    the input taps around it; computed in float64, rounded once, as torchaudio does.
    """
    cutoff = min(up, down) * rolloff
    half = math.ceil(zero_crossings * down / cutoff)
    taps = np.arange(-half, half + down, dtype=np.float64) / down
    phases = -np.arange(up, dtype=np.float64)[:, None] / up
    t = np.clip((taps[None, :] + phases) * cutoff, -zero_crossings, zero_crossings)
    window = np.cos(t * np.pi / (2 * zero_crossings)) ** 2
    arg = t * np.pi
    safe = np.where(arg == 0, 1.0, arg)
    sinc = np.where(arg == 0, 1.0, np.sin(safe) / safe)
    return (sinc * window * (cutoff / down)).astype(np.float32), half


def resample_sinc(x: np.ndarray, sr_in: int, sr_out: int, zero_crossings: int = 6,
                  rolloff: float = 0.99) -> np.ndarray:
    """Resample float32 audio [..., samples] as torchaudio.functional.resample does by default.

    Band-limited interpolation with a Hann-windowed sinc over `zero_crossings`
    zero crossings each side, cutoff `rolloff` × the lower Nyquist rate; the input
    is zero-padded at both ends; the output has ceil(samples * sr_out / sr_in) samples.
    The official Chatterbox S3Gen resamples its 10 s prompt to 16 kHz this way
    (torchaudio.transforms.Resample), unlike the rest of its conditioning (soxr).
    """
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x
    g = math.gcd(int(sr_in), int(sr_out))
    down, up = int(sr_in) // g, int(sr_out) // g
    kernel, half = _sinc_kernel(up, down, zero_crossings, rolloff)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    padded = np.pad(flat, [(0, 0), (half, half + down)])
    # Output block k (up samples) reads the kernel-length window starting at input sample k*down.
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1], axis=-1)[:, ::down]
    y = (windows @ kernel.T).reshape(flat.shape[0], -1)
    n = math.ceil(up * x.shape[-1] / down)
    return np.ascontiguousarray(y[:, :n]).reshape(lead + (n,))
