"""VITS text front end: normalized text → sentences → espeak-ng phonemes → Piper phoneme ids."""
from __future__ import annotations

import threading
import unicodedata

import numpy as np
from pydantic import Field

from actors.rows import Batch, RowStatus
from actors.stage import Column, Stage, StageOptions
from actors.text import normalize_text, split_sentences
from actors.vits.voice import SCALES, Voice

# Ranges of the per-row scales: length_scale 0 gives a graph-minimum clip, not speech.
SCALE_COLUMNS = {
    "noise_scale": Column("float", "VITS prior noise (0 = deterministic)", optional=True, ge=0, le=10),
    "length_scale": Column("float", "speaking time factor (> 1 is slower)", optional=True, ge=0.1, le=10),
    "noise_w": Column("float", "duration predictor noise", optional=True, ge=0, le=10),
}


class FrontendOptions(StageOptions):
    max_chars: int = Field(5000, ge=1)
    """Rows with longer (normalized) text fail instead of tying up a worker."""
    max_sentence_chars: int = Field(400, ge=20)
    """Long sentences are cut at clauses, then words, to this length before phonemization."""
    noise_scale: float | None = Field(None, ge=0, le=10)
    length_scale: float | None = Field(None, ge=0.1, le=10)
    noise_w: float | None = Field(None, ge=0, le=10)
    """Scales used when a row has none; None takes the voice's defaults from the bundle."""


class VitsFrontend(Stage):
    """Text → phoneme ids per sentence, plus each row's resolved scales and speaker id."""

    name = "phonemize"
    family = "vits"
    Options = FrontendOptions
    requires = {
        "text": Column("str", "text to speak"),
        "speaker_id": Column("str", "speaker of a multi-speaker voice", optional=True),
        **SCALE_COLUMNS,
    }
    provides = {
        "phoneme_ids": Column("array", "every sentence's ids, concatenated", dtype="int64"),
        "sentence_lengths": Column("array", "ids per sentence", dtype="int64"),
        "scales": Column("array", "noise_scale, length_scale, noise_w", dtype="float32"),
        "sid": Column("int", "speaker index, -1 for a single-speaker voice"),
    }

    def __init__(self, bundle, **kwargs) -> None:
        super().__init__(bundle, **kwargs)
        self.voice = Voice.of(bundle)
        self.defaults = tuple(float(getattr(self.options, s) if getattr(self.options, s) is not None
                                    else bundle.generation[s]) for s in SCALES)
        self._phonemizer = None
        self._lock = threading.Lock()

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        n = len(batch["text"])
        out = {name: column.fill(n) for name, column in self.provides.items()}
        for i in range(n):
            try:
                sentences = self.sentence_ids(self._text(batch, i))
                if not sentences:
                    raise ValueError("text has nothing to speak")
                out["sid"][i] = self._speaker(self.row_value(batch, "speaker_id", i))
                out["scales"][i] = np.array([self.row_value(batch, s, i, d) for s, d in zip(SCALES, self.defaults)],
                                            dtype=np.float32)
            except ValueError as e:
                rows.fail(i, str(e))
                continue
            out["phoneme_ids"][i] = np.array([x for ids in sentences for x in ids], dtype=np.int64)
            out["sentence_lengths"][i] = np.array([len(ids) for ids in sentences], dtype=np.int64)
        return out

    def _text(self, batch: Batch, i: int) -> str:
        raw = batch["text"][i]
        text = normalize_text(raw) if isinstance(raw, str) else ""
        if not text:
            raise ValueError("empty text")
        if len(text) > self.options.max_chars:
            raise ValueError(f"text has {len(text)} characters, over the limit of {self.options.max_chars}")
        return text

    def sentence_ids(self, text: str) -> list[list[int]]:
        """Phoneme ids of each sentence of normalized `text` (sentences without phonemes dropped)."""
        out = []
        for sentence in split_sentences(text, self.options.max_sentence_chars):
            for phonemes in self._phonemize(sentence):
                ids = self.voice.ids(phonemes)
                if len(ids) > 3:  # more than BOS/PAD/EOS
                    out.append(ids)
        return out

    def _speaker(self, speaker: str | None) -> int:
        voice = self.voice
        if speaker is None or speaker == "":
            return 0 if voice.multi_speaker else -1
        if not voice.multi_speaker or speaker not in voice.speakers:
            known = ", ".join(sorted(voice.speakers)) or "none: single-speaker voice"
            raise ValueError(f"unknown speaker {speaker!r} (known: {known})")
        return int(voice.speakers[speaker])

    def _phonemize(self, sentence: str) -> list[list[str]]:
        if self.voice.phoneme_type == "text":
            return [list(unicodedata.normalize("NFD", sentence))]
        with self._lock:  # espeak-ng keeps global state: one sentence at a time per process
            if self._phonemizer is None:
                from piper.phonemize_espeak import EspeakPhonemizer  # loads the espeak-ng data once

                self._phonemizer = EspeakPhonemizer()
            return self._phonemizer.phonemize(self.voice.espeak_voice, sentence)
