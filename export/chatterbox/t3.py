"""T3: Chatterbox's text -> speech-token model, as four exportable graphs.

The module's state dict matches the official `t3_cfg.safetensors` (names and
shapes; loads with strict=True).  The computation follows chatterbox-tts 0.1.7
in eval mode:

* conditioning prefix = [speaker Linear (1), Perceiver over the prompt's speech
  embeddings incl. speech positions 0..L-1 (32), emotion_adv_fc(exaggeration) (1)];
* text embeddings incl. learned text positions 0..T-1;
* speech embeddings at caller-given speech positions;
* a Llama backbone (llama.py) over input embeddings with an explicit KV cache,
  then `speech_head` over the final-normed hidden states.

Graphs (contract in docs/architecture.md, "the graph contract"): t3_cond, t3_text_embed,
t3_speech_embed, t3_lm, and t3_lm_step: the same LM returning only the new positions'
keys and values, which the runtime writes into a preallocated cache (no copy per step).
See `graph_specs`.

One extension of the contract: a negative id in `text_tokens` gives a zero token
embedding (the position embedding is still added).  That is the unconditional CFG
row of the official loop, which zeroes the token embeddings before adding text
positions.  Valid ids are unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from export.chatterbox.llama import KV, LlamaConfig, LlamaModel
from export.chatterbox.spec import GraphSpec, Inputs, Tolerance


@dataclass
class T3Config:
    """T3 sizes; defaults are the released English model."""

    num_layers: int = 30
    hidden_size: int = 1024
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    backbone_vocab_size: int = 8            # tfmr.embed_tokens, unused
    text_vocab_size: int = 704              # 2454 for the multilingual model
    speech_vocab_size: int = 8194
    max_text_tokens: int = 2048             # text position table = max_text_tokens + 2
    max_speech_tokens: int = 4096           # speech position table = max_speech_tokens + 4
    start_text_token: int = 255
    stop_text_token: int = 0
    start_speech_token: int = 6561
    stop_speech_token: int = 6562
    speaker_embed_size: int = 256
    prompt_len: int = 150                   # speech-token prompt length (at most)
    perceiver_queries: int = 32
    perceiver_heads: int = 4

    @property
    def cond_len(self) -> int:
        return 1 + self.perceiver_queries + 1

    @property
    def text_positions(self) -> int:
        return self.max_text_tokens + 2

    @property
    def speech_positions(self) -> int:
        return self.max_speech_tokens + 4

    def llama(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.backbone_vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_factor=self.rope_factor, rope_low_freq_factor=self.rope_low_freq_factor,
            rope_high_freq_factor=self.rope_high_freq_factor,
            rope_original_max_positions=self.rope_original_max_positions)

    def __post_init__(self) -> None:
        if self.hidden_size % self.perceiver_heads:
            raise ValueError("T3Config: hidden_size must be divisible by perceiver_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("T3Config: num_heads must be a multiple of num_kv_heads")
        if self.head_dim % 2:
            raise ValueError("T3Config: head_dim must be even (RoPE)")
        if self.prompt_len > self.speech_positions:
            raise ValueError("T3Config: prompt_len exceeds the speech position table")
        if max(self.start_speech_token, self.stop_speech_token) >= self.speech_vocab_size:
            raise ValueError("T3Config: start/stop speech tokens outside speech_vocab_size")


class LearnedPositions(nn.Module):
    """A learned position table (`<name>.emb.weight`)."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(n, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.emb(positions)


def _arange_like(tokens: torch.Tensor) -> torch.Tensor:
    """0..T-1 along axis 1, shaped like `tokens` [B, T] (dynamic, no shape reads)."""
    return torch.cumsum(torch.ones_like(tokens), dim=1) - 1


