"""A small Llama decoder (no token embedding use, explicit KV cache) for T3.

Parameter names follow the Hugging Face layout (`layers.{i}.self_attn.q_proj.weight`,
`norm.weight`, ...) so the T3 checkpoint's `tfmr.*` tensors load unchanged.

Everything that depends on a sequence length is computed from tensors
(cumsum over `ones_like`, comparisons, `where`) so that a traced ONNX graph keeps
batch, sequence and past length dynamic; there is no Python arithmetic on shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # llama3 RoPE scaling
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max_positions: int


def llama3_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse RoPE frequencies with llama3 scaling, float32, as HF computes them."""
    dim = cfg.head_dim
    # float32 arithmetic throughout, like transformers' rope init
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (cfg.rope_theta ** exps)
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, S, head_dim] for int64 positions [B, S]."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [B, S, D/2]
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """Rotate pairs (i, i+half) of the last axis (`half` = head_dim / 2, a model constant)."""
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_bias(attention_mask: torch.Tensor, position_ids: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal + padding bias [B, 1, S, P+S].

    `attention_mask` [B, P+S] marks real (1) and padding (0) positions of the whole
    sequence (cached past then the S new positions); `position_ids` [B, S] is only
    used for its shape.  Query s sits at key index P+s and may see keys 0..P+s that
    are not padding.  Blocked entries get the dtype's most negative finite value (not
    -inf), so a fully padded query row gives a finite uniform softmax instead of NaN.
    """
    key_idx = torch.cumsum(torch.ones_like(attention_mask), dim=1) - 1          # [B, T]
    new_idx = torch.cumsum(torch.ones_like(position_ids), dim=1) - 1            # [B, S]
    query_idx = new_idx + (key_idx[:, -1:] - new_idx[:, -1:])                   # P + s
    allowed = (key_idx.unsqueeze(1) <= query_idx.unsqueeze(2)) & (attention_mask.unsqueeze(1) != 0)
    zero = torch.zeros((), dtype=dtype)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, blocked).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)  # [B, n, S, D]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past: KV) -> tuple[torch.Tensor, KV]:
        """-> (attention output, the S new positions' (key, value) [B, KV, S, D]).

        The past and the new keys are attended to separately, never concatenated: a caller that
        keeps the cache in a preallocated buffer passes the buffer as `past` and writes the new
        positions into it, so a decode step reads the cache once and copies none of it.
        """
        half = self.head_dim // 2
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), cos, sin, half)
        k = apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin, half)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        past_k, past_v = past
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k_all, v_all = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            past_k, past_v = past_k.repeat_interleave(rep, dim=1), past_v.repeat_interleave(rep, dim=1)
        else:
            k_all, v_all = k, v
        # One softmax over [past | new] keys; the weights are split at the past length (traced, so it
        # stays dynamic in the graph) and each block meets its own values.
        length = past_k.shape[2]
        scores = torch.cat((torch.matmul(q, past_k.transpose(-1, -2)), torch.matmul(q, k_all.transpose(-1, -2))),
                           dim=-1) * self.scale + bias
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs[..., :length], past_v) + torch.matmul(probs[..., length:], v_all)
        out = out.transpose(1, 2).flatten(2)
        return self.o_proj(out), (k, v)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, bias, past: KV) -> tuple[torch.Tensor, KV]:
        h, new = self.self_attn(self.input_layernorm(x), cos, sin, bias, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new


class LlamaModel(nn.Module):
    """Decoder stack over given input embeddings; returns the final-normed hidden states."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        # Present in the checkpoint, never used: inputs arrive as embeddings.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", llama3_inv_freq(cfg), persistent=False)

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[KV]:
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                for _ in range(self.cfg.num_layers)]

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: list[KV]) -> tuple[torch.Tensor, list[KV]]:
        """inputs_embeds [B,S,H], attention_mask [B,P+S], position_ids [B,S], past: per layer
        (key, value) [B,KV,P,D] -> (hidden [B,S,H], the new positions' (key, value) [B,KV,S,D] per layer)."""
        inv_freq = self.inv_freq.to(inputs_embeds.device)
        cos, sin = rope_cos_sin(position_ids, inv_freq)
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        bias = attention_bias(attention_mask, position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        new = []
        for layer, layer_past in zip(self.layers, past):
            x, kv = layer(x, cos, sin, bias, layer_past)
            new.append(kv)
        return self.norm(x), new
