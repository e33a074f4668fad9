"""Chatterbox conditioning: reference audio → the voice columns (columns.VOICE).

The official `prepare_conditionals`, step by step: the reference is loaded at 24 kHz
(librosa: soxr HQ) and resampled to 16 kHz the same way. S3Gen gets its first 10 s:
the prompt mel from the 24 kHz audio; that audio resampled to 16 kHz by torchaudio's
sinc resampler (as `embed_ref` does) gives the prompt tokens (`s3tokenizer`) and the
x-vector (`campplus`, one reference per call: its statistics pooling sees the whole
time axis); the mel is cut to exactly 2 × the tokens. T3 gets the S3 tokens of the
first 6 s of the 16 kHz reference (at most 150) and the VoiceEncoder embedding: the
16 kHz reference without leading/trailing silence, cut into partials that one `ve`
call embeds, whose mean is re-normalised.

Voices are cached by the sha256 of the reference's bytes and a fingerprint of the
three graphs: per stage instance in memory (LRU), and as `<cache>/voices/<fp>/<sha>.npz`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow.fs as pafs
from pydantic import Field, model_validator

from actors.audio import AudioDecodeError, decode_audio
from actors.bundle import Bundle
from actors.chatterbox import columns
from actors.chatterbox.voice import Voice, aligned_prompt, voice_columns
from actors.dsp import (campplus_fbank, resample, resample_sinc, s3gen_mel, s3tokenizer_log_mel, trim_silence,
                        ve_mel, ve_partials)
from actors.rows import Batch, RowStatus, batch_len
from actors.stage import Stage, StageOptions
from actors.storage import join, write_atomic

log = logging.getLogger(__name__)

GEN_SAMPLE_RATE, REF_SAMPLE_RATE = 24000, 16000
T3_PROMPT_SECONDS, GEN_PROMPT_SECONDS = 6, 10
TRIM_TOP_DB = 20.0
SILENCE_DBFS = -60.0
"""A reference whose loudest sample is below this is silent: 0.001 of full scale, far below any usable
speech recording, far above digital silence and 16-bit dither (about -90 dBFS)."""
FEATURES_VERSION = 1
"""Part of the cache fingerprint: raise it when the features change, so stored voices are recomputed."""


class ReferenceAudioError(ValueError):
    """A reference that cannot condition a voice (unreadable, silent, too short); the message is the reason."""


@dataclass(frozen=True)
class ReferenceFeatures:
    """Every graph input of one reference (float32), plus the S3Gen prompt mel and the speech length."""

    ve_mels: np.ndarray         # [partials, 160, 40]: `ve` input `mels`
    fbank: np.ndarray           # [frames, 80]: `campplus` input `fbank` (one row)
    t3_mels: np.ndarray         # [128, <=600]: `s3tokenizer` `mels` of the T3 prompt (first 6 s)
    gen_mels: np.ndarray        # [128, frames]: `s3tokenizer` `mels` of the S3Gen prompt (first 10 s)
    gen_prompt_mel: np.ndarray  # [frames, 80]: S3Gen prompt mel, before it is cut to 2 × tokens
    speech_seconds: float       # the 16 kHz reference's length once trimmed of silence


def reference_features(samples_24k: np.ndarray, *, min_seconds: float = 1.6,
                       prompt_len: int = 150) -> ReferenceFeatures:
    """The features of one mono 24 kHz reference, as the official conditioning computes them.

    ReferenceAudioError if it holds NaN/infinite samples, is silent (peak below
    SILENCE_DBFS) or holds less than `min_seconds` of sound once trimmed.
    """
    wav24 = np.asarray(samples_24k, dtype=np.float32).reshape(-1)
    if not np.isfinite(wav24).all():
        raise ReferenceAudioError("it holds NaN or infinite samples")
    peak = float(np.abs(wav24).max(initial=0.0))
    if peak < 10 ** (SILENCE_DBFS / 20):
        level = f"{20 * np.log10(peak):.1f} dBFS" if peak > 0 else "digital silence"
        raise ReferenceAudioError(f"it is silent (peak {level}, below {SILENCE_DBFS:g} dBFS)")
    wav16 = resample(wav24, GEN_SAMPLE_RATE, REF_SAMPLE_RATE)
    speech, _ = trim_silence(wav16, top_db=TRIM_TOP_DB)
    seconds = len(speech) / REF_SAMPLE_RATE
    if seconds < min_seconds:
        raise ReferenceAudioError(f"it holds {seconds:.2f} s of sound once leading and trailing silence "
                                  f"are trimmed, less than the minimum {min_seconds:g} s")
    prompt24 = wav24[:GEN_PROMPT_SECONDS * GEN_SAMPLE_RATE]
    prompt16 = resample_sinc(prompt24, GEN_SAMPLE_RATE, REF_SAMPLE_RATE)
    return ReferenceFeatures(
        ve_mels=ve_partials(ve_mel(speech)),
        fbank=campplus_fbank(prompt16),
        # 4 mel frames per token: the official max_len cut
        t3_mels=s3tokenizer_log_mel(wav16[:T3_PROMPT_SECONDS * REF_SAMPLE_RATE], max_frames=4 * prompt_len),
        gen_mels=s3tokenizer_log_mel(prompt16),
        gen_prompt_mel=s3gen_mel(prompt24),
        speech_seconds=seconds)


def bundle_fingerprint(bundle: Bundle, graphs: tuple[str, ...] = ("ve", "campplus", "s3tokenizer")) -> str:
    """16 hex digits naming what a voice depends on: the graphs' sha256s and the features' version."""
    entries = bundle.manifest["graphs"]
    key = {"graphs": {g: entries[g]["sha256"] for g in graphs if g in entries}, "features": FEATURES_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _probe_signal(seconds: float = 2.0) -> np.ndarray:
    """A deterministic voiced sound at 24 kHz: harmonics of a gliding 110–150 Hz pitch, syllable-like
    amplitude, a little noise; the probe inputs' features have the value ranges of speech."""
    t = np.arange(int(seconds * GEN_SAMPLE_RATE)) / GEN_SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(130 + 20 * np.sin(2 * np.pi * 0.7 * t)) / GEN_SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    noise = np.random.default_rng(0).standard_normal(len(t))
    return (0.15 * voiced * envelope + 0.003 * noise).astype(np.float32)