class PerceiverAttention(nn.Module):
    """Pre-LayerNorm multi-head attention with a residual on the query stream."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # the same LayerNorm is applied to both streams
        q = self._split(self.to_q(self.norm(queries)))
        ctx = self.norm(context)
        k = self._split(self.to_k(ctx))
        v = self._split(self.to_v(ctx))
        probs = F.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).flatten(2)
        return queries + self.proj_out(out)


class Perceiver(nn.Module):
    """Learned queries cross-attend to the prompt, then self-attend (one shared block)."""

    def __init__(self, queries: int, dim: int, heads: int):
        super().__init__()
        self.pre_attention_query = nn.Parameter(torch.zeros(1, queries, dim))
        bound = (3.0 ** 0.5) * (2.0 / (2 * queries)) ** 0.5
        nn.init.uniform_(self.pre_attention_query, -bound, bound)
        self.attn = PerceiverAttention(dim, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # broadcast the [1, Q, D] queries to h's batch without reading its shape
        queries = self.pre_attention_query + torch.zeros_like(h[:, :1, :1])
        x = self.attn(queries, h)
        return self.attn(x, x)


class CondEncoder(nn.Module):
    def __init__(self, cfg: T3Config):
        super().__init__()
        self.spkr_enc = nn.Linear(cfg.speaker_embed_size, cfg.hidden_size)
        self.emotion_adv_fc = nn.Linear(1, cfg.hidden_size, bias=False)
        self.perceiver = Perceiver(cfg.perceiver_queries, cfg.hidden_size, cfg.perceiver_heads)

    def forward(self, speaker_emb: torch.Tensor, prompt_speech_emb: torch.Tensor,
                exaggeration: torch.Tensor) -> torch.Tensor:
        spk = self.spkr_enc(speaker_emb).unsqueeze(1)                 # [B, 1, D]
        prompt = self.perceiver(prompt_speech_emb)                    # [B, Q, D]
        emo = self.emotion_adv_fc(exaggeration.reshape(-1, 1, 1))     # [B, 1, D]
        return torch.cat((spk, prompt, emo), dim=1)


class T3(nn.Module):
    def __init__(self, cfg: T3Config | None = None):
        super().__init__()
        cfg = cfg or T3Config()
        self.cfg = cfg
        d = cfg.hidden_size
        self.tfmr = LlamaModel(cfg.llama())
        self.cond_enc = CondEncoder(cfg)
        self.text_emb = nn.Embedding(cfg.text_vocab_size, d)
        self.speech_emb = nn.Embedding(cfg.speech_vocab_size, d)
        self.text_pos_emb = LearnedPositions(cfg.text_positions, d)
        self.speech_pos_emb = LearnedPositions(cfg.speech_positions, d)
        self.text_head = nn.Linear(d, cfg.text_vocab_size, bias=False)   # in the checkpoint, unused
        self.speech_head = nn.Linear(d, cfg.speech_vocab_size, bias=False)

    # --- the four graph computations -------------------------------------------------
    def cond_embeds(self, speaker_emb: torch.Tensor, prompt_tokens: torch.Tensor,
                    exaggeration: torch.Tensor) -> torch.Tensor:
        """speaker_emb [B,256], prompt_tokens [B,L] (L >= 1), exaggeration [B] -> [B, 34, D]."""
        prompt = self.speech_emb(prompt_tokens) + self.speech_pos_emb(_arange_like(prompt_tokens))
        return self.cond_enc(speaker_emb, prompt, exaggeration)

    def text_embeds(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """text_tokens [B,T] -> [B,T,D] incl. positions 0..T-1; ids < 0 embed as zero + position."""
        keep = (text_tokens >= 0).unsqueeze(-1).to(self.text_emb.weight.dtype)
        tok = self.text_emb(text_tokens.clamp(min=0)) * keep
        return tok + self.text_pos_emb(_arange_like(text_tokens))

    def speech_embeds(self, speech_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.speech_emb(speech_tokens) + self.speech_pos_emb(positions)

    def lm_step(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """-> (speech logits [B,S,V], the new positions' (key, value) [B,KV,S,D] per layer)."""
        hidden, new = self.tfmr(inputs_embeds, attention_mask, position_ids, past)
        return self.speech_head(hidden), new

    def lm(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
           position_ids: torch.Tensor, past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """-> (speech logits, the whole cache: past then new, [B,KV,P+S,D] per layer)."""
        logits, new = self.lm_step(inputs_embeds, attention_mask, position_ids, past)
        return logits, [(torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)) for (pk, pv), (k, v) in zip(past, new)]

    # --- reference helpers ------------------------------------------------------------
    def prefill_embeds(self, speaker_emb: torch.Tensor, prompt_tokens: torch.Tensor,
                       exaggeration: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """The official prefill for rows of equal text length: [cond (34), text (T),
        start-speech at speech position 0, start-speech again at position 0] -> [B, 34+T+2, D].
        `text_tokens` should already carry the start/stop text tokens."""
        cond = self.cond_embeds(speaker_emb, prompt_tokens, exaggeration)
        text = self.text_embeds(text_tokens)
        start = torch.full_like(text_tokens[:, :2], self.cfg.start_speech_token)
        speech = self.speech_embeds(start, torch.zeros_like(start))
        return torch.cat((cond, text, speech), dim=1)


def seeded_init(model: T3, seed: int = 0, speech_head_std: float = 1.0, embed_std: float = 0.3,
                linear_gain: float = 1.0) -> T3:
    """Deterministic random weights for tiny test bundles.

    Linear weights ~ U(±linear_gain/sqrt(fan_in)) (PyTorch's default at gain 1), biases
    small, token embeddings ~ N(0, embed_std²), position tables ~ N(0, (embed_std/2)²),
    norms at 1, and `speech_head` ~ N(0, speech_head_std²).  The defaults make the tiny
    model's speech logits peaky (std ~8 over 8194 ids: clear greedy choices, no
    near-ties) and its greedy tokens depend on the context (rows with different text
    decode differently), so that token-level checks can fail.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "speech_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * speech_head_std)
            elif name.endswith("pos_emb.emb.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * embed_std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * 0.02)
            elif name in ("text_emb.weight", "speech_emb.weight", "tfmr.embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * embed_std)
            elif p.dim() == 2:
                bound = linear_gain * p.shape[1] ** -0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            else:
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * 0.3)
    return model.eval()


# --- graph wrappers ----------------------------------------------------------------------
class _CondGraph(nn.Module):
    def __init__(self, model: T3):
        super().__init__()
        self.model = model

    def forward(self, speaker_emb, prompt_tokens, exaggeration):
        return self.model.cond_embeds(speaker_emb, prompt_tokens, exaggeration)


class _TextEmbedGraph(nn.Module):
    def __init__(self, model: T3):
        super().__init__()
        self.model = model

    def forward(self, text_tokens):
        return self.model.text_embeds(text_tokens)


class _SpeechEmbedGraph(nn.Module):
    def __init__(self, model: T3):
        super().__init__()
        self.model = model

    def forward(self, speech_tokens, positions):
        return self.model.speech_embeds(speech_tokens, positions)


class LMGraph(nn.Module):
    """Flat-argument wrapper: (inputs_embeds, attention_mask, position_ids, k0, v0, k1, ...)
    -> (logits, k0, v0, k1, ...): the whole cache (t3_lm) or only the new positions (t3_lm_step)."""

    def __init__(self, model: T3, step: bool = False):
        super().__init__()
        self.model = model
        self.step = step

    def forward(self, inputs_embeds, attention_mask, position_ids, *past_flat):
        past = list(zip(past_flat[0::2], past_flat[1::2]))
        run = self.model.lm_step if self.step else self.model.lm
        logits, cache = run(inputs_embeds, attention_mask, position_ids, past)
        return (logits, *[t for kv in cache for t in kv])


def lm_io_names(cfg: T3Config, step: bool = False) -> tuple[list[str], list[str]]:
    """t3_lm: the cache out is `present.*` (past + new); t3_lm_step: `new.*` (the new positions only)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(cfg.num_layers) for kv in ("key", "value")]
    out = [f"{'new' if step else 'present'}.{i}.{kv}" for i in range(cfg.num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *out]


LM_TOLERANCE = Tolerance(atol=1e-3, rtol=1e-3)


def lm_spec(model: T3, cfg: T3Config, past_len: int = 3, step: bool = False) -> GraphSpec:
    """The t3_lm spec (`step`: t3_lm_step, which returns only the new positions' cache).

    `make_batch` builds a cached step: a fully valid past of
    `past_len` positions plus S = max(lengths) new positions, RIGHT-padded per row
    (so the generic verify_graph applies: causal attention never lets a real position
    see a later pad).  Left-padded batched decoding is checked by lm_verify.verify_lm.
    Traced with past_len 3 so that the past length is not baked in."""
    inputs, outputs = lm_io_names(cfg, step)
    kvh, hd, d = cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "sequence" if step else "total"}

    def make_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        b, s = len(lengths), max(lengths)
        batch: Inputs = {
            "inputs_embeds": rng.standard_normal((b, s, d)).astype(np.float32),
            "attention_mask": np.concatenate(
                [np.ones((b, past_len), np.int64),
                 (np.arange(s)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)], axis=1),
            "position_ids": np.broadcast_to(past_len + np.arange(s, dtype=np.int64), (b, s)).copy(),
        }
        for name in inputs[3:]:
            batch[name] = rng.standard_normal((b, kvh, past_len, hd)).astype(np.float32)
        return batch

    def take_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        n = lengths[i]
        row = {
            "inputs_embeds": batch["inputs_embeds"][i:i + 1, :n],
            "attention_mask": batch["attention_mask"][i:i + 1, :past_len + n],
            "position_ids": batch["position_ids"][i:i + 1, :n],
        }
        for name in inputs[3:]:
            row[name] = batch[name][i:i + 1]
        return {k: np.ascontiguousarray(v) for k, v in row.items()}

    return GraphSpec(
        name="t3_lm_step" if step else "t3_lm", module=LMGraph(model, step).eval(), input_names=inputs,
        output_names=outputs,
        dynamic_axes=axes, make_batch=make_batch, take_row=take_row,
        trace_lengths=[5, 3], verify_lengths=[4, 7, 1], tolerance=LM_TOLERANCE)


def graph_specs(model: T3, cfg: T3Config) -> list[GraphSpec]:
    """t3_cond, t3_text_embed, t3_speech_embed, t3_lm, t3_lm_step (see the module docstring)."""
    model.eval()

    # t3_cond has no prompt mask: every row of a batch has the same prompt length,
    # max(lengths); `lengths` only sets the batch size (and that common length).
    def cond_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        b, n = len(lengths), max(lengths)
        spk = rng.standard_normal((b, cfg.speaker_embed_size)).astype(np.float32)
        spk /= np.linalg.norm(spk, axis=1, keepdims=True)
        return {"speaker_emb": spk,
                "prompt_tokens": rng.integers(0, cfg.start_speech_token, (b, n), dtype=np.int64),
                "exaggeration": rng.uniform(0.25, 2.0, b).astype(np.float32)}

    def cond_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        return {k: np.ascontiguousarray(v[i:i + 1]) for k, v in batch.items()}

    def text_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        b, t = len(lengths), max(lengths)
        tokens = np.full((b, t), cfg.stop_text_token, np.int64)
        for i, n in enumerate(lengths):
            tokens[i, :n] = rng.integers(0, cfg.text_vocab_size, n)
            tokens[i, 0] = cfg.start_text_token
        return {"text_tokens": tokens}

    def text_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        return {"text_tokens": np.ascontiguousarray(batch["text_tokens"][i:i + 1, :lengths[i]])}

    def speech_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        b, s = len(lengths), max(lengths)
        tokens = np.zeros((b, s), np.int64)
        positions = np.zeros((b, s), np.int64)
        for i, n in enumerate(lengths):
            tokens[i, :n] = rng.integers(0, cfg.speech_vocab_size, n)
            start = rng.integers(0, cfg.speech_positions - n)
            positions[i, :n] = start + np.arange(n)
        return {"speech_tokens": tokens, "positions": positions}

    def speech_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        return {k: np.ascontiguousarray(v[i:i + 1, :lengths[i]]) for k, v in batch.items()}

    return [
        GraphSpec(
            name="t3_cond", module=_CondGraph(model).eval(),
            input_names=["speaker_emb", "prompt_tokens", "exaggeration"],
            output_names=["cond_embeds"],
            dynamic_axes={"speaker_emb": {0: "batch"}, "prompt_tokens": {0: "batch", 1: "prompt"},
                          "exaggeration": {0: "batch"}, "cond_embeds": {0: "batch"}},
            make_batch=cond_batch, take_row=cond_row,
            trace_lengths=[cfg.prompt_len] * 2, verify_lengths=[cfg.prompt_len] * 3),
        GraphSpec(
            name="t3_text_embed", module=_TextEmbedGraph(model).eval(),
            input_names=["text_tokens"], output_names=["text_embeds"],
            dynamic_axes={"text_tokens": {0: "batch", 1: "text"},
                          "text_embeds": {0: "batch", 1: "text"}},
            make_batch=text_batch, take_row=text_row,
            trace_lengths=[9, 6], verify_lengths=[4, 13, 2]),
        GraphSpec(
            name="t3_speech_embed", module=_SpeechEmbedGraph(model).eval(),
            input_names=["speech_tokens", "positions"], output_names=["speech_embeds"],
            dynamic_axes={"speech_tokens": {0: "batch", 1: "sequence"},
                          "positions": {0: "batch", 1: "sequence"},
                          "speech_embeds": {0: "batch", 1: "sequence"}},
            make_batch=speech_batch, take_row=speech_row,
            trace_lengths=[5, 3], verify_lengths=[1, 7, 4]),
        lm_spec(model, cfg, past_len=3),
        lm_spec(model, cfg, past_len=3, step=True),
    ]
