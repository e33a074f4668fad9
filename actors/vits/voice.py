"""A Piper voice's config (voice.json in the bundle): phoneme ids, speakers, default scales."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

from actors.bundle import Bundle

BOS, EOS, PAD = "^", "$", "_"
SCALES = ("noise_scale", "length_scale", "noise_w")


@dataclass(frozen=True)
class Voice:
    config: dict

    @classmethod
    def of(cls, bundle: Bundle) -> "Voice":
        return cls(json.loads(bundle.asset("voice_config").read_text()))

    @property
    def id_map(self) -> dict[str, list[int]]:
        return self.config["phoneme_id_map"]

    @property
    def speakers(self) -> dict[str, int]:
        return self.config.get("speaker_id_map") or {}

    @property
    def multi_speaker(self) -> bool:
        return int(self.config.get("num_speakers", 1)) > 1

    @property
    def espeak_voice(self) -> str:
        return self.config.get("espeak", {}).get("voice", "en-us")

    @property
    def phoneme_type(self) -> str:
        return self.config.get("phoneme_type", "espeak")

    @cached_property
    def probe_ids(self) -> list[int]:
        """A fixed id sequence over the voice's own symbols: deterministic graph inputs for checks."""
        symbols = sorted(k for k in self.id_map if k not in (BOS, EOS, PAD) and k.isalpha())[:24]
        return self.ids(symbols)

    def ids(self, phonemes: list[str]) -> list[int]:
        """Piper's id layout: BOS, PAD, then each known phoneme followed by PAD, then EOS."""
        ids = list(self.id_map[BOS]) + list(self.id_map[PAD])
        for p in phonemes:
            if p in self.id_map:  # unknown symbols are skipped, as Piper does
                ids += self.id_map[p] + self.id_map[PAD]
        return ids + list(self.id_map[EOS])