class ConditioningOptions(StageOptions):
    min_seconds: float = Field(1.6, ge=0.1, le=60)
    """Least sound a reference must hold once leading and trailing silence are trimmed. Default: one
    VoiceEncoder partial (160 frames = 1.6 s); a shorter reference is zero-padded into a single partial,
    which the encoder never saw in training, and gives fewer than 40 prompt tokens."""
    max_seconds: float = Field(60.0, ge=10, le=600)
    """Audio read from each reference. The prompts use its first 6 s (T3) and 10 s (S3Gen); only the
    VoiceEncoder embedding averages over more, at ~1.3 partials per second (all in one `ve` call), so a
    longer cap costs decoding and `ve` time for little gain."""
    memory_cache_size: int = Field(128, ge=0)
    """Voices and failed references kept in memory per stage instance, least recently used dropped
    (a voice with a 10 s prompt is about 170 kB); 0 keeps none beyond a batch."""

    @model_validator(mode="after")
    def _readable_minimum(self) -> "ConditioningOptions":
        if self.min_seconds >= self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds:g}) must be less than max_seconds "
                             f"({self.max_seconds:g}), the audio read from each reference")
        return self


class Conditioning(Stage):
    """Reference audio (or the bundle's default voice) → the voice columns of each row."""

    name = "conditioning"
    family = "chatterbox"
    Options = ConditioningOptions
    graphs = ("ve", "campplus", "s3tokenizer")
    requires = {"speaker_id": columns.SPEAKER_ID, "reference_audio": columns.REFERENCE_AUDIO}
    provides = {**columns.VOICE, "voice": columns.VOICE_KEY, "voice_source": columns.VOICE_SOURCE}
    once_per = ("reference_audio", "voice_source")

    def __init__(self, bundle: Bundle, **kwargs) -> None:
        # before the base class, whose reduced-precision check calls probe_feeds
        self.prompt_len = int(bundle.manifest.get("model", {}).get("t3", {}).get("prompt_len", 150))
        self.default_voice = Voice.default(bundle)
        self.fingerprint = bundle_fingerprint(bundle)
        self._memory: OrderedDict[str, Voice | str] = OrderedDict()  # sha256 → voice, or why it failed
        self._lock = threading.Lock()
        super().__init__(bundle, **kwargs)

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        n = batch_len(batch)
        voices: list[Voice | None] = [None] * n
        keys, sources = [""] * n, [""] * n
        by_uri: dict[str, list[int]] = {}
        for i in range(n):
            uri = self.row_value(batch, "reference_audio", i)
            if uri is not None and uri.strip():
                by_uri.setdefault(uri, []).append(i)
            elif self.default_voice is None:
                rows.fail(i, f"{self.name}: no reference_audio{self._speaker(batch, i)} and bundle "
                             f"{self.bundle.path} has no default voice")
            else:
                voices[i], keys[i], sources[i] = self.default_voice, "default", "default"
        resolved: dict[str, Voice | str] = {}  # sha256 of the bytes → this batch's voice or failure
        for uri, members in by_uri.items():
            sha = source = ""
            try:
                data = self._read(uri)
            except ReferenceAudioError as e:
                result: Voice | str = str(e)
            else:
                sha = hashlib.sha256(data).hexdigest()
                if sha in resolved:  # the same bytes under another URI: one voice
                    result, source = resolved[sha], "memory"
                else:
                    result, source = self._resolve(sha, uri, data)
                    resolved[sha] = result
            for k, i in enumerate(members):
                if isinstance(result, str):
                    rows.fail(i, self._failure(batch, i, uri, result))
                else:  # the first row reports where the voice came from, the others share it
                    voices[i], keys[i], sources[i] = result, sha, source if k == 0 else "memory"
        out = voice_columns(voices)
        out["voice"] = np.array(keys, dtype=object)
        out["voice_source"] = np.array(sources, dtype=object)
        return out

    def voice_from_audio(self, data: bytes, where: str) -> Voice:
        """The voice of one reference file's bytes; ReferenceAudioError saying why it cannot be one."""
        try:
            samples, rate = decode_audio(data, where, max_seconds=self.options.max_seconds)
        except AudioDecodeError as e:
            raise ReferenceAudioError(e.reason) from None
        features = reference_features(resample(samples, rate, GEN_SAMPLE_RATE),
                                      min_seconds=self.options.min_seconds, prompt_len=self.prompt_len)
        return self.voice_from_features(features)

    def voice_from_features(self, f: ReferenceFeatures) -> Voice:
        """Run the three graphs on one reference's features; ReferenceAudioError if the result is not finite."""
        partials = self.sessions["ve"].run({"mels": f.ve_mels}, ["embeds"])[0]
        mean = partials.mean(axis=0)
        xvector = self.sessions["campplus"].run({"fbank": f.fbank[None]}, ["xvector"])[0][0]
        # both prompts in one padded call: each row's tokens equal the row run alone (graph contract)
        lengths = np.array([f.t3_mels.shape[1], f.gen_mels.shape[1]], dtype=np.int64)
        mels = np.zeros((2, f.t3_mels.shape[0], int(lengths.max())), dtype=np.float32)
        mels[0, :, :lengths[0]], mels[1, :, :lengths[1]] = f.t3_mels, f.gen_mels
        tokens, token_lengths = self.sessions["s3tokenizer"].run({"mels": mels, "mel_lengths": lengths},
                                                                 ["tokens", "token_lengths"])
        gen_tokens, gen_mel = aligned_prompt(tokens[1, :int(token_lengths[1])], f.gen_prompt_mel)
        try:
            with np.errstate(invalid="ignore", divide="ignore"):  # an all-zero embedding is reported below
                speaker = mean / np.linalg.norm(mean)
            return Voice(t3_speaker_emb=speaker, t3_prompt_tokens=tokens[0, :int(token_lengths[0])][:self.prompt_len],
                         gen_prompt_tokens=gen_tokens, gen_prompt_mel=gen_mel, gen_xvector=xvector)
        except ValueError as e:  # e.g. the VoiceEncoder's rectified embedding is all zero
            raise ReferenceAudioError(f"its voice is unusable ({e})") from None

    def probe_feeds(self, graph: str) -> dict[str, np.ndarray]:
        f = self._probe_features
        if graph == "ve":
            return {"mels": f.ve_mels}
        if graph == "campplus":
            return {"fbank": f.fbank[None]}
        if graph == "s3tokenizer":
            return {"mels": f.gen_mels[None], "mel_lengths": np.array([f.gen_mels.shape[1]], dtype=np.int64)}
        return super().probe_feeds(graph)

    @cached_property
    def _probe_features(self) -> ReferenceFeatures:
        return reference_features(_probe_signal(), prompt_len=self.prompt_len)

    def _resolve(self, sha: str, uri: str, data: bytes) -> tuple[Voice | str, str]:
        """(voice or failure reason, where it came from: memory, store or computed)."""
        with self._lock:
            hit = self._memory.get(sha)
            if hit is not None:
                self._memory.move_to_end(sha)
                return hit, "memory"
        result: Voice | str | None = self._load(sha)
        source = "store"
        if result is None:
            source = "computed"
            try:
                result = self.voice_from_audio(data, uri)
            except ReferenceAudioError as e:
                result = str(e)
            else:
                self._save(sha, result)
        self._remember(sha, result)
        return result, source

    def _remember(self, sha: str, result: Voice | str) -> None:
        with self._lock:
            self._memory[sha] = result
            self._memory.move_to_end(sha)
            while len(self._memory) > self.options.memory_cache_size:
                self._memory.popitem(last=False)

    def _read(self, uri: str) -> bytes:
        try:
            fs, path = self.storage.resolve(uri)
            with fs.open_input_stream(path) as f:
                return f.read()
        except (OSError, ValueError) as e:  # pyarrow: FileNotFoundError, permission, network, bad URI
            raise ReferenceAudioError(f"cannot read it ({e})") from None

    def _stored_path(self, sha: str) -> str:
        return join(self.cache, "voices", self.fingerprint, f"{sha}.npz")

    def _load(self, sha: str) -> Voice | None:
        """The voice stored under the cache folder; None if there is none (or it is unreadable: recomputed)."""
        if self.cache is None:
            return None
        uri = self._stored_path(sha)
        try:
            fs, path = self.storage.resolve(uri)
            with fs.open_input_stream(path) as f:
                return Voice.from_npz(f.read(), uri)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s: ignoring stored voice %s (%s)", self.name, uri, e)
            return None

    def _save(self, sha: str, voice: Voice) -> None:
        """Store a computed voice; a cache that cannot be written costs recomputation, not the row."""
        if self.cache is None:
            return
        uri = self._stored_path(sha)
        try:
            fs, path = self.storage.resolve(uri)
            if isinstance(fs, pafs.LocalFileSystem):
                fs.create_dir(path.rpartition("/")[0], recursive=True)
            write_atomic(fs, path, voice.to_npz())
        except (OSError, ValueError) as e:
            log.warning("%s: cannot store voice %s (%s)", self.name, uri, e)

    def _speaker(self, batch: Batch, i: int) -> str:
        speaker = self.row_value(batch, "speaker_id", i)
        return f" (speaker {speaker!r})" if speaker else ""

    def _failure(self, batch: Batch, i: int, uri: str, reason: str) -> str:
        return f"{self.name}: reference audio {uri!r}{self._speaker(batch, i)}: {reason}"
