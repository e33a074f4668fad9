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
