"""Audio encoding for result files, and decoding of reference audio."""
from __future__ import annotations

import io
import math

import numpy as np
import soundfile as sf

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Mono float samples in [-1, 1] as a 16-bit wav or flac file, or an mp3 (libsndfile >= 1.1)."""
    if fmt not in FORMATS:
        raise ValueError(f"audio format must be one of {sorted(FORMATS)}, got {fmt!r}")
    container, subtype = FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def silence(seconds: float, sample_rate: int) -> np.ndarray:
    return np.zeros(int(round(seconds * sample_rate)), dtype=np.float32)


class AudioDecodeError(ValueError):
    """Bytes that are not audio soundfile can read: "<where>: <reason>"."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def decode_audio(data: bytes, where: str, *, mono: bool = True,
                 max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """(float32 samples, sample rate) of an audio file's bytes: [samples] if `mono` (the mean of the
    channels, as librosa.load does), else [samples, channels].

    Any format the installed libsndfile reads: wav, flac, ogg (vorbis, opus), mp3 (libsndfile
    >= 1.1), aiff... Integer PCM is scaled to [-1, 1). `max_seconds` stops reading after that much
    audio (long files cost decoding time and memory). AudioDecodeError, naming `where`, if
    the bytes cannot be decoded or hold no samples.
    """
    if not data:
        raise AudioDecodeError(where, "the file is empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = int(f.samplerate)
            frames = -1 if max_seconds is None else math.ceil(max_seconds * rate)
            samples = f.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as e:
        reason = getattr(e, "error_string", None) or str(e)  # libsndfile's words, not the BytesIO repr
        raise AudioDecodeError(where, f"cannot decode audio ({reason}); wav, flac, ogg, mp3 and the other "
                                      "formats libsndfile reads are supported") from None
    if samples.shape[0] == 0:
        raise AudioDecodeError(where, "the file holds no audio samples")
    return (samples.mean(axis=1) if mono else samples), rate
