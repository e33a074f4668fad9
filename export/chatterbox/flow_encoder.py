"""S3Gen flow, token-encoder side: speech tokens -> `mu` (50 Hz mel-rate features) and `spks`.

Parameter names follow the released `s3gen.safetensors` under `flow.` (everything
except `flow.decoder.*`, which is the CFM estimator in `cfm.py`).  The module
`FlowEncoder` *is* the `flow` container: give it a `decoder` (any module with an
`estimator` attribute, e.g. `FlowDecoder(estimator)`) and its state dict is the
whole `flow.*` section.

Computation (eval mode, dropout off):

    tokens -> input_embedding (zeroed past each row's length)
      -> encoder.embed: Linear, LayerNorm(1e-5), * sqrt(width)
      -> encoder.pre_lookahead_layer: right-pad 3, conv k=4, leaky_relu, left-pad 2, conv k=3, + residual
      -> encoder.encoders: pre-norm conformer blocks (rel-pos self-attention, SiLU FFN), no conv module
      -> encoder.up_layer: nearest x2, left-pad 4, conv k=5
      -> encoder.up_embed, encoder.up_encoders (same kinds of blocks), encoder.after_norm
      -> encoder_proj (width -> 80) = mu
    xvector -> L2 normalise -> spk_embed_affine_layer (192 -> 80) = spks

Relative positions use the ESPnet "new" encoding: a table of sin/cos rows for
relative distances T-1 ... -(T-1), projected by `linear_pos`, with the score for
query i and key j taken at distance i-j.  The table is built from the runtime
length with tensor operations (no precomputed slice, no shape arithmetic in
Python), so exported graphs work at any length.

Padding: the only place where a right-padded row could see its padding is the
look-ahead convolution (each frame sees the next 3 frames).  The released code
feeds it unmasked frames; run on one unpadded utterance the frames past the end
are the convolution's zero padding.  We zero the padded frames before that
convolution so a padded row computes exactly what it computes alone.  Attention
masks padded keys; the upsampling convolution is causal.  `mu` is zeroed past
each row's `mel_lengths`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from export.chatterbox.spec import GraphSpec, Inputs, Tolerance


@dataclass
class FlowEncoderConfig:
    """Sizes of the flow's token encoder; defaults are the released model's."""

    vocab_size: int = 6561          # speech tokens (3^8 FSQ)
    input_size: int = 512           # token embedding width (= encoder input width)
    hidden_size: int = 512          # conformer width
    output_size: int = 80           # mel bins (mu, spks)
    spk_embed_dim: int = 192        # CAMPPlus x-vector
    num_heads: int = 8
    linear_units: int = 2048        # FFN hidden width
    num_blocks: int = 6             # conformer blocks at 25 Hz
    num_up_blocks: int = 4          # conformer blocks at 50 Hz
    pre_lookahead_len: int = 3
    token_mel_ratio: int = 2        # upsampling stride: mel frames per token
    embed_norm_eps: float = 1e-5    # LayerNorm in embed / up_embed / after_norm
    block_norm_eps: float = 1e-12   # LayerNorms inside conformer blocks

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 2:
            raise ValueError("hidden_size must be even (sin/cos position table)")


# ---------------------------------------------------------------- helpers


def _positions(x: torch.Tensor) -> torch.Tensor:
    """0..T-1 (int64) for a [B, T, ...] tensor, from its runtime length."""
    ones = torch.ones_like(x[0, :, 0], dtype=torch.int64)
    return torch.cumsum(ones, dim=0) - 1


def _rel_pos_table(pos: torch.Tensor, d_model: int) -> torch.Tensor:
    """[2T-1, d_model] sin/cos rows for relative distances T-1, T-2, ..., -(T-1).

    Row k holds distance T-1-k; even channels sin, odd channels cos, the same
    values (bit for bit in torch) as the released precomputed table.
    """
    posf = pos.to(torch.float32)
    rel = torch.cat([posf[-1:] - posf, -posf[1:]])                      # T-1 .. -(T-1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                         * -(math.log(10000.0) / d_model))
    angle = rel.unsqueeze(1) * inv_freq.unsqueeze(0)                    # [2T-1, d/2]
    table = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)   # [2T-1, d/2, 2]
    return table.flatten(1)


def _rel_index(pos: torch.Tensor) -> torch.Tensor:
    """[T, T] column of the relative table for query i and key j: T-1-i+j (distance i-j)."""
    return pos[-1:] - pos.unsqueeze(1) + pos.unsqueeze(0)


class _Context:
    """Per-rate tensors shared by the blocks: key mask, position table, gather index."""

    def __init__(self, x: torch.Tensor, lengths: torch.Tensor, d_model: int):
        pos = _positions(x)
        self.valid = pos.unsqueeze(0) < lengths.unsqueeze(1)            # [B, T] bool
        self.pos_table = _rel_pos_table(pos, d_model)                   # [2T-1, d]
        self.rel_index = _rel_index(pos)                                # [T, T]


# ---------------------------------------------------------------- modules


class RelPositionSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (ESPnet flavour)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.h = num_heads
        self.d_k = d_model // num_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.h, self.d_k)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        q = self._heads(self.linear_q(x))                                 # [B, T, H, dk]
        k = self._heads(self.linear_k(x)).transpose(1, 2)                 # [B, H, T, dk]
        v = self._heads(self.linear_v(x)).transpose(1, 2)
        p = self.linear_pos(ctx.pos_table)
        p = p.reshape(p.shape[0], self.h, self.d_k).transpose(0, 1)      # [H, 2T-1, dk]

        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        position = torch.gather(position, 3, ctx.rel_index.expand_as(content))
        scores = (content + position) / math.sqrt(self.d_k)              # [B, H, T, T]

        pad_key = ~ctx.valid[:, None, None, :]
        scores = scores.masked_fill(pad_key, -float("inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(pad_key, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2)                      # [B, T, H, dk]
        return self.linear_out(out.flatten(2))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(d_model, hidden)
        self.w_2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + FFN(LN(x)) (no macaron, no conv module)."""

    def __init__(self, cfg: FlowEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = RelPositionSelfAttention(d, cfg.num_heads)
        self.feed_forward = PositionwiseFeedForward(d, cfg.linear_units)
        self.norm_ff = nn.LayerNorm(d, eps=cfg.block_norm_eps)
        self.norm_mha = nn.LayerNorm(d, eps=cfg.block_norm_eps)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), ctx)
        return x + self.feed_forward(self.norm_ff(x))


