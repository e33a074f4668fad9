"""Torch references for the numpy front ends of actors.dsp (tests only; torchaudio is not installed).

Each function follows the algorithm the official Chatterbox code relies on, written
with torch primitives (torch.stft, torch.hann_window, conv1d, torch.fft), so the
numpy runtime is checked against an independent computation:

- `kaldi_fbank_ref`: torchaudio.compliance.kaldi.fbank's algorithm (Kaldi's
  compute-fbank-feats) with its defaults except the bin count;
- `resample_sinc_ref`: torchaudio's windowed-sinc resampler as a strided conv1d;
- `s3gen_mel_ref`: the Matcha/CosyVoice mel_spectrogram S3Gen uses;
- `s3tokenizer_log_mel_ref`: S3Tokenizer.log_mel_spectrogram, with the module's own
  computed buffers (`_mel_filters`, `window`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actors.dsp import slaney_mel_filterbank

FLT_EPSILON = float(torch.finfo(torch.float32).eps)


def _kaldi_mel(f: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(f / 700.0)


def kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: float, low_hz: float = 20.0,
                    high_hz: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular filters [num_bins, n_fft // 2 + 1], evenly spaced on the 1127·ln(1 + f/700) scale.

    Filter b rises from mel point b to b + 1 and falls to b + 2 (num_bins + 2 points from
    low_hz to high_hz, high_hz <= 0 meaning Nyquist + high_hz); the Nyquist bin gets no weight.
    """
    nyquist = sample_rate / 2
    high = nyquist + high_hz if high_hz <= 0 else high_hz
    points = torch.linspace(float(_kaldi_mel(torch.tensor(low_hz, dtype=torch.float64))),
                            float(_kaldi_mel(torch.tensor(high, dtype=torch.float64))), num_bins + 2,
                            dtype=torch.float64)
    bins = _kaldi_mel(torch.arange(n_fft // 2, dtype=torch.float64) * sample_rate / n_fft)
    left, centre, right = points[:-2, None], points[1:-1, None], points[2:, None]
    up = (bins[None, :] - left) / (centre - left)
    down = (right - bins[None, :]) / (right - centre)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(weights, (0, 1)).float()


def kaldi_fbank_ref(wav: torch.Tensor, sample_rate: int = 16000, num_bins: int = 80) -> torch.Tensor:
    """Log mel energies [frames, num_bins] of wav [samples], Kaldi style (see actors.dsp.kaldi_fbank)."""
    frame, shift = int(sample_rate * 0.025), int(sample_rate * 0.010)
    n_fft = 1 << (frame - 1).bit_length()
    if wav.numel() < frame:
        return torch.zeros(0, num_bins)
    frames = wav.float().unfold(0, frame, shift)                # snip_edges: whole frames only
    frames = frames - frames.mean(dim=1, keepdim=True)          # remove DC
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * previous                           # pre-emphasis, first sample against itself
    k = torch.arange(frame, dtype=torch.float64)
    povey = (0.5 - 0.5 * torch.cos(2 * math.pi * k / (frame - 1))) ** 0.85
    frames = F.pad(frames * povey.float(), (0, n_fft - frame))
    power = torch.fft.rfft(frames).abs() ** 2
    energies = power @ kaldi_mel_banks(num_bins, n_fft, sample_rate).T
    return torch.clamp(energies, min=FLT_EPSILON).log()


def resample_sinc_ref(wav: torch.Tensor, sr_in: int, sr_out: int, zero_crossings: int = 6,
                      rolloff: float = 0.99) -> torch.Tensor:
    """wav [samples] resampled with a Hann-windowed sinc (torchaudio's default method), as a strided conv1d."""
    g = math.gcd(sr_in, sr_out)
    down, up = sr_in // g, sr_out // g
    cutoff = min(up, down) * rolloff
    half = math.ceil(zero_crossings * down / cutoff)
    # t[j, m]: distance (in cutoff periods) from output phase j to input tap m of its window
    taps = torch.arange(-half, half + down, dtype=torch.float64) / down
    t = ((taps[None, :] - torch.arange(up, dtype=torch.float64)[:, None] / up) * cutoff)
    t = t.clamp(-zero_crossings, zero_crossings)
    kernel = torch.sinc(t) * torch.cos(t * math.pi / (2 * zero_crossings)) ** 2 * (cutoff / down)
    x = F.pad(wav.float()[None, None], (half, half + down))
    y = F.conv1d(x, kernel.float()[:, None, :], stride=down)    # [1, up, blocks]
    return y[0].T.reshape(-1)[:math.ceil(up * wav.numel() / down)]


def s3gen_mel_ref(wav24: torch.Tensor) -> torch.Tensor:
    """S3Gen prompt mel [frames, 80] of 24 kHz wav [samples]."""
    n_fft, hop = 1920, 480
    pad = (n_fft - hop) // 2
    x = F.pad(wav24.float()[None, None], (pad, pad), mode="reflect")[0]
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=n_fft, window=torch.hann_window(n_fft),
                      center=False, return_complex=True)
    magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    filters = torch.from_numpy(slaney_mel_filterbank(24000, n_fft, 80, 0.0, 8000.0))
    return torch.log(torch.clamp(filters @ magnitude, min=1e-5))[0].T


def s3tokenizer_log_mel_ref(tokenizer: torch.nn.Module, wav16: torch.Tensor) -> torch.Tensor:
    """Tokenizer input [n_mels, frames] of 16 kHz wav [samples], from the module's `_mel_filters` and `window`."""
    spec = torch.stft(wav16.float(), 400, 160, window=tokenizer.window, return_complex=True)
    power = spec[..., :-1].abs() ** 2
    log = torch.clamp(tokenizer._mel_filters @ power, min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0
