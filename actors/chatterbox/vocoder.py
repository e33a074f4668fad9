"""S3Gen's HiFT vocoder: mel → f0 (graph) → harmonic sine source (numpy) → magnitude/phase (graph) → iSTFT.

Each chunk is vocoded alone, faded in as the official S3Gen does after every call, and
the chunks of a row are joined in order with a short silence between them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from actors.audio import silence
from actors.bundle import Bundle
from actors.chatterbox import columns
from actors.chatterbox.batching import length_groups, model_config
from actors.dsp import hann, istft
from actors.errors import BundleError
from actors.rows import Batch, RowStatus
from actors.stage import Column, Stage, StageOptions


class VocoderOptions(StageOptions):
    chunk_silence_s: float = Field(0.2, ge=0, le=10)
    """Pause inserted between the chunks of one row."""
    max_batch_rows: int = Field(8, ge=1, le=1024)
    """Chunks per graph call; only chunks of equal frame count share a call (the graphs have no length input)."""


@dataclass(frozen=True)
class HiftParams:
    """What the runtime computes around the HiFT graphs (bundle.json `model.config.hift`)."""

    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    n_fft: int
    hop_length: int
    upsample_rates: tuple[int, ...]
    magnitude_max: float
    audio_limit: float

    @classmethod
    def of(cls, bundle: Bundle) -> "HiftParams":
        hift = model_config(bundle, "hift")
        try:
            return cls(**{k: hift[k] for k in cls.__dataclass_fields__ if k != "upsample_rates"},
                       upsample_rates=tuple(hift["upsample_rates"]))
        except KeyError as e:
            raise BundleError(f"bundle {bundle.path}: bundle.json model.config.hift lacks {e}") from None

    @property
    def samples_per_frame(self) -> int:
        return int(np.prod(self.upsample_rates)) * self.hop_length


def draw_sine_randomness(rng: np.random.Generator, batch: int, samples: int,
                         harmonics: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Random draws of the sine generator, in a fixed order so that any port reproduces them.

    1. phases = rng.uniform(-pi, pi, (batch, harmonics+1)); column 0 (fundamental) set to 0.
    2. noise  = rng.standard_normal((batch, samples, harmonics+1)).
    Both returned as float32.
    """
    phases = rng.uniform(-np.pi, np.pi, size=(batch, harmonics + 1))
    phases[:, 0] = 0.0
    noise = rng.standard_normal(size=(batch, samples, harmonics + 1))
    return phases.astype(np.float32), noise.astype(np.float32)