class LinearEmbed(nn.Module):
    """`embed` / `up_embed`: Linear + LayerNorm, scaled by sqrt(width) (ESPnet rel-pos input layer)."""

    def __init__(self, idim: int, odim: int, eps: float):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=eps))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class PreLookaheadLayer(nn.Module):
    """Each frame looks `lookahead` frames ahead (conv k=lookahead+1), then a causal conv k=3; residual."""

    def __init__(self, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:             # [B, T, C], padding zeroed
        y = F.pad(x.transpose(1, 2), (0, self.lookahead))
        y = F.leaky_relu(self.conv1(y))
        y = self.conv2(F.pad(y, (2, 0)))
        return y.transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest-neighbour upsampling by `stride`, then a causal conv of kernel 2*stride+1."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, kernel_size=2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:             # [B, C, T] -> [B, C, stride*T]
        y = x.unsqueeze(-1).expand(-1, -1, -1, self.stride).flatten(2)
        return self.conv(F.pad(y, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    """`flow.encoder`: conformer at token rate, look-ahead, upsample, conformer at mel rate."""

    def __init__(self, cfg: FlowEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.d_model = d
        self.stride = cfg.token_mel_ratio
        self.embed = LinearEmbed(cfg.input_size, d, cfg.embed_norm_eps)
        self.pre_lookahead_layer = PreLookaheadLayer(d, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_blocks))
        self.up_layer = Upsample1D(d, cfg.token_mel_ratio)
        self.up_embed = LinearEmbed(d, d, cfg.embed_norm_eps)
        self.up_encoders = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=cfg.embed_norm_eps)

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xs [B, T, input_size], lengths [B] -> (h [B, stride*T, d], lengths*stride, valid [B, stride*T])."""
        ctx = _Context(xs, lengths, self.d_model)
        xs = self.embed(xs)
        xs = xs * ctx.valid.unsqueeze(-1).to(xs.dtype)       # look-ahead must see zeros past the end
        xs = self.pre_lookahead_layer(xs)
        for block in self.encoders:
            xs = block(xs, ctx)

        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)
        lengths = lengths * self.stride
        ctx = _Context(xs, lengths, self.d_model)
        xs = self.up_embed(xs)
        for block in self.up_encoders:
            xs = block(xs, ctx)
        return self.after_norm(xs), lengths, ctx.valid


class FlowDecoder(nn.Module):
    """Holder that gives a CFM estimator its released name, `flow.decoder.estimator.*`."""

    def __init__(self, estimator: nn.Module):
        super().__init__()
        self.estimator = estimator


class FlowEncoder(nn.Module):
    """`flow`: token embedding, speaker projection, encoder, projection to mel width.

    Pass `decoder` (a module with an `estimator` attribute, e.g. `FlowDecoder(est)`)
    to hold the CFM estimator too; then `state_dict()` is the whole `flow.*` section.
    """

    def __init__(self, cfg: FlowEncoderConfig | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FlowEncoderConfig()
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.hidden_size, cfg.output_size)
        if decoder is not None:
            self.decoder = decoder

    def speaker(self, xvector: torch.Tensor) -> torch.Tensor:
        """x-vector [B, 192] -> spks [B, 80] (L2-normalised first, eps 1e-12 like F.normalize)."""
        norm = torch.linalg.vector_norm(xvector, dim=1, keepdim=True).clamp_min(1e-12)
        return self.spk_embed_affine_layer(xvector / norm)

    def encode(self, tokens: torch.Tensor, token_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] int64, lengths [B] -> mu [B, 80, ratio*T] (zero past mel_lengths), mel_lengths [B]."""
        valid = _positions(tokens.unsqueeze(-1)).unsqueeze(0) < token_lengths.unsqueeze(1)
        tokens = tokens.clamp(0, self.cfg.vocab_size - 1)        # ids in padding may be anything
        emb = self.input_embedding(tokens) * valid.unsqueeze(-1).to(self.input_embedding.weight.dtype)
        h, mel_lengths, mel_valid = self.encoder(emb, token_lengths)
        mu = self.encoder_proj(h) * mel_valid.unsqueeze(-1).to(h.dtype)
        return mu.transpose(1, 2), mel_lengths

    def forward(self, tokens: torch.Tensor, token_lengths: torch.Tensor,
                xvector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, mel_lengths = self.encode(tokens, token_lengths)
        return mu, mel_lengths, self.speaker(xvector)


def build_flow_encoder(section: dict | None = None, decoder: nn.Module | None = None) -> FlowEncoder:
    """`FlowEncoder` from a preset's `flow` section (see configs/chatterbox/*.yaml)."""
    from export.chatterbox.config import build_config
    return FlowEncoder(build_config(FlowEncoderConfig, section), decoder=decoder)


# ---------------------------------------------------------------- graph contract


class S3GenEncoderGraph(nn.Module):
    """`s3gen_encoder`: tokens, token_lengths, xvector -> mu, mel_lengths, spks."""

    def __init__(self, flow: FlowEncoder):
        super().__init__()
        self.flow = flow

    def forward(self, tokens: torch.Tensor, token_lengths: torch.Tensor, xvector: torch.Tensor):
        mu, mel_lengths = self.flow.encode(tokens, token_lengths)
        return mu, mel_lengths, self.flow.speaker(xvector)


def graph_specs(model: FlowEncoder, cfg: FlowEncoderConfig | None = None) -> list[GraphSpec]:
    """The bundle graphs this module provides: `s3gen_encoder`."""
    cfg = cfg or model.cfg

    def make_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        n, t = len(lengths), max(lengths)
        tokens = np.zeros((n, t), dtype=np.int64)
        for i, length in enumerate(lengths):
            tokens[i, :length] = rng.integers(0, cfg.vocab_size, size=length)
        return {
            "tokens": tokens,
            "token_lengths": np.asarray(lengths, dtype=np.int64),
            "xvector": rng.standard_normal((n, cfg.spk_embed_dim)).astype(np.float32),
        }

    def take_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        return {
            "tokens": np.ascontiguousarray(batch["tokens"][i:i + 1, :lengths[i]]),
            "token_lengths": batch["token_lengths"][i:i + 1].copy(),
            "xvector": batch["xvector"][i:i + 1].copy(),
        }

    return [GraphSpec(
        name="s3gen_encoder",
        module=S3GenEncoderGraph(model),
        input_names=["tokens", "token_lengths", "xvector"],
        output_names=["mu", "mel_lengths", "spks"],
        dynamic_axes={
            "tokens": {0: "batch", 1: "tokens"},
            "token_lengths": {0: "batch"},
            "xvector": {0: "batch"},
            "mu": {0: "batch", 2: "frames"},
            "mel_lengths": {0: "batch"},
            "spks": {0: "batch"},
        },
        make_batch=make_batch,
        take_row=take_row,
        trace_lengths=[9, 6],
        # Longer and shorter than traced, a length-1 row, batch of 4.
        verify_lengths=[23, 1, 12, 17],
        tolerance=Tolerance(atol=5e-4, rtol=1e-3),
        exact_outputs=("mel_lengths",),
    )]
