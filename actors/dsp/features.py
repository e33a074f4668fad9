"""The front ends of Chatterbox's reference encoders, as the official code computes them.

Sizes are the graph contract's (docs/architecture.md section 6, `RATES`); every
function takes float32 samples [samples] at the rate it names and returns float32.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from actors.dsp.fbank import kaldi_fbank
from actors.dsp.mel import slaney_mel_filterbank
from actors.dsp.stft import stft
from actors.dsp.windows import hann

VE_SAMPLE_RATE, VE_N_FFT, VE_HOP, VE_MELS, VE_FMAX = 16000, 400, 160, 40, 8000.0
VE_PARTIAL_FRAMES, VE_PARTIALS_PER_SECOND, VE_MIN_COVERAGE = 160, 1.3, 0.8
S3_N_FFT, S3_HOP, S3_MELS = 400, 160, 128
S3GEN_SAMPLE_RATE, S3GEN_N_FFT, S3GEN_HOP, S3GEN_MELS, S3GEN_FMAX = 24000, 1920, 480, 80, 8000.0
FBANK_BINS = 80


@lru_cache(maxsize=None)
def _filters(sr: int, n_fft: int, n_mels: int, fmax: float | None = None) -> np.ndarray:
    return slaney_mel_filterbank(sr, n_fft, n_mels, 0.0, fmax)


def ve_mel(wav16: np.ndarray) -> np.ndarray:
    """VoiceEncoder mels [frames, 40]: power (|STFT|^2) through Slaney mel filters, no log.

    As the official melspectrogram (librosa.stft: n_fft 400, hop 160, Hann,
    centred with reflect padding; mel filters to 8 kHz): frames = 1 + samples // 160.
    """
    spec = stft(wav16, VE_N_FFT, VE_HOP, hann(VE_N_FFT), center=True)
    power = spec.real ** 2 + spec.imag ** 2
    return np.ascontiguousarray((_filters(VE_SAMPLE_RATE, VE_N_FFT, VE_MELS, VE_FMAX) @ power).T)


def ve_partials(mel: np.ndarray, partial_frames: int = VE_PARTIAL_FRAMES,
                rate: float = VE_PARTIALS_PER_SECOND, min_coverage: float = VE_MIN_COVERAGE) -> np.ndarray:
    """Overlapping partial utterances [n, partial_frames, bins] of mel [frames, bins], as the official VE cuts them.

    Partials start every round(frames per second / rate) frames (77 at 100 frames/s
    and 1.3 partials/s). The last one is kept only if at least `min_coverage` of it
    would hold frames of the utterance (there is always at least one); the mel is
    zero-padded or cut to exactly cover the partials kept.
    """
    step = int(round(VE_SAMPLE_RATE / VE_HOP / rate))
    n_frames = len(mel)
    n, leftover = divmod(max(n_frames - partial_frames + step, 0), step)
    # frames of the utterance the next partial would hold, as a share of a partial
    if n == 0 or (leftover + partial_frames - step) / partial_frames >= min_coverage:
        n += 1
    target = partial_frames + step * (n - 1)
    mel = np.asarray(mel, dtype=np.float32)[:target]
    if n_frames < target:
        mel = np.concatenate([mel, np.zeros((target - n_frames, mel.shape[1]), np.float32)])
    return np.stack([mel[i * step:i * step + partial_frames] for i in range(n)])


def s3tokenizer_log_mel(wav16: np.ndarray, max_frames: int | None = None) -> np.ndarray:
    """S3 tokenizer input [128, frames]: Whisper-style log-mel of 16 kHz audio.

    Power of a centred (reflect) STFT, n_fft 400, hop 160, Hann; the last frame
    dropped (frames = samples // 160); Slaney mel filters to 8 kHz (the export's
    `_mel_filters` buffer); log10 clamped at 1e-10, floored at its maximum − 8,
    then (x + 4) / 4. `max_frames` cuts the result (the official `max_len * 4`);
    the floor is taken over the frames before the cut, as the official code does.
    """
    spec = stft(wav16, S3_N_FFT, S3_HOP, hann(S3_N_FFT), center=True)[:, :-1]
    power = spec.real ** 2 + spec.imag ** 2
    log = np.log10(np.maximum(_filters(VE_SAMPLE_RATE, S3_N_FFT, S3_MELS) @ power, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    out = ((log + 4.0) / 4.0).astype(np.float32)
    return out if max_frames is None else out[:, :max_frames]


def s3gen_mel(wav24: np.ndarray) -> np.ndarray:
    """S3Gen prompt mel [frames, 80] of 24 kHz audio (frames = samples // 480).

    As the official mel_spectrogram: reflect padding of (n_fft − hop) / 2 at both
    ends, uncentred STFT (n_fft = window = 1920, hop 480, Hann), magnitude
    sqrt(power + 1e-9), Slaney mel filters 0–8 kHz, natural log clamped at 1e-5.
    """
    pad = (S3GEN_N_FFT - S3GEN_HOP) // 2
    x = np.asarray(wav24, dtype=np.float32)
    if len(x) <= pad:
        raise ValueError(f"the S3Gen mel needs more than {pad} samples, got {len(x)}")
    spec = stft(np.pad(x, (pad, pad), mode="reflect"), S3GEN_N_FFT, S3GEN_HOP, hann(S3GEN_N_FFT), center=False)
    magnitude = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = _filters(S3GEN_SAMPLE_RATE, S3GEN_N_FFT, S3GEN_MELS, S3GEN_FMAX) @ magnitude
    return np.ascontiguousarray(np.log(np.maximum(mel, 1e-5)).T.astype(np.float32))


def campplus_fbank(wav16: np.ndarray) -> np.ndarray:
    """CAMPPlus input [frames, 80]: Kaldi fbank of 16 kHz audio minus its mean over the utterance."""
    fbank = kaldi_fbank(wav16, VE_SAMPLE_RATE, FBANK_BINS)
    return fbank - fbank.mean(axis=0, keepdims=True)
