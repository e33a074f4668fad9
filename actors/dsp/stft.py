"""Short-time Fourier transform with torch.stft / torch.istft semantics (onesided, unnormalised)."""
from __future__ import annotations

import numpy as np

from actors.dsp.windows import hann


def dft_basis(n_fft: int) -> np.ndarray:
    """[2*(n_fft//2+1), 1, n_fft] float32: Hann-windowed cos rows (real part), then -sin rows (imag).

    The kernel of a strided conv1d that computes the STFT inside an ONNX graph.
    """
    win = hann(n_fft).astype(np.float64)
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    ang = 2.0 * np.pi * ((k * n) % n_fft) / n_fft
    basis = np.concatenate([np.cos(ang) * win, -np.sin(ang) * win], axis=0)
    return basis[:, None, :].astype(np.float32)


def _window(window: np.ndarray | None, n_fft: int) -> np.ndarray:
    if window is None:
        return hann(n_fft)
    window = np.asarray(window, dtype=np.float32)
    if window.shape != (n_fft,):
        raise ValueError(f"window shape {window.shape} != ({n_fft},)")
    return window


def stft(x: np.ndarray, n_fft: int, hop: int, window: np.ndarray | None = None,
         center: bool = True) -> np.ndarray:
    """x [..., samples] float32 -> complex64 [..., n_fft//2 + 1, frames] (Hann window by default).

    As torch.stft(x, n_fft, hop, window=window, center=center, pad_mode="reflect",
    return_complex=True): frame t starts at sample t*hop of the (reflect-padded) signal.
    """
    win = _window(window, n_fft)
    x = np.asarray(x, dtype=np.float32)
    if center:
        pad = n_fft // 2
        if x.shape[-1] <= pad:  # torch refuses too; numpy would reflect more than once
            raise ValueError(f"reflect padding {pad} needs more than {x.shape[-1]} samples")
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft, axis=-1)[..., ::hop, :]
    spec = np.fft.rfft(frames * win, axis=-1).astype(np.complex64, copy=False)
    return np.swapaxes(spec, -1, -2)


def _overlap_add(frames: np.ndarray, hop: int) -> np.ndarray:
    """frames [..., F, n] -> [..., hop*(F-1) + n]: sum of the frames placed hop apart."""
    n_frames, n = frames.shape[-2:]
    chunks = -(-n // hop)  # each frame spans this many hop-sized blocks (last one zero-padded)
    padded = np.zeros(frames.shape[:-1] + (chunks * hop,), dtype=frames.dtype)
    padded[..., :n] = frames
    blocks = padded.reshape(frames.shape[:-2] + (n_frames, chunks, hop))
    out = np.zeros(frames.shape[:-2] + (n_frames + chunks - 1, hop), dtype=frames.dtype)
    for j in range(chunks):
        out[..., j:j + n_frames, :] += blocks[..., j, :]
    return out.reshape(frames.shape[:-2] + (-1,))[..., :hop * (n_frames - 1) + n]


def istft(spec: np.ndarray, n_fft: int, hop: int, window: np.ndarray | None = None,
          center: bool = True, length: int | None = None) -> np.ndarray:
    """spec complex [..., n_fft//2 + 1, frames] -> float32 [..., samples], inverse of `stft`.

    As torch.istft: windowed overlap-add divided by the overlap-added squared
    window; `center` trims n_fft//2 at both ends; `length` cuts or zero-pads the tail.
    """
    win = _window(window, n_fft)
    spec = np.asarray(spec)
    if spec.shape[-2] != n_fft // 2 + 1:
        raise ValueError(f"{spec.shape[-2]} frequency bins, n_fft {n_fft} needs {n_fft // 2 + 1}")
    n_frames = spec.shape[-1]
    frames = np.fft.irfft(np.swapaxes(spec.astype(np.complex64, copy=False), -1, -2), n=n_fft, axis=-1)
    y = _overlap_add(frames * win, hop)
    envelope = _overlap_add(np.broadcast_to(win * win, (n_frames, n_fft)), hop)
    full = y.shape[-1]
    start = n_fft // 2 if center else 0
    if length is not None:
        end = start + length
    else:
        end = full - n_fft // 2 if center else full
    y, envelope = y[..., start:end], envelope[start:end]
    if envelope.size and np.abs(envelope).min() < 1e-11:
        raise ValueError("window overlap-add is zero somewhere: (window, n_fft, hop) break NOLA")
    y = (y / envelope).astype(np.float32, copy=False)
    if end > full:
        y = np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, end - full)])
    return y
