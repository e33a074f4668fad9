"""S3Gen's flow-matching decoder: the CFM estimator (a causal 1-D U-Net) and a torch Euler/CFG solver.

The estimator predicts the velocity field dx/dt of the conditional flow that
turns N(0, 1) noise into an 80-bin mel.  Its input is the current sample `x`
stacked with the encoder output `mu`, the speaker projection `spks` (repeated
over time) and the prompt-mel condition `cond`: 4 x 80 = 320 channels.

Layout (parameter names follow the released checkpoint, `flow.decoder.estimator.*`):

* `time_mlp`: sinusoidal embedding of t (scaled by 1000) -> Linear -> SiLU -> Linear.
* `down_blocks[i]`, `mid_blocks[i]`, `up_blocks[i]`: each a list of
  [causal ResNet block, transformer blocks, (resampler)].  The ResNet block is
  two (causal conv k=3 -> LayerNorm over channels -> Mish) stages with the time
  embedding added in between and a 1x1 residual conv.  The transformer blocks
  are pre-LayerNorm self-attention (no q/k/v bias) + GELU feed-forward.
* `final_block` (one more causal conv stage) and `final_proj` (1x1 conv to 80).

Padding: every convolution sees its input multiplied by the frame mask and
attention ignores masked keys, so a right-padded row yields, on its valid
frames, what the row alone yields.  The velocity is zero on masked frames.

Graph contract (`cfm_estimator.onnx`, see docs/architecture.md, "the graph contract"):
`x` [B,80,T], `mask` [B,1,T], `mu` [B,80,T], `t` [B], `spks` [B,80], `cond` [B,80,T]
-> `velocity` [B,80,T].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.chatterbox.spec import GraphSpec, Inputs, Tolerance

# Added to attention scores of masked keys (the released model's value).
MASKED_SCORE_BIAS = -1.0e10


@dataclass
class CFMConfig:
    """Sizes of the CFM estimator and solver settings; defaults are the released model's.

    Only the causal U-Net (the released one, `causal=True` upstream) is built.
    """

    mel_channels: int = 80
    """Mel bins: channels of x, mu, cond, the speaker projection and the output."""
    channels: list[int] = field(default_factory=lambda: [256])
    """U-Net widths, one per resolution level (the released model has one level)."""
    n_blocks: int = 4
    """Transformer blocks after each ResNet block."""
    num_mid_blocks: int = 12
    num_heads: int = 8
    attention_head_dim: int = 64
    ff_mult: int = 4
    """Feed-forward hidden width = ff_mult x block width."""
    time_scale: float = 1000.0
    """t is multiplied by this before the sinusoidal embedding."""
    n_timesteps: int = 10
    """Euler steps of the solver."""
    cfg_rate: float = 0.7
    """Classifier-free guidance: v = (1 + rate) v_cond - rate v_uncond."""
    t_scheduler: str = "cosine"
    """'cosine' (t = 1 - cos(s pi/2)) or 'linear' (t = s), s evenly spaced in [0, 1]."""

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        if not self.channels:
            raise ValueError("CFMConfig.channels must name at least one level")
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"CFMConfig.t_scheduler must be 'cosine' or 'linear', not {self.t_scheduler!r}")
        if self.in_channels % 2:
            raise ValueError("the sinusoidal time embedding needs an even input width")

    @property
    def in_channels(self) -> int:
        """Packed input: x, mu, spks and cond, each `mel_channels` wide."""
        return 4 * self.mel_channels

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]


# ----------------------------------------------------------------------------- layers


class CausalConv1d(nn.Conv1d):
    """Conv1d that only looks back: the input is left-padded with kernel_size - 1 zeros."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3) -> None:
        super().__init__(in_ch, out_ch, kernel_size)
        self.left_pad = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class _SwapTC(nn.Module):
    """[B, C, T] <-> [B, T, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class CausalConvStage(nn.Module):
    """Masked input -> causal conv (k=3) -> LayerNorm over channels -> Mish -> masked output."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        # Index layout fixed by the checkpoint: block.0 = conv, block.2 = LayerNorm.
        self.block = nn.Sequential(CausalConv1d(in_ch, out_ch, 3), _SwapTC(), nn.LayerNorm(out_ch),
                                   _SwapTC(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class CausalResBlock(nn.Module):
    """Two causal conv stages with the projected time embedding added in between, plus a 1x1 skip."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, out_ch))
        self.block1 = CausalConvStage(in_ch, out_ch)
        self.block2 = CausalConvStage(out_ch, out_ch)
        self.res_conv = nn.Conv1d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(temb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive key bias; q/k/v without bias, output with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H*D] -> [B, H, T, D]
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, C]; key_bias [B, 1, 1, T] (0 for valid keys, very negative for masked ones)."""
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(x)), self._split(self.to_v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + key_bias
        out = torch.matmul(scores.softmax(dim=-1), v)          # [B, H, T, D]
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GeluProjection(nn.Module):
    """Linear followed by exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        # net.1 is the (inference-time no-op) dropout slot of the checkpoint layout.
        self.net = nn.Sequential(GeluProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + ff(LN(x)).  (norm3 is the checkpoint's name for the second norm.)"""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), key_bias)
        return x + self.ff(self.norm3(x))


class TimeMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class StridedDown(nn.Module):
    """Halve the time resolution between U-Net levels (only when there are several levels)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TransposedUp(nn.Module):
    """Double the time resolution between U-Net levels (only when there are several levels)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(ch, ch, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """[B] -> [B, dim]: sin then cos of scale*t times geometric frequencies 1 .. 1/10000."""
    half = dim // 2
    step = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -step)
    arg = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


def key_bias_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Frame mask [B, 1, T] -> additive attention bias [B, 1, 1, T] (frames with mask 0 are ignored)."""
    valid = (mask != 0).to(mask.dtype)
    return ((1.0 - valid) * MASKED_SCORE_BIAS).unsqueeze(1)


# ----------------------------------------------------------------------------- estimator


class CFMEstimator(nn.Module):
    """The velocity network; state dict = the checkpoint's `flow.decoder.estimator.*` (prefix stripped)."""

    def __init__(self, cfg: CFMConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or CFMConfig()
        self.cfg = cfg
        tdim = cfg.time_embed_dim

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList([TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim, cfg.ff_mult)
                                  for _ in range(cfg.n_blocks)])

        self.time_mlp = TimeMLP(cfg.in_channels, tdim)
        levels = cfg.channels
        self.down_blocks = nn.ModuleList()
        width = cfg.in_channels
        for i, out in enumerate(levels):
            last = i == len(levels) - 1
            resample = CausalConv1d(out, out, 3) if last else StridedDown(out)
            self.down_blocks.append(nn.ModuleList([CausalResBlock(width, out, tdim), transformers(out), resample]))
            width = out
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResBlock(width, width, tdim), transformers(width)])
            for _ in range(cfg.num_mid_blocks))
        self.up_blocks = nn.ModuleList()
        rev = levels[::-1] + [levels[0]]
        for i in range(len(levels)):
            last = i == len(levels) - 1
            out = rev[i + 1]
            resample = CausalConv1d(out, out, 3) if last else TransposedUp(out)
            self.up_blocks.append(nn.ModuleList([CausalResBlock(2 * rev[i], out, tdim), transformers(out), resample]))
        self.final_block = CausalConvStage(levels[0], levels[0])
        self.final_proj = nn.Conv1d(levels[0], cfg.mel_channels, 1)

    @staticmethod
    def _attend(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bias = key_bias_from_mask(mask)
        h = x.transpose(1, 2)
        for block in blocks:
            h = block(h, bias)
        return h.transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(sinusoidal_embedding(t, self.cfg.in_channels, self.cfg.time_scale).to(t.dtype))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand_as(mu), cond], dim=1)

        skips, masks = [], [mask]
        for i, (res, blocks, down) in enumerate(self.down_blocks):
            m = masks[-1]
            h = self._attend(blocks, res(h, m, temb), m)
            skips.append(h)
            h = down(h * m)
            if i < len(self.down_blocks) - 1:    # strided: frame 2j of the level above
                masks.append(m[:, :, ::2])

        m = masks[-1]
        for res, blocks in self.mid_blocks:
            h = self._attend(blocks, res(h, m, temb), m)

        for i, (res, blocks, up) in enumerate(self.up_blocks):
            m, skip = masks.pop(), skips.pop()
            if i > 0:                    # after a transposed-conv upsample: crop to the skip's length
                h = h[:, :, :skip.shape[-1]]
            h = self._attend(blocks, res(torch.cat([h, skip], dim=1), m, temb), m)
            h = up(h * m)
        h = self.final_block(h, m)
        return self.final_proj(h * m) * mask


# ----------------------------------------------------------------------------- solver


