"""T3: text → S3 speech tokens, every request of the actor in one continuous-batching decode loop."""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from actors.bundle import Bundle
from actors.errors import ConfigError
from actors.chatterbox import columns as C
from actors.chatterbox.decode import DecodeLoop, Request, T3Graphs, cache_names
from actors.chatterbox.sampling import Sampler, SamplingParams
from actors.chatterbox.text import TextTokenizer, chunk_text
from actors.rows import Batch, RowStatus
from actors.stage import Column, Stage, StageOptions

UNCOND_TEXT_ID = -1
"""Embeds as zero plus its position: the official unconditional CFG row zeroes the text embeddings."""

# Per-row generation parameters (manifest columns), in the official `generate` order; defaults from bundle.json.
PARAMETERS = {
    "temperature": Column("float", "sampling temperature; 0 = greedy", optional=True, ge=0, le=5),
    "top_p": Column("float", "nucleus sampling mass", optional=True, gt=0, le=1),
    "min_p": Column("float", "drop tokens below min_p × the top probability", optional=True, ge=0, le=1),
    "repetition_penalty": Column("float", "penalty on already generated tokens", optional=True, ge=1, le=10),
    "cfg_weight": Column("float", "classifier-free guidance weight", optional=True, ge=0, le=10),
    "exaggeration": Column("float", "emotion exaggeration", optional=True, ge=0, le=5),
    "max_new_tokens": Column("int", "speech tokens per text chunk at most (25 per second)", optional=True,
                             ge=1, le=4000),
}


class T3Options(StageOptions):
    max_chunk_chars: int = Field(300, ge=20, le=5000)
    """Longer texts are split into sentences packed into chunks of at most this many characters."""
    max_rows: int = Field(32, ge=2)
    """Rows in the decode batch at most (two per utterance: conditional and unconditional)."""
    prefill_rows: int = Field(8, ge=2)
    """Rows per prefill call when waiting utterances join the batch."""
    lm: Literal["fp32", "int8"] = "fp32"
    """int8: the bundle's dynamically quantized step graph (`t3_lm_step_int8`, checked against fp32 at
    export; `python -m export.chatterbox` writes it for fp32 bundles), for CPUs with fast int8 dot products.
    Its activations are quantized per batch, so a row's tokens may depend on its batch: fp32 repeats exactly."""


