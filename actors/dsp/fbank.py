"""Kaldi filter-bank features (kaldi-native-fbank)."""
from __future__ import annotations

import kaldi_native_fbank as knf
import numpy as np


def kaldi_fbank(x: np.ndarray, sample_rate: int = 16000, num_bins: int = 80) -> np.ndarray:
    """Log mel filter-bank energies [frames, num_bins] (float32) of x [samples], as Kaldi computes them.

    The options of torchaudio.compliance.kaldi.fbank(x, num_mel_bins=num_bins) with its
    other defaults: 25 ms frames every 10 ms, snip_edges (frames = 1 + (n - 400) // 160
    at 16 kHz, none if shorter than a frame), no dither, DC removed per frame,
    pre-emphasis 0.97, Povey window, FFT size rounded up to a power of two, power
    spectrum, Kaldi mel bins from 20 Hz to Nyquist, log floored at FLT_EPSILON; no
    energy term (so the energy floor has no effect). Samples are used as given (not
    scaled to 16-bit range), as torchaudio does.
    """
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq = float(sample_rate)
    frame.frame_length_ms, frame.frame_shift_ms = 25.0, 10.0
    frame.dither = 0.0  # kaldi-native-fbank's default dithers
    frame.preemph_coeff = 0.97
    frame.remove_dc_offset = True
    frame.window_type = "povey"
    frame.round_to_power_of_two = True
    frame.snip_edges = True
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq, opts.mel_opts.high_freq = 20.0, 0.0  # high 0: Nyquist
    opts.use_energy, opts.energy_floor, opts.use_log_fbank, opts.use_power = False, 1.0, True, True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(float(sample_rate), np.asarray(x, dtype=np.float32).reshape(-1))
    fbank.input_finished()
    n = fbank.num_frames_ready
    out = np.empty((n, num_bins), dtype=np.float32)
    for i in range(n):
        out[i] = fbank.get_frame(i)
    return out
