"""Signal processing, in one place: windows, STFT/iSTFT, mel filters, resampling, trimming, fbank,
and the front ends of the Chatterbox reference encoders.

numpy/soxr/kaldi-native-fbank only, so runtime stages can use it inside workers;
export's torch references take their windows, DFT bases and filters from here too,
so the exported graphs and the numpy runtime cannot drift apart.
"""
from actors.dsp.fbank import kaldi_fbank
from actors.dsp.features import campplus_fbank, s3gen_mel, s3tokenizer_log_mel, ve_mel, ve_partials
from actors.dsp.mel import slaney_mel_filterbank
from actors.dsp.resample import resample, resample_sinc
from actors.dsp.stft import dft_basis, istft, stft
from actors.dsp.trim import trim_silence
from actors.dsp.windows import hann

__all__ = ["campplus_fbank", "dft_basis", "hann", "istft", "kaldi_fbank", "resample", "resample_sinc",
           "s3gen_mel", "s3tokenizer_log_mel", "slaney_mel_filterbank", "stft", "trim_silence", "ve_mel",
           "ve_partials"]
