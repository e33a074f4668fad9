"""Audio encoding for result files."""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16")}


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Mono float samples in [-1, 1] as a 16-bit wav or flac file."""
    if fmt not in FORMATS:
        raise ValueError(f"audio format must be one of {sorted(FORMATS)}, got {fmt!r}")
    container, subtype = FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def silence(seconds: float, sample_rate: int) -> np.ndarray:
    return np.zeros(int(round(seconds * sample_rate)), dtype=np.float32)
