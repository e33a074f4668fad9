"""A Chatterbox voice: the five arrays that condition T3 and S3Gen on a speaker (columns.VOICE)."""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from actors.bundle import Bundle
from actors.chatterbox import columns
from actors.errors import BundleError
from actors.rows import Batch

DEFAULT_VOICE_ASSET = "default_voice"
# default_voice.npz key (official Conditionals field) → Voice field
_ASSET_KEYS = {"t3_speaker_emb": "t3_speaker_emb", "t3_cond_prompt_speech_tokens": "t3_prompt_tokens",
               "gen_prompt_token": "gen_prompt_tokens", "gen_prompt_feat": "gen_prompt_mel",
               "gen_embedding": "gen_xvector"}


@dataclass(frozen=True, eq=False)
class Voice:
    """What conditioning on one reference gives (shapes at the released sizes)."""

    t3_speaker_emb: np.ndarray     # [256] float32, VoiceEncoder utterance embedding (unit norm)
    t3_prompt_tokens: np.ndarray   # [<=150] int64, S3 tokens of the first 6 s
    gen_prompt_tokens: np.ndarray  # [T] int64, S3 tokens of the first 10 s
    gen_prompt_mel: np.ndarray     # [2T, 80] float32, 24 kHz prompt mel
    gen_xvector: np.ndarray        # [192] float32, CAMPPlus x-vector

    def __post_init__(self) -> None:
        for f in fields(self):
            want = columns.VOICE[f.name].dtype
            value = np.ascontiguousarray(getattr(self, f.name), dtype=want)
            object.__setattr__(self, f.name, value)
        mel, tokens = self.gen_prompt_mel, self.gen_prompt_tokens
        vectors = {k: getattr(self, k) for k in ("t3_speaker_emb", "t3_prompt_tokens", "gen_prompt_tokens",
                                                 "gen_xvector")}
        bad = [k for k, v in vectors.items() if v.ndim != 1]
        if bad:
            raise ValueError(f"voice arrays {bad} must be one-dimensional")
        if mel.ndim != 2 or mel.shape != (2 * len(tokens), columns.MEL_BINS):
            raise ValueError(f"gen_prompt_mel must be [2 × {len(tokens)} prompt tokens, {columns.MEL_BINS}], "
                             f"got {list(mel.shape)}")
        if not all(np.isfinite(v).all() for v in (self.t3_speaker_emb, mel, self.gen_xvector)):
            raise ValueError("voice holds NaN or infinite values")

    def equals(self, other: "Voice") -> bool:
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    def to_npz(self) -> bytes:
        """The voice as .npz bytes, one array per field (named as the VOICE columns)."""
        buf = io.BytesIO()
        np.savez(buf, **{f.name: getattr(self, f.name) for f in fields(self)})
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes, where: str) -> "Voice":
        """The inverse of `to_npz`; ValueError naming `where` if the bytes are not a voice."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                return cls(**{f.name: npz[f.name] for f in fields(cls)})
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"{where} is not a voice file ({type(e).__name__}: {e})") from None

    @classmethod
    def default(cls, bundle: Bundle) -> "Voice | None":
        """The bundle's default voice (asset `default_voice`, official Conditionals arrays); None without one.

        A prompt mel longer than 2 × its tokens (the official code keeps an odd last frame)
        is cut to the contract's 2T frames, as the conditioning stage cuts a reference's.
        """
        if DEFAULT_VOICE_ASSET not in bundle.manifest.get("assets", {}):
            return None
        path = bundle.asset(DEFAULT_VOICE_ASSET)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {field: np.asarray(npz[key]) for key, field in _ASSET_KEYS.items()}
            tokens, mel = aligned_prompt(arrays["gen_prompt_tokens"].reshape(-1),
                                         arrays["gen_prompt_mel"].reshape(-1, columns.MEL_BINS))
            return cls(t3_speaker_emb=arrays["t3_speaker_emb"].reshape(-1),
                       t3_prompt_tokens=arrays["t3_prompt_tokens"].reshape(-1),
                       gen_prompt_tokens=tokens, gen_prompt_mel=mel,
                       gen_xvector=arrays["gen_xvector"].reshape(-1))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise BundleError(f"bundle {bundle.path}: asset {DEFAULT_VOICE_ASSET!r} ({path.name}) is not a "
                              f"voice ({type(e).__name__}: {e})") from None


def aligned_prompt(tokens: np.ndarray, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mel) cut to T tokens and exactly 2T mel frames, T = min(tokens, mel frames // 2).

    The official embed_ref cuts the tokens to half the mel frames when the two disagree
    (a reference whose length is not a multiple of 40 ms); the graph contract also needs
    the mel at exactly 2T frames, so an odd last frame goes too.
    """
    t = min(len(tokens), len(mel) // 2)
    return tokens[:t], mel[:2 * t]


def voice_columns(voices: Sequence[Voice | None]) -> Batch:
    """The VOICE columns of a batch, one row per entry; None rows get the column fill (empty arrays).

    Each row gets its own copies, so a later stage that edits its inputs in place cannot change a cached voice.
    """
    n = len(voices)
    out = {name: column.fill(n) for name, column in columns.VOICE.items()}
    for i, voice in enumerate(voices):
        if voice is None:
            continue
        for name in columns.VOICE:
            value = getattr(voice, name)
            out[name][i] = value.reshape(-1).copy()  # mels travel flattened
    return out
