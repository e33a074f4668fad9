"""Leading and trailing silence removal."""
from __future__ import annotations

import numpy as np


def trim_silence(x: np.ndarray, top_db: float = 20.0, frame_length: int = 2048,
                 hop_length: int = 512) -> tuple[np.ndarray, tuple[int, int]]:
    """(x[start:end], (start, end)): x [samples] without leading/trailing frames quieter than the loudest by top_db.

    As librosa.effects.trim with its defaults: the RMS of frames of `frame_length`
    samples every `hop_length`, centred (zero-padded by frame_length // 2 at both
    ends); a frame is sound when its RMS is within `top_db` dB of the loudest
    frame's; the span runs from the first sound frame's start to one hop past the
    last sound frame's start (capped at the signal's end). All silence: (empty, (0, 0)).
    """
    x = np.asarray(x, dtype=np.float32)
    pad = frame_length // 2
    padded = np.pad(x, (pad, pad))
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::hop_length]
    power = np.mean(np.abs(frames) ** 2, axis=-1)
    # librosa compares 10*log10(max(power, 1e-10)) with the same for the loudest frame
    db = 10.0 * np.log10(np.maximum(power, 1e-10))
    loud = np.flatnonzero(db - 10.0 * np.log10(max(float(power.max(initial=0.0)), 1e-10)) > -top_db)
    if loud.size == 0:
        return x[:0], (0, 0)
    start, end = int(loud[0]) * hop_length, min(len(x), (int(loud[-1]) + 1) * hop_length)
    return x[start:end], (start, end)
