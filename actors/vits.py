"""The VITS family (Piper voices): phonemized text in, audio out, one ONNX graph."""
from __future__ import annotations

import json
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from actors.audio import silence
from actors.bundle import Bundle, load_bundle
from actors.onnx_session import create_session
from actors.rows import RowResults, column
from actors.storage import StorageOptions
from actors.text import normalize_text, split_sentences

BOS, EOS, PAD = "^", "$", "_"
SCALE_COLUMNS = ("noise_scale", "length_scale", "noise_w")


@dataclass
class VitsOptions:
    """Per-stage settings; per-row columns named like the scales override them."""

    max_chars: int = 5000
    """Rows with longer (normalized) text fail instead of tying up a worker."""
    max_sentence_chars: int = 400
    """Long sentences are cut at clauses/words to this length before phonemization."""
    sentence_silence_s: float = 0.2
    """Pause inserted between the sentences of one row."""
    max_batch_rows: int = 16
    """Sentences per ONNX call; sentences are batched by phoneme count."""
    max_padding_ratio: float = 1.25
    """A batch's longest sentence is at most this many times its shortest: padding is wasted compute."""
    noise_scale: float | None = None
    length_scale: float | None = None
    noise_w: float | None = None
    """None takes the voice's default from the bundle."""


@dataclass
class _Unit:
    row: int
    ids: list[int]
    scales: tuple[float, float, float]
    sid: int | None


