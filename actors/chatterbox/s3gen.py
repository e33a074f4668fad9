"""S3Gen's token encoder: prompt + generated speech tokens of each chunk → `mu` (mel rate) and `spks`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from actors.bundle import Bundle
from actors.chatterbox import columns
from actors.chatterbox.batching import length_groups, model_config, pad_last
from actors.rows import Batch, RowStatus
from actors.stage import Stage, StageOptions


class EncoderOptions(StageOptions):
    max_batch_rows: int = Field(16, ge=1, le=1024)
    """Chunks per graph call."""
    max_padding_ratio: float = Field(1.25, ge=1, le=10)
    """A call's longest chunk (prompt + chunk tokens) is at most this many times its shortest."""


@dataclass
class _Unit:
    row: int
    chunk: int
    tokens: np.ndarray
    """Prompt tokens, then the chunk's tokens (as the official flow concatenates them)."""


class S3GenEncoder(Stage):
    """One `s3gen_encoder` call per chunk: `mu` [2 × (prompt + chunk tokens), 80] per chunk, `spks` per row.

    Chunks of all rows are batched right-padded with exact `token_lengths` (the graph
    masks the padding) and `mu` is cut to each chunk's `mel_lengths`. A chunk without
    tokens gets 0 frames; a row without any token fails (there is nothing to speak).
    """

    name = "s3gen_encoder"
    family = "chatterbox"
    Options = EncoderOptions
    graphs = ("s3gen_encoder",)
    requires = {
        "speech_tokens": columns.SPEECH_TOKENS,
        "chunk_tokens": columns.CHUNK_TOKENS,
        "gen_prompt_tokens": columns.VOICE["gen_prompt_tokens"],
        "gen_xvector": columns.VOICE["gen_xvector"],
    }
    provides = {"mu": columns.MU, "mu_frames": columns.MU_FRAMES, "spks": columns.SPKS}
    drops = ("chunk_tokens", "gen_prompt_tokens", "gen_xvector")

    def __init__(self, bundle: Bundle, **kwargs: Any) -> None:
        flow = model_config(bundle, "flow")
        self.vocab_size = int(flow["vocab_size"])
        self.xvector_dim = int(flow["spk_embed_dim"])
        self.bins = int(flow["output_size"])
        self.mel_ratio = int(flow["token_mel_ratio"])
        super().__init__(bundle, **kwargs)

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        n = len(batch["speech_tokens"])
        units: list[_Unit] = []
        xvectors: dict[int, np.ndarray] = {}
        chunk_counts: dict[int, int] = {}
        for i in range(n):
            try:
                chunks, prompt, xvectors[i] = self._row_inputs(batch, i)
            except ValueError as e:
                rows.fail(i, f"{self.name}: {e}")
                continue
            chunk_counts[i] = len(chunks)
            units += [_Unit(i, c, np.concatenate([prompt, tokens])) for c, tokens in enumerate(chunks) if len(tokens)]

        mus: dict[tuple[int, int], np.ndarray] = {}
        spks: dict[int, np.ndarray] = {}
        for group in length_groups([len(u.tokens) for u in units], self.options.max_batch_rows,
                                   self.options.max_padding_ratio):
            members = [units[k] for k in group]
            for u, mu, s in zip(members, *self.encode([u.tokens for u in members],
                                                      np.stack([xvectors[u.row] for u in members]))):
                mus[u.row, u.chunk] = mu
                spks[u.row] = s

        out_mu, out_frames, out_spks = (self.provides[k].fill(n) for k in ("mu", "mu_frames", "spks"))
        empty = np.zeros((0, self.bins), np.float32)
        for i, count in chunk_counts.items():
            out_mu[i], out_frames[i] = columns.join_frames([mus.get((i, c), empty) for c in range(count)])
            out_spks[i] = spks[i]
        return {"mu": out_mu, "mu_frames": out_frames, "spks": out_spks}

    def _row_inputs(self, batch: Batch, i: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(tokens per chunk, prompt tokens, x-vector) of row i; ValueError saying what is wrong."""
        tokens = np.asarray(batch["speech_tokens"][i]).reshape(-1).astype(np.int64)
        counts = np.asarray(batch["chunk_tokens"][i]).reshape(-1).astype(np.int64)
        prompt = np.asarray(batch["gen_prompt_tokens"][i]).reshape(-1).astype(np.int64)
        xvector = np.asarray(batch["gen_xvector"][i], dtype=np.float32).reshape(-1)
        if (counts < 0).any() or counts.sum() != len(tokens):
            raise ValueError(f"chunk_tokens {counts.tolist()} do not add up to the {len(tokens)} speech tokens")
        for what, ids in (("speech_tokens", tokens), ("gen_prompt_tokens", prompt)):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            if len(bad):
                raise ValueError(f"{what} holds ids outside [0, {self.vocab_size}): {bad[:5].tolist()}")
        if xvector.shape != (self.xvector_dim,) or not np.isfinite(xvector).all():
            raise ValueError(f"gen_xvector must be {self.xvector_dim} finite values, got shape {xvector.shape}")
        if not len(tokens):
            raise ValueError("no speech tokens in any chunk (T3 generated nothing to speak)")
        return np.split(tokens, np.cumsum(counts)[:-1]), prompt, xvector

    def encode(self, sequences: list[np.ndarray], xvectors: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """One padded graph call: (mu [frames, 80] per sequence, cut to its `mel_lengths`; spks [B, 80])."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        mu, mel_lengths, spks = self.sessions["s3gen_encoder"].run(
            {"tokens": pad_last(sequences, np.int64), "token_lengths": lengths, "xvector": xvectors},
            ["mu", "mel_lengths", "spks"])
        if not np.array_equal(mel_lengths, lengths * self.mel_ratio):
            raise RuntimeError(f"s3gen_encoder gave mel_lengths {mel_lengths.tolist()} for token lengths "
                               f"{lengths.tolist()} (expected × {self.mel_ratio})")
        return [np.ascontiguousarray(mu[b, :, :m].T, dtype=np.float32) for b, m in enumerate(mel_lengths)], \
            spks.astype(np.float32)

    def probe_feeds(self, graph: str) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        lengths = np.array([14, 9], dtype=np.int64)
        tokens = rng.integers(0, self.vocab_size, size=(2, 14))
        tokens[1, 9:] = 0
        return {"tokens": tokens.astype(np.int64), "token_lengths": lengths,
                "xvector": rng.standard_normal((2, self.xvector_dim)).astype(np.float32)}