class T3(Stage):
    """Text and voice → speech tokens per row (chunks in order), sampled per row with its own seed."""

    name = "t3"
    family = "chatterbox"
    Options = T3Options
    graphs = ("t3_cond", "t3_text_embed", "t3_speech_embed", "t3_lm_step")
    requires = {
        "text": Column("str", "text to speak"),
        **{k: C.VOICE[k] for k in ("t3_speaker_emb", "t3_prompt_tokens")},
        **PARAMETERS,
        "seed": C.SEED,
    }
    provides = {"speech_tokens": C.SPEECH_TOKENS, "chunk_tokens": C.CHUNK_TOKENS}
    drops = ("t3_speaker_emb", "t3_prompt_tokens")

    def __init__(self, bundle: Bundle, **kwargs: Any) -> None:
        model = bundle.manifest["model"]
        self.tokens = model["tokens"]
        self.t3 = model["t3"]
        self.speaker_dim = int(model["config"]["t3"]["speaker_embed_size"])
        self.defaults = bundle.generation.get("t3", {})
        super().__init__(bundle, **kwargs)
        self.tokenizer = TextTokenizer(bundle)
        self.graph = T3Graphs(self.sessions["t3_lm_step"], self.sessions["t3_speech_embed"], self.t3["num_layers"],
                              self.t3["num_kv_heads"], self.t3["head_dim"])
        start = np.array([[self.tokens["start_speech"]]], np.int64)
        self.start_embed = self.graph.embed_tokens(start, np.zeros_like(start))[0]  # [1, hidden]
        self.loop = DecodeLoop(self.graph, self.options.max_rows, self.options.prefill_rows)

    def bundle_graph(self, graph: str) -> str:
        if graph != "t3_lm_step" or self.options.lm == "fp32":
            return graph
        if "t3_lm_step_int8" not in self.bundle.manifest["graphs"]:
            raise ConfigError(f"stage {self.name!r}: lm int8 needs the bundle's t3_lm_step_int8 graph, which "
                              f"{self.bundle.path} lacks; re-export it (python -m export.chatterbox writes it for "
                              "fp32 bundles) or set lm: fp32")
        return "t3_lm_step_int8"

    def batch_stats(self) -> dict[str, float]:
        loop = self.loop
        return {**super().batch_stats(), "decode_steps": loop.steps,
                "rows_per_step": round(loop.step_rows / max(loop.steps, 1), 2)}

    def params(self, batch: Batch, i: int) -> tuple[SamplingParams, float]:
        """Row i's sampling parameters and exaggeration (manifest value, else the bundle's default)."""
        v = {k: self.row_value(batch, k, i, self.defaults.get(k)) for k in PARAMETERS}
        limit = int(self.t3["speech_positions"]) - 4
        if v["max_new_tokens"] > limit:
            raise ValueError(f"max_new_tokens={v['max_new_tokens']} is more than this model's {limit}")
        return SamplingParams(**{k: v[k] for k in PARAMETERS if k != "exaggeration"}), float(v["exaggeration"])

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        n = len(batch["text"])
        requests: dict[int, list[Request]] = {}
        conds: dict[tuple, np.ndarray] = {}  # rows of one voice and exaggeration share their prefix
        for i in range(n):
            try:
                requests[i] = self.requests(batch, i, conds)
            except ValueError as e:
                rows.fail(i, f"{self.name}: {e}")
        self.loop.submit([r for rs in requests.values() for r in rs])
        tokens, chunks = self.provides["speech_tokens"].fill(n), self.provides["chunk_tokens"].fill(n)
        for i, rs in requests.items():
            per_chunk = [np.array(r.future.result(), dtype=np.int64) for r in rs]
            per_chunk = [t[t < self.tokens["speech_vocab_size"]] for t in per_chunk]
            if not sum(len(t) for t in per_chunk):
                rows.fail(i, f"{self.name}: no speech tokens were generated (the first token was the stop token)")
                continue
            tokens[i] = np.concatenate(per_chunk).astype(np.int32)
            chunks[i] = np.array([len(t) for t in per_chunk], dtype=np.int64)
        return {"speech_tokens": tokens, "chunk_tokens": chunks}

    def requests(self, batch: Batch, i: int, conds: dict[tuple, np.ndarray]) -> list[Request]:
        """Row i's chunks as decode requests: prefill embeddings and a seeded sampler each."""
        text = self.row_value(batch, "text", i)
        if not text.strip():
            raise ValueError("text is empty")
        params, exaggeration = self.params(batch, i)
        seed = C.row_seed(batch, i)
        speaker, prompt = batch["t3_speaker_emb"][i], batch["t3_prompt_tokens"][i]
        key = (np.asarray(speaker).tobytes(), np.asarray(prompt).tobytes(), exaggeration)
        if key not in conds:
            conds[key] = self.cond_embeds(speaker, prompt, exaggeration)
        cond = conds[key]
        out = []
        for k, chunk in enumerate(chunk_text(text, self.options.max_chunk_chars)):
            sampler = Sampler(params, C.rng_for(seed, C.T3_STREAM, k), self.tokens["start_speech"],
                              self.tokens["stop_speech"])
            out.append(Request(self.prefix(cond, self.tokenizer.encode(chunk)), sampler))
        return out

    def cond_embeds(self, speaker_emb: np.ndarray, prompt_tokens: np.ndarray, exaggeration: float) -> np.ndarray:
        """[cond_len, hidden]: speaker, perceiver over the prompt tokens, exaggeration."""
        feeds = {"speaker_emb": np.asarray(speaker_emb, np.float32)[None],
                 "prompt_tokens": np.asarray(prompt_tokens, np.int64)[None],
                 "exaggeration": np.array([exaggeration], np.float32)}
        return self.sessions["t3_cond"].run(feeds, ["cond_embeds"])[0][0]

    def prefix(self, cond: np.ndarray, text_ids: np.ndarray) -> np.ndarray:
        """[2, length, hidden]: conditioning, text (blanked in the unconditional row), start-speech twice,
        as the official loop builds it (both start embeddings at speech position 0)."""
        ids = np.stack([text_ids, np.full_like(text_ids, UNCOND_TEXT_ID)])
        text = self.sessions["t3_text_embed"].run({"text_tokens": ids}, ["text_embeds"])[0]
        start = np.repeat(self.start_embed[None], 2, axis=0)
        return np.concatenate([np.repeat(cond[None], 2, axis=0), text, start, start], axis=1).astype(np.float32)

    def probe_feeds(self, graph: str) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        hidden = int(self.t3["hidden_size"])
        if graph == "t3_cond":
            emb = rng.standard_normal((1, self.speaker_dim)).astype(np.float32)
            return {"speaker_emb": emb / np.linalg.norm(emb),
                    "prompt_tokens": rng.integers(0, self.tokens["speech_vocab_size"], (1, 150)),
                    "exaggeration": np.array([0.5], np.float32)}
        if graph == "t3_text_embed":
            return {"text_tokens": rng.integers(1, 200, (1, 12))}
        if graph == "t3_speech_embed":
            return {"speech_tokens": rng.integers(0, self.tokens["speech_vocab_size"], (1, 4)),
                    "positions": np.arange(4)[None]}
        shape = (2, self.t3["num_kv_heads"], 0, self.t3["head_dim"])
        return {"inputs_embeds": rng.standard_normal((2, 16, hidden)).astype(np.float32) * 0.3,
                "attention_mask": np.ones((2, 16), np.int64), "position_ids": np.tile(np.arange(16), (2, 1)),
                **{name: np.zeros(shape, np.float32) for name in cache_names(self.t3["num_layers"])[0]}}
