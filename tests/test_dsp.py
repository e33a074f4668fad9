"""actors.dsp against the torch functions it stands in for (torch.stft/istft, hann_window)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.dsp import dft_basis, hann, istft, resample, slaney_mel_filterbank, stft
from export.chatterbox import s3tokenizer

STFT_SIZES = [(16, 4), (400, 160), (1920, 480)]


def _signal(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("n", [16, 400, 1920])
def test_hann_is_periodic_hann(n):
    w = hann(n)
    assert w.dtype == np.float32 and w.shape == (n,)
    # Rounded once from float64 (scipy's get_window, the official HiFT window) ...
    k = np.arange(n)
    assert np.array_equal(w, (0.5 - 0.5 * np.cos(2 * np.pi * k / n)).astype(np.float32))
    # ... which torch.hann_window, computed in float32, matches to a few ulp, not bit for bit.
    np.testing.assert_allclose(w, torch.hann_window(n, periodic=True).numpy(), rtol=0, atol=3e-7)


def test_dft_basis_is_windowed_dft():
    n_fft = 16
    basis = dft_basis(n_fft)
    assert basis.shape == (2 * (n_fft // 2 + 1), 1, n_fft) and basis.dtype == np.float32
    frame = _signal((n_fft,))
    spec = np.fft.rfft(frame.astype(np.float64) * hann(n_fft))
    got = basis[:, 0, :].astype(np.float64) @ frame
    np.testing.assert_allclose(got, np.concatenate([spec.real, spec.imag]), atol=1e-5)


@pytest.mark.parametrize("n_fft,hop", STFT_SIZES)
def test_stft_matches_torch(n_fft, hop):
    x = _signal((2, 3, 8 * n_fft + 7))  # two batch dims, a length that is no multiple of hop
    got = stft(x, n_fft, hop)
    want = torch.stft(torch.from_numpy(x).reshape(6, -1), n_fft, hop, window=torch.hann_window(n_fft),
                      center=True, pad_mode="reflect", return_complex=True).reshape(2, 3, n_fft // 2 + 1, -1)
    assert got.dtype == np.complex64 and got.shape == tuple(want.shape)
    assert _rel_err(got, want.numpy()) < 1e-5


@pytest.mark.parametrize("n_fft,hop", STFT_SIZES)
def test_istft_inverts_stft_and_matches_torch(n_fft, hop):
    x = _signal((3, 8 * n_fft + 7), seed=1)
    spec = stft(x, n_fft, hop)
    y = istft(spec, n_fft, hop, length=x.shape[-1])
    assert y.dtype == np.float32 and y.shape == x.shape
    assert _rel_err(y, x) < 1e-5
    want = torch.istft(torch.from_numpy(spec), n_fft, hop, window=torch.hann_window(n_fft),
                       center=True, length=x.shape[-1]).numpy()
    assert _rel_err(y, want) < 1e-5
    # Without `length`, both keep hop*(frames-1) samples.
    want = torch.istft(torch.from_numpy(spec), n_fft, hop, window=torch.hann_window(n_fft), center=True).numpy()
    got = istft(spec, n_fft, hop)
    assert got.shape == want.shape and _rel_err(got, want) < 1e-5


@pytest.mark.filterwarnings("ignore:The length of signal is shorter")
def test_istft_length_past_the_frames():
    x = _signal((2, 103), seed=3)
    spec = stft(x, 16, 4)
    length = 103 + 20  # past the last frame: the tail is zero-padded
    want = torch.istft(torch.from_numpy(spec), 16, 4, window=torch.hann_window(16), length=length).numpy()
    got = istft(spec, 16, 4, length=length)
    assert got.shape == want.shape and _rel_err(got, want) < 1e-5
    # Where the window overlap-add nearly vanishes (large n_fft, last samples), both refuse.
    spec = stft(_signal((4000,)), 1920, 480)
    with pytest.raises(RuntimeError):
        torch.istft(torch.from_numpy(spec), 1920, 480, window=torch.hann_window(1920), length=4000 + 2000)
    with pytest.raises(ValueError, match="NOLA"):
        istft(spec, 1920, 480, length=4000 + 2000)


def test_stft_uncentred_matches_torch():
    x = _signal((1000,), seed=2)
    got = stft(x, 400, 160, center=False)
    want = torch.stft(torch.from_numpy(x), 400, 160, window=torch.hann_window(400), center=False,
                      return_complex=True).numpy()
    assert got.shape == want.shape and _rel_err(got, want) < 1e-5


def test_mel_filterbank_is_the_tokenizer_buffer():
    cfg = s3tokenizer.S3TokenizerConfig()
    want = s3tokenizer.computed_buffers(cfg)["_mel_filters"].numpy()
    got = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
    assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("n", [1000, 1001, 24000, 12345])
def test_resample_length(n):
    x = _signal((2, n))
    y = resample(x[0], 24000, 16000)
    assert y.dtype == np.float32 and abs(len(y) - round(n * 16000 / 24000)) <= 1
    stereo = resample(x, 24000, 16000)  # [channels, samples]: each channel as on its own
    assert stereo.shape == (2, len(y)) and np.array_equal(stereo[0], y)


def test_resample_keeps_frequency():
    sr_in, sr_out = 24000, 16000
    t = np.arange(sr_in) / sr_in  # 1 s, so FFT bins are 1 Hz apart
    y = resample(np.sin(2 * np.pi * 440.0 * t).astype(np.float32), sr_in, sr_out)
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * sr_out / len(y)
    assert abs(peak_hz - 440.0) <= 2.0


def test_resample_equal_rates_is_identity():
    x = _signal((2, 500))
    assert resample(x, 16000, 16000) is x


# --------------------------------------------------------------------------- Chatterbox reference front ends
# Parity of the numpy front ends with the code the official conditioning runs: librosa (VoiceEncoder
# mel, trim, resampling: bit-exact or float rounding) and torch references of torchaudio's Kaldi fbank and
# sinc resampler, S3Gen's mel_spectrogram and the S3 tokenizer's log-mel (export/chatterbox/features_ref.py).

import librosa  # noqa: E402

from actors.dsp import (campplus_fbank, kaldi_fbank, resample_sinc, s3gen_mel, s3tokenizer_log_mel,  # noqa: E402
                        trim_silence, ve_mel, ve_partials)
from export.chatterbox import features_ref  # noqa: E402


def speech_like(seconds: float, sr: int = 24000, seed: int = 0, lead: float = 0.3, tail: float = 0.4,
                peak: float = 0.5) -> np.ndarray:
    """A deterministic stand-in for speech: voiced syllables (gliding pitch, two formant bumps over the
    harmonics), noisy fricatives, short pauses; `lead` / `tail` seconds of a -80 dBFS noise floor around it."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0.0
    while total < seconds:
        kind = rng.choice(["voiced", "voiced", "fricative", "pause"])
        dur = float(rng.uniform(0.05, 0.15) if kind == "pause" else rng.uniform(0.12, 0.3))
        n = int(dur * sr)
        t = np.arange(n) / sr
        if kind == "voiced":
            f0 = rng.uniform(100, 220) * (1 + 0.15 * t / dur * rng.choice([-1, 1]))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            f1, f2 = rng.uniform(400, 900), rng.uniform(1100, 2500)
            seg = np.zeros(n)
            for k in range(1, int(7000 / f0.max())):
                gain = np.exp(-((k * f0 - f1) / 250) ** 2) + 0.5 * np.exp(-((k * f0 - f2) / 400) ** 2) + 0.02
                seg += gain * np.sin(k * phase)
            seg *= np.sin(np.pi * t / dur) ** 0.5
        elif kind == "fricative":
            seg = np.diff(rng.standard_normal(n + 1)) * 0.3 * np.sin(np.pi * t / dur)
        else:
            seg = np.zeros(n)
        parts.append(seg)
        total += dur
    body = np.concatenate(parts)[:int(seconds * sr)]
    body *= peak / np.abs(body).max()
    out = np.concatenate([np.zeros(int(lead * sr)), body, np.zeros(int(tail * sr))])
    return (out + 1e-4 * rng.standard_normal(len(out))).astype(np.float32)