def sine_waves(f0: np.ndarray, params: HiftParams, phases: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """f0 [B, T] (Hz per mel frame) → the decoder's sine source [B, T·samples_per_frame, H+1] float32.

    f0 is repeated over each frame's samples; harmonic k = 1..H+1 advances k·f0/sr cycles
    per sample (float32, as released), the cycles are summed in float64 so that the phase
    stays exact over long chunks; phase 2π·(sum mod 1) + `phases`; voiced samples
    (f0 > threshold) are sines of amplitude nsf_alpha plus noise of std nsf_sigma,
    unvoiced ones noise of std nsf_alpha/3. `phases` [B, H+1], `noise` [B, N, H+1].
    """
    f0_up = np.repeat(np.asarray(f0, dtype=np.float32), params.samples_per_frame, axis=-1)[..., None]  # [B, N, 1]
    harmonics = np.arange(1, params.nb_harmonics + 2, dtype=np.float32)
    theta = np.cumsum((f0_up * harmonics) / np.float32(params.sampling_rate), axis=1, dtype=np.float64)
    # in place: this [B, N, H+1] float64 array is the largest one (N = 480 samples per frame)
    theta %= 1
    theta *= 2 * np.pi
    theta += np.asarray(phases, dtype=np.float32)[:, None, :]
    sines = np.multiply(np.sin(theta, out=theta), params.nsf_alpha, out=theta).astype(np.float32)
    voiced = f0_up > params.nsf_voiced_threshold
    noise_amp = np.where(voiced, np.float32(params.nsf_sigma), np.float32(params.nsf_alpha / 3))
    return np.where(voiced, sines, np.float32(0)) + noise_amp * np.asarray(noise, dtype=np.float32)


def spectrum_to_audio(magnitude: np.ndarray, phase: np.ndarray, params: HiftParams) -> np.ndarray:
    """`hift_decoder` outputs [B, bins, F] → audio [B, hop·(F − 1)]: magnitude clipped, iSTFT, clamped.

    As released, the graph's `phase` (sin of the last layer) is used as the angle.
    """
    magnitude = np.minimum(magnitude, np.float32(params.magnitude_max))
    spec = np.empty(magnitude.shape, np.complex64)
    spec.real, spec.imag = magnitude * np.cos(phase), magnitude * np.sin(phase)
    audio = istft(spec, params.n_fft, params.hop_length, window=hann(params.n_fft), center=True)
    return np.clip(audio, -params.audio_limit, params.audio_limit)


def fade_in(sample_rate: int) -> np.ndarray:
    """S3Gen's start trim: 20 ms of zeros, then a 20 ms raised-cosine ramp (multiplies a chunk's first samples)."""
    n = sample_rate // 50
    return np.concatenate([np.zeros(n), (np.cos(np.linspace(np.pi, 0, n)) + 1) / 2]).astype(np.float32)


@dataclass
class _Unit:
    row: int
    chunk: int
    mel: np.ndarray  # [80, T]


class Vocoder(Stage):
    """Mel per chunk (from `CFM`) → one float32 audio array per row at the bundle's sample rate."""

    name = "vocoder"
    family = "chatterbox"
    Options = VocoderOptions
    graphs = ("hift_f0", "hift_decoder")
    requires = {"mel": columns.MEL, "mel_frames": columns.MEL_FRAMES, "seed": columns.SEED}
    provides = {
        "audio": Column("array", "float32 samples in [-1, 1]", dtype="float32"),
        "sample_rate": Column("int", "samples per second", dtype="int32"),
    }
    drops = ("mel", "mel_frames")

    def __init__(self, bundle: Bundle, **kwargs: Any) -> None:
        self.hift = HiftParams.of(bundle)  # before the base class checks a reduced precision with probe_feeds
        if self.hift.sampling_rate != bundle.sample_rate:
            raise BundleError(f"bundle {bundle.path}: HiFT runs at {self.hift.sampling_rate} Hz, "
                              f"the bundle's sample_rate is {bundle.sample_rate}")
        self.sample_rate = bundle.sample_rate
        self.fade = fade_in(self.sample_rate)
        super().__init__(bundle, **kwargs)

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        n = len(batch["mel"])
        units: list[_Unit] = []
        seeds: dict[int, int] = {}
        for i in range(n):
            try:
                chunks = columns.split_frames(batch["mel"][i], batch["mel_frames"][i])
            except ValueError as e:
                rows.fail(i, f"{self.name}: {e}")
                continue
            if not any(len(m) for m in chunks):
                rows.fail(i, f"{self.name}: no mel frames in any chunk: nothing to vocode")
                continue
            seeds[i] = columns.row_seed(batch, i)
            units += [_Unit(i, c, m.T) for c, m in enumerate(chunks) if len(m)]

        pieces: dict[int, dict[int, np.ndarray]] = {}
        for group in length_groups([u.mel.shape[1] for u in units], self.options.max_batch_rows, 1.0):
            members = [units[k] for k in group]
            for u, audio in zip(members, self.vocode(np.stack([u.mel for u in members]),
                                                     [columns.rng_for(seeds[u.row], columns.HIFT_STREAM, u.chunk)
                                                      for u in members])):
                pieces.setdefault(u.row, {})[u.chunk] = audio

        gap = silence(self.options.chunk_silence_s, self.sample_rate)
        audio = self.provides["audio"].fill(n)
        for i, by_chunk in pieces.items():
            audio[i] = np.concatenate([x for c in sorted(by_chunk) for x in (gap, by_chunk[c])][1:])
        return {"audio": audio, "sample_rate": np.full(n, self.sample_rate, dtype=np.int32)}

    def vocode(self, mel: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
        """mel [B, 80, T] (no padding: the graphs have no length input) → faded-in audio [B, T·480] float32."""
        p = self.hift
        (f0,) = self.sessions["hift_f0"].run({"mel": mel}, ["f0"])
        samples = mel.shape[-1] * p.samples_per_frame
        draws = [draw_sine_randomness(rng, 1, samples, p.nb_harmonics) for rng in rngs]
        sines = sine_waves(f0, p, np.concatenate([d[0] for d in draws]), np.concatenate([d[1] for d in draws]))
        magnitude, phase = self.sessions["hift_decoder"].run({"mel": mel, "sine_waves": sines},
                                                             ["magnitude", "phase"])
        audio = spectrum_to_audio(magnitude, phase, p)
        m = min(audio.shape[-1], len(self.fade))
        audio[:, :m] *= self.fade[:m]
        return audio.astype(np.float32)

    def probe_feeds(self, graph: str) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        frames = 8
        mel = (rng.standard_normal((1, columns.MEL_BINS, frames)) - 1.0).astype(np.float32)
        if graph == "hift_f0":
            return {"mel": mel}
        f0 = np.where(np.arange(frames) < 6, 150.0, 0.0)[None].astype(np.float32)  # voiced, then unvoiced
        phases, noise = draw_sine_randomness(rng, 1, frames * self.hift.samples_per_frame, self.hift.nb_harmonics)
        return {"mel": mel, "sine_waves": sine_waves(f0, self.hift, phases, noise)}
