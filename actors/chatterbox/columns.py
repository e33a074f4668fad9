"""The columns the Chatterbox stages pass to each other, declared once.

Chain: conditioning → t3 → s3gen_encoder → cfm → vocoder. Mel-like columns
([frames, 80] per item) travel flattened row-major as float32 arrays, with
their frame counts per chunk in a companion column, so any Arrow/Ray block
format carries them. A row's text may be split into chunks (sentences
packed up to `max_chunk_chars`); per-chunk columns list the chunks in order.
"""
from __future__ import annotations

import hashlib

import numpy as np

from actors.rows import Batch, value
from actors.stage import Column

MEL_BINS = 80

# Random streams: a row's draws depend only on (seed, stream, chunk), never on its batch.
T3_STREAM, CFM_STREAM, HIFT_STREAM = 0, 1, 2

# manifest inputs
SPEAKER_ID = Column("str", "speaker id (joins the speaker manifest); empty: the bundle's default voice",
                    optional=True)
REFERENCE_AUDIO = Column("str", "reference audio URI (local path or s3://; wav, flac, mp3...); the job "
                                "fills it from the speaker manifest", optional=True)
SEED = Column("int", "random seed of this row (default: derived from its id)", optional=True, ge=0,
              le=2**53 - 1)  # exact in float64, which range checks use

# conditioning → t3, s3gen_encoder, cfm
VOICE = {
    "t3_speaker_emb": Column("array", "VoiceEncoder utterance embedding [256]"),
    "t3_prompt_tokens": Column("array", "S3 tokens of the first 6 s of the reference [<=150]", dtype="int64"),
    "gen_prompt_tokens": Column("array", "S3 tokens of the first 10 s of the reference [T]", dtype="int64"),
    "gen_prompt_mel": Column("array", "24 kHz prompt mel [2T, 80], flattened"),
    "gen_xvector": Column("array", "CAMPPlus x-vector [192]"),
}
VOICE_KEY = Column("str", "the voice used: sha256 of the reference audio bytes, or 'default'", result=True)
VOICE_SOURCE = Column("str", "where the row's conditioning came from: computed, memory, store or default",
                      result=True)

# t3 → s3gen_encoder
SPEECH_TOKENS = Column("array", "generated S3 speech tokens, all chunks in order (ids < 6561)", dtype="int32",
                       result=True)
CHUNK_TOKENS = Column("array", "speech tokens per text chunk", dtype="int64")

# s3gen_encoder → cfm
MU = Column("array", "flow encoder output per chunk (prompt frames first) [frames, 80], chunks concatenated, "
                     "flattened")
MU_FRAMES = Column("array", "frames of `mu` per chunk (2 × (prompt + chunk tokens))", dtype="int64")
SPKS = Column("array", "projected speaker embedding [80]")

# cfm → vocoder
MEL = Column("array", "generated mel per chunk (prompt frames dropped) [frames, 80], chunks concatenated, "
                      "flattened")
MEL_FRAMES = Column("array", "frames of `mel` per chunk", dtype="int64")


def row_seed(batch: Batch, i: int) -> int:
    """The row's `seed`, or one derived from its `id` so that reruns draw the same numbers."""
    seed = value(batch, "seed", i)
    if seed is not None:
        return int(seed)
    digest = hashlib.sha256(str(batch["id"][i]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 11  # within SEED's range


def rng_for(seed: int, stream: int, chunk: int) -> np.random.Generator:
    """The generator of one row's chunk in one stage."""
    return np.random.default_rng([seed, stream, chunk])


def split_frames(flat: np.ndarray, frames: np.ndarray, bins: int = MEL_BINS, what: str = "mel") -> list[np.ndarray]:
    """A flattened per-chunk mel column back into [frames_c, bins] arrays; ValueError if the counts do not fit."""
    frames = np.asarray(frames, dtype=np.int64).reshape(-1)
    flat = np.asarray(flat, dtype=np.float32).reshape(-1)
    if (frames < 0).any() or flat.size != int(frames.sum()) * bins:
        raise ValueError(f"{what} holds {flat.size} values, its frame counts {frames.tolist()} need "
                         f"{int(frames.clip(0).sum())} × {bins}")
    return np.split(flat.reshape(-1, bins), np.cumsum(frames)[:-1])


def join_frames(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[frames_c, bins] arrays → (flattened float32, frames per chunk)."""
    frames = np.array([len(c) for c in chunks], dtype=np.int64)
    flat = np.concatenate([np.asarray(c, np.float32).reshape(-1) for c in chunks]) if chunks else \
        np.zeros(0, np.float32)
    return flat, frames