def test_resample_is_librosa_resample():
    x = speech_like(3.0, sr=24000)
    for sr_in, sr_out, n in [(24000, 16000, len(x)), (24000, 16000, 12345), (44100, 24000, 176400),
                             (22050, 24000, 33075), (48000, 24000, 40001), (8000, 24000, 9999)]:
        src = resample(x, 24000, sr_in)[:n]
        want = librosa.resample(src, orig_sr=sr_in, target_sr=sr_out)  # soxr_hq, length fixed to ceil
        assert np.array_equal(resample(src, sr_in, sr_out), want), (sr_in, sr_out, n)


@pytest.mark.parametrize("sr_in,sr_out", [(24000, 16000), (44100, 24000), (16000, 24000), (22050, 16000)])
def test_resample_sinc_matches_torch_reference(sr_in, sr_out):
    x = resample(speech_like(2.0), 24000, sr_in)[:sr_in * 2 - 7]
    got = resample_sinc(x, sr_in, sr_out)
    want = features_ref.resample_sinc_ref(torch.from_numpy(x), sr_in, sr_out).numpy()
    assert got.dtype == np.float32 and got.shape == want.shape == (int(np.ceil(len(x) * sr_out / sr_in)),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # measured: 0 to 5e-8
    stereo = resample_sinc(np.stack([x, -x]), sr_in, sr_out)
    assert np.array_equal(stereo[0], got) and np.array_equal(stereo[1], -got)


def test_resample_sinc_keeps_the_passband():
    t = np.arange(24000) / 24000
    y = resample_sinc(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 24000, 16000)
    # away from the zero-padded ends, a 1 kHz tone comes out as the same tone at 16 kHz
    want = np.sin(2 * np.pi * 1000 * np.arange(len(y)) / 16000)
    assert np.abs(y - want)[200:-200].max() < 2e-3


def test_kaldi_fbank_matches_torch_reference():
    x16 = resample(speech_like(3.0), 24000, 16000)
    for x in (x16, x16 * 1e-3, _signal((16000,), seed=4) * 0.1):
        got = kaldi_fbank(x)
        want = features_ref.kaldi_fbank_ref(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape == (1 + (len(x) - 400) // 160, 80)
        # log energies (nats) from float32 arithmetic: measured <= 2e-4 for 99.9% of values, up to 5.6e-4
        # for the faintest bins (about -15.5, just above the FLT_EPSILON floor): 0.06% in energy
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    assert kaldi_fbank(x16[:399]).shape == (0, 80) and kaldi_fbank(x16[:400]).shape == (1, 80)
    mean_free = campplus_fbank(x16)
    np.testing.assert_allclose(mean_free, kaldi_fbank(x16) - kaldi_fbank(x16).mean(0), atol=1e-6)
    assert np.abs(mean_free.mean(axis=0)).max() < 1e-4


def test_s3gen_mel_matches_torch_reference():
    x = speech_like(2.5)
    got = s3gen_mel(x)
    want = features_ref.s3gen_mel_ref(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (len(x) // 480, 80) and got.dtype == np.float32
    # natural-log mel: measured 5e-6 on speech, 1.7e-4 in the -80 dBFS floor (float32 FFT of 1920 terms)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_s3tokenizer_log_mel_matches_the_module_buffers():
    module = s3tokenizer.S3Tokenizer(s3tokenizer.S3TokenizerConfig(n_state=16, n_head=2, n_layer=1))
    x = resample(speech_like(3.0), 24000, 16000)
    got = s3tokenizer_log_mel(x)
    want = features_ref.s3tokenizer_log_mel_ref(module, torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (128, len(x) // 160)
    # torch.hann_window (float32) vs actors.dsp.hann (float64 rounded): measured ~1.5e-5
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # the max-8 floor is taken before the cut, as the official max_len cut does
    assert np.array_equal(s3tokenizer_log_mel(x, max_frames=100), got[:, :100])


def test_ve_mel_matches_librosa():
    x = resample(speech_like(3.0), 24000, 16000)
    got = ve_mel(x)
    spec = librosa.stft(x, n_fft=400, hop_length=160, win_length=400, center=True, pad_mode="reflect")
    want = (librosa.filters.mel(sr=16000, n_fft=400, n_mels=40, fmin=0, fmax=8000) @ np.abs(spec) ** 2).T
    assert got.shape == want.shape == (1 + len(x) // 160, 40)
    assert _rel_err(got, want) < 1e-5  # power mels; measured ~2e-7 of the peak


def test_mel_filterbank_is_librosa():
    for args in [(16000, 400, 40, 0.0, 8000.0), (16000, 400, 128, 0.0, None), (24000, 1920, 80, 0.0, 8000.0)]:
        sr, n_fft, n_mels, fmin, fmax = args
        want = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        np.testing.assert_allclose(slaney_mel_filterbank(*args), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("lead,tail,peak", [(0.0, 0.0, 0.5), (0.3, 0.4, 0.5), (1.1, 0.05, 0.02), (0.5, 2.0, 0.9)])
def test_trim_silence_is_librosa_trim(lead, tail, peak):
    x = resample(speech_like(2.0, lead=lead, tail=tail, peak=peak, seed=3), 24000, 16000)
    got, (start, end) = trim_silence(x, top_db=20)
    want, (w_start, w_end) = librosa.effects.trim(x, top_db=20)
    assert (start, end) == (w_start, w_end) and np.array_equal(got, want)
    assert trim_silence(np.zeros(5000, np.float32))[1] == (0, 5000)  # all equally quiet: nothing is quieter


@pytest.mark.parametrize("frames,partials,covered", [
    (100, 1, 160),   # shorter than a partial: one, zero-padded
    (160, 1, 160),
    (236, 2, 237),   # the second partial would hold 159/160 real frames: kept, padded by one
    (237, 2, 237),
    (260, 2, 237),   # a third partial would hold 106/160 < 80%: the tail is dropped
    (300, 3, 314),   # 146/160 >= 80%: kept
])
def test_ve_partials_follow_the_official_coverage_rule(frames, partials, covered):
    mel = np.arange(frames * 40, dtype=np.float32).reshape(frames, 40) + 1
    got = ve_partials(mel)
    assert got.shape == (partials, 160, 40)
    padded = np.concatenate([mel, np.zeros((max(covered - frames, 0), 40), np.float32)])[:covered]
    for i in range(partials):  # partials start every round(100 frames/s / 1.3 per s) = 77 frames
        assert np.array_equal(got[i], padded[77 * i:77 * i + 160])
