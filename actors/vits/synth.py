"""VITS synthesis: phoneme ids → audio, sentences of all rows batched by length, joined per row."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from actors.audio import silence
from actors.rows import Batch, RowStatus
from actors.stage import Column, Stage, StageOptions
from actors.vits.frontend import VitsFrontend
from actors.vits.voice import Voice


class SynthOptions(StageOptions):
    sentence_silence_s: float = Field(0.2, ge=0, le=10)
    """Pause inserted between the sentences of one row."""
    max_batch_rows: int = Field(16, ge=1)
    """Sentences per graph call; sentences are batched by phoneme count."""
    max_padding_ratio: float = Field(1.25, ge=1)
    """A call's longest sentence is at most this many times its shortest: padding is wasted compute."""


@dataclass
class _Sentence:
    row: int
    index: int
    ids: np.ndarray
    scales: tuple[float, float, float]
    sid: int


class VitsSynth(Stage):
    """Phoneme ids (from `VitsFrontend`) → one float32 audio array per row at the voice's sample rate."""

    name = "vits"
    family = "vits"
    Options = SynthOptions
    graphs = ("vits",)
    requires = {k: VitsFrontend.provides[k] for k in ("phoneme_ids", "sentence_lengths", "scales", "sid")}
    provides = {
        "audio": Column("array", "float32 samples in [-1, 1]", dtype="float32"),
        "sample_rate": Column("int", "samples per second", dtype="int32"),
    }
    drops = tuple(requires)

    def __init__(self, bundle, **kwargs) -> None:
        self.voice = Voice.of(bundle)  # before the base class checks a reduced precision with probe_feeds
        self.sample_rate = bundle.sample_rate
        super().__init__(bundle, **kwargs)

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        n = len(batch["phoneme_ids"])
        sentences = []
        for i in range(n):
            if not rows.ok(i):
                continue
            scales = tuple(float(x) for x in batch["scales"][i])
            for k, ids in enumerate(np.split(batch["phoneme_ids"][i], np.cumsum(batch["sentence_lengths"][i])[:-1])):
                sentences.append(_Sentence(i, k, ids, scales, int(batch["sid"][i])))
        pieces: dict[int, dict[int, np.ndarray]] = {}
        for group in self._groups(sentences):
            for s, audio in zip(group, self.synthesize([s.ids for s in group], group[0].scales, group[0].sid)):
                pieces.setdefault(s.row, {})[s.index] = audio
        gap = silence(self.options.sentence_silence_s, self.sample_rate)
        audio = self.provides["audio"].fill(n)
        for i, by_index in pieces.items():
            parts = [by_index[k] for k in sorted(by_index)]
            audio[i] = np.concatenate([x for part in parts for x in (gap, part)][1:]).astype(np.float32)
        return {"audio": audio, "sample_rate": np.full(n, self.sample_rate, dtype=np.int32)}

    def _groups(self, sentences: list[_Sentence]) -> list[list[_Sentence]]:
        """One graph call shares scales and speaker; sorted by length, with bounded padding."""
        ordered = sorted(sentences, key=lambda s: (s.scales, s.sid, len(s.ids)))
        groups: list[list[_Sentence]] = []
        for s in ordered:
            first = groups[-1][0] if groups else None
            if (first is not None and len(groups[-1]) < self.options.max_batch_rows
                    and (first.scales, first.sid) == (s.scales, s.sid)
                    and len(s.ids) <= self.options.max_padding_ratio * len(first.ids)):
                groups[-1].append(s)
            else:
                groups.append([s])
        return groups

    def synthesize(self, sequences: list[np.ndarray] | list[list[int]], scales: tuple[float, float, float],
                   sid: int) -> list[np.ndarray]:
        """One padded graph call; each row's audio trimmed to its own length."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        ids = np.zeros((len(sequences), int(lengths.max())), dtype=np.int64)
        for r, seq in enumerate(sequences):
            ids[r, :len(seq)] = seq
        feeds = {"input": ids, "input_lengths": lengths, "scales": np.array(scales, dtype=np.float32)}
        if sid >= 0:
            feeds["sid"] = np.full(len(sequences), sid, dtype=np.int64)
        audio, sample_lengths = self.sessions["vits"].run(feeds, ["output", "output_lengths"])
        audio = audio.reshape(len(sequences), -1)
        return [audio[r, :int(sample_lengths[r])].astype(np.float32) for r in range(len(sequences))]

    def probe_feeds(self, graph: str) -> dict[str, np.ndarray]:
        ids = np.array([self.voice.probe_ids], dtype=np.int64)
        feeds = {"input": ids, "input_lengths": np.array([ids.shape[1]], dtype=np.int64),
                 "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32)}  # no noise: comparable runs
        if self.voice.multi_speaker:
            feeds["sid"] = np.zeros(1, dtype=np.int64)
        return feeds