class VitsStage:
    """Text → audio for a Piper/VITS bundle.

    `stage(batch)` takes columns `text` (and optionally `speaker_id`,
    `noise_scale`, `length_scale`, `noise_w`) and adds `audio` (float32 arrays),
    `sample_rate`, `duration_s`, `status`, `error`, `time_text_s`, `time_vits_s`.
    A bad row gets status "error" and a message; the other rows go on.
    """

    def __init__(self, bundle: Bundle | str, device: str = "cpu", threads: int = 1,
                 session: ort.InferenceSession | None = None, storage: StorageOptions | None = None,
                 **options: Any) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, storage)
        if self.bundle.family != "vits":
            raise ValueError(f"VitsStage needs a vits bundle, got family {self.bundle.family!r}")
        self.options = VitsOptions(**options)
        self.session = session or create_session(self.bundle.graph("vits"), device, threads)
        self.config = json.loads(self.bundle.asset("voice_config").read_text())
        self.sample_rate = self.bundle.sample_rate
        self.id_map: dict[str, list[int]] = self.config["phoneme_id_map"]
        self.speakers: dict[str, int] = self.config.get("speaker_id_map") or {}
        self.multi_speaker = int(self.config.get("num_speakers", 1)) > 1
        self.espeak_voice = self.config.get("espeak", {}).get("voice", "en-us")
        self.defaults = tuple(
            float(getattr(self.options, name) if getattr(self.options, name) is not None
                  else self.bundle.generation[name]) for name in SCALE_COLUMNS)
        self._phonemizer = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch["text"]
        results = RowResults(batch)
        units: list[_Unit] = []
        for i in range(len(texts)):
            if not results.ok(i):
                continue
            start = time.perf_counter()
            try:
                units.extend(self._units(i, texts[i], batch))
            except ValueError as e:
                results.fail(i, str(e))
            results.add_time(i, "text", time.perf_counter() - start)
        audio = self._synthesize(units, results)
        gap = silence(self.options.sentence_silence_s, self.sample_rate)
        out_audio = np.empty(len(texts), dtype=object)
        for i in range(len(texts)):
            pieces = audio.get(i, [])
            if results.ok(i) and not pieces:
                results.fail(i, "text has nothing to speak")
            if not results.ok(i):
                out_audio[i] = np.zeros(0, np.float32)
                continue
            joined = [pieces[0]]
            for piece in pieces[1:]:
                joined += [gap, piece]
            out_audio[i] = np.concatenate(joined).astype(np.float32)
        return results.to_columns(batch, out_audio, self.sample_rate, stages=("text", "vits"))

    def _units(self, i: int, raw: Any, batch: dict[str, np.ndarray]) -> list[_Unit]:
        text = normalize_text(raw) if isinstance(raw, str) else ""
        if not text:
            raise ValueError("empty text")
        if len(text) > self.options.max_chars:
            raise ValueError(f"text has {len(text)} characters, over the limit of {self.options.max_chars}")
        sid = self._speaker(column(batch, "speaker_id", i))
        scales = tuple(self._scale(batch, name, i, default) for name, default in zip(SCALE_COLUMNS, self.defaults))
        units = []
        for sentence in split_sentences(text, self.options.max_sentence_chars):
            for phonemes in self._phonemize(sentence):
                ids = self._ids(phonemes)
                if len(ids) > 3:  # more than BOS/PAD/EOS
                    units.append(_Unit(i, ids, scales, sid))
        return units

    def _speaker(self, speaker: Any) -> int | None:
        if speaker is None or speaker == "":
            return 0 if self.multi_speaker else None
        if not self.multi_speaker or speaker not in self.speakers:
            known = ", ".join(sorted(self.speakers)) or "none: single-speaker voice"
            raise ValueError(f"unknown speaker {speaker!r} (known: {known})")
        return int(self.speakers[speaker])

    @staticmethod
    def _scale(batch: dict[str, np.ndarray], name: str, i: int, default: float) -> float:
        value = column(batch, name, i)
        if value is None:
            return default
        value = float(value)
        if not 0.0 <= value <= 10.0:
            raise ValueError(f"{name}={value} is outside [0, 10]")
        return value

    def _phonemize(self, sentence: str) -> list[list[str]]:
        if self.config.get("phoneme_type", "espeak") == "text":
            return [list(unicodedata.normalize("NFD", sentence))]
        if self._phonemizer is None:
            from piper.phonemize_espeak import EspeakPhonemizer  # loads the espeak-ng data once per worker
            self._phonemizer = EspeakPhonemizer()
        return self._phonemizer.phonemize(self.espeak_voice, sentence)

    def _ids(self, phonemes: list[str]) -> list[int]:
        ids = list(self.id_map[BOS]) + list(self.id_map[PAD])
        for p in phonemes:
            if p in self.id_map:  # unknown symbols are skipped, as Piper does
                ids += self.id_map[p] + self.id_map[PAD]
        return ids + list(self.id_map[EOS])

    def _synthesize(self, units: list[_Unit], results: RowResults) -> dict[int, list[np.ndarray]]:
        """Batches of similar length and equal scales/speaker; results in sentence order per row."""
        order = sorted(range(len(units)), key=lambda k: (units[k].scales, units[k].sid or 0, len(units[k].ids)))
        pieces: dict[int, dict[int, np.ndarray]] = {}
        step = self.options.max_batch_rows
        groups: list[list[int]] = []
        for k in order:
            if groups and len(groups[-1]) < step and self._fits(units[groups[-1][0]], units[k]):
                groups[-1].append(k)
            else:
                groups.append([k])
        for group in groups:
            self._run_group([units[k] for k in group], group, pieces, results)
        return {row: [by_unit[k] for k in sorted(by_unit)] for row, by_unit in pieces.items()}

    def _fits(self, first: _Unit, unit: _Unit) -> bool:
        """Same scales and speaker (one ONNX call shares them) and little padding (sorted by length)."""
        return (first.scales == unit.scales and first.sid == unit.sid
                and len(unit.ids) <= self.options.max_padding_ratio * len(first.ids))

    def _run_group(self, group: list[_Unit], keys: list[int], pieces: dict, results: RowResults) -> None:
        start = time.perf_counter()
        try:
            audio = self._run([u.ids for u in group], group[0].scales, group[0].sid)
        except Exception as e:  # isolate the row that broke the batch
            if len(group) > 1:
                for unit, key in zip(group, keys):
                    self._run_group([unit], [key], pieces, results)
            else:
                results.fail(group[0].row, f"synthesis failed: {e}")
            return
        elapsed = time.perf_counter() - start
        total = sum(len(a) for a in audio) or 1
        for unit, key, samples in zip(group, keys, audio):
            pieces.setdefault(unit.row, {})[key] = samples
            results.add_time(unit.row, "vits", elapsed * len(samples) / total)

    def _run(self, sequences: list[list[int]], scales: tuple[float, float, float], sid: int | None) -> list[np.ndarray]:
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        ids = np.zeros((len(sequences), int(lengths.max())), dtype=np.int64)
        for r, seq in enumerate(sequences):
            ids[r, :len(seq)] = seq
        feeds = {"input": ids, "input_lengths": lengths, "scales": np.array(scales, dtype=np.float32)}
        if sid is not None:
            feeds["sid"] = np.full(len(sequences), sid, dtype=np.int64)
        audio, sample_lengths = self.session.run(["output", "output_lengths"], feeds)
        audio = audio.reshape(len(sequences), -1)
        return [audio[r, :int(sample_lengths[r])].astype(np.float32) for r in range(len(sequences))]