def time_schedule(n_steps: int, scheduler: str = "cosine") -> torch.Tensor:
    """The n_steps + 1 float32 time points of the Euler solver, from 0 to 1."""
    s = torch.linspace(0, 1, n_steps + 1, dtype=torch.float32)
    if scheduler == "cosine":
        s = 1 - torch.cos(s * 0.5 * torch.pi)
    return s


@torch.no_grad()
def solve_cfm_torch(estimator: nn.Module, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                    cond: torch.Tensor, noise: torch.Tensor, n_steps: int = 10, cfg_rate: float = 0.7,
                    scheduler: str = "cosine") -> torch.Tensor:
    """Reference Euler ODE solve with classifier-free guidance (float32), noise -> mel [B, 80, T].

    Each step runs the estimator once on 2B rows: the B conditional rows, then the
    same rows with mu, spks and cond zeroed (x, mask and t shared), and moves
    x by (t_next - t) * ((1 + cfg_rate) v_cond - cfg_rate v_uncond).
    Masked frames keep their noise (the estimator's velocity is zero there).
    """
    ts = time_schedule(n_steps, scheduler)
    x = noise.float()
    B = x.shape[0]
    mask2 = torch.cat([mask, mask])
    mu2 = torch.cat([mu, torch.zeros_like(mu)])
    spks2 = torch.cat([spks, torch.zeros_like(spks)])
    cond2 = torch.cat([cond, torch.zeros_like(cond)])
    for k in range(n_steps):
        t, t_next = ts[k], ts[k + 1]
        v = estimator(torch.cat([x, x]), mask2, mu2, t.expand(2 * B), spks2, cond2)
        v_cond, v_uncond = v[:B], v[B:]
        x = x + (t_next - t) * ((1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond)
    return x


# ----------------------------------------------------------------------------- graph


class _EstimatorGraph(nn.Module):
    def __init__(self, estimator: CFMEstimator) -> None:
        super().__init__()
        self.estimator = estimator

    def forward(self, x, mask, mu, t, spks, cond):
        return (self.estimator(x, mask, mu, t, spks, cond),)


def make_cfm_batch(lengths: list[int], rng: np.random.Generator, mel_channels: int = 80) -> Inputs:
    """A right-padded estimator batch, one row per length; `cond` holds a prompt-mel prefix (first third).

    Padded frames of x, mu and cond hold junk (as the solver's noise does in x):
    the estimator must ignore them.
    """
    B, T, C = len(lengths), max(lengths), mel_channels
    n = np.asarray(lengths)[:, None, None]
    valid = np.arange(T)[None, None, :] < n                          # [B, 1, T]
    prompt = np.arange(T)[None, None, :] < (n // 3)

    def normal() -> np.ndarray:
        return rng.standard_normal((B, C, T))

    def junk() -> np.ndarray:
        return 3.0 * rng.standard_normal((B, C, T))

    return {
        "x": np.where(valid, normal(), junk()).astype(np.float32),
        "mask": valid.astype(np.float32),
        "mu": np.where(valid, normal(), junk()).astype(np.float32),
        "t": rng.uniform(0.0, 1.0, B).astype(np.float32),
        "spks": rng.standard_normal((B, C)).astype(np.float32),
        "cond": np.where(prompt, normal(), np.where(valid, 0.0, junk())).astype(np.float32),
    }


def take_cfm_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
    """Row i of an estimator batch alone, cut to its length."""
    n = lengths[i]
    return {k: np.ascontiguousarray(v[i:i + 1] if v.ndim < 3 else v[i:i + 1, :, :n]) for k, v in batch.items()}


def graph_specs(estimator: CFMEstimator, cfg: CFMConfig | None = None) -> list[GraphSpec]:
    """The `cfm_estimator` graph of the bundle contract."""
    cfg = cfg or estimator.cfg
    bt = {0: "batch", 2: "time"}
    return [GraphSpec(
        name="cfm_estimator",
        module=_EstimatorGraph(estimator).eval(),
        input_names=["x", "mask", "mu", "t", "spks", "cond"],
        output_names=["velocity"],
        dynamic_axes={"x": bt, "mask": bt, "mu": bt, "t": {0: "batch"}, "spks": {0: "batch"},
                      "cond": bt, "velocity": bt},
        make_batch=partial(make_cfm_batch, mel_channels=cfg.mel_channels),
        take_row=take_cfm_row,
        # Verification runs a batch of another size, with lengths above and below the traced ones.
        trace_lengths=[24, 17],
        verify_lengths=[41, 9, 30],
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    )]
