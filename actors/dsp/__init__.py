"""Signal processing, in one place: windows, STFT/iSTFT, mel filters, resampling.

numpy/soxr only, so runtime stages can use it inside workers; export's torch
references take their windows, DFT bases and filters from here too, so the
exported graphs and the numpy runtime cannot drift apart.
"""
from actors.dsp.mel import slaney_mel_filterbank
from actors.dsp.resample import resample
from actors.dsp.stft import dft_basis, istft, stft
from actors.dsp.windows import hann

__all__ = ["dft_basis", "hann", "istft", "resample", "slaney_mel_filterbank", "stft"]
