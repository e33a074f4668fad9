"""S3 speech tokenizer v2 (25 Hz): 128-bin log-mel -> speech token ids (graph `s3tokenizer`).

Two GELU convolutions (the first and second with stride 2) take 100 Hz mels to
25 Hz; a stack of pre-norm transformer blocks follows, whose attention uses
rotary position embeddings and adds an FSMN memory (a depthwise convolution
over the values).  A linear projection to 8 dims, tanh and rounding give one
ternary digit per dim: token = sum_i (digit_i + 1) * 3^i, in [0, 3^8).

Padding is masked the same way at every stage (conv inputs zeroed past each
row's length, attention keys masked, FSMN inputs/outputs zeroed), so each
row's valid tokens do not depend on the rest of the batch.

State-dict names follow `s3gen.safetensors` under `tokenizer.` (prefix
stripped).  `_mel_filters` and `window` are computed buffers: they belong to
the state dict but not to the released files; `computed_buffers(cfg)` makes
them (see `S3Tokenizer.computed_buffers`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actors.dsp import slaney_mel_filterbank
from export.chatterbox.spec import GraphSpec, Inputs, Tolerance

FSQ_DIMS = 8      # projected dims, one ternary digit each
FSQ_LEVELS = 3    # digits per dim -> 3^8 = 6561 token ids


@dataclass
class S3TokenizerConfig:
    """Sizes of the S3 tokenizer v2; defaults are the released model."""

    n_mels: int = 128          # log-mel bins (contract)
    n_state: int = 1280        # transformer width
    n_head: int = 20           # attention heads (head dim = n_state / n_head)
    n_layer: int = 6           # transformer blocks
    fsmn_kernel: int = 31      # FSMN depthwise kernel size
    rope_theta: float = 10000.0
    # Front end the computed buffers describe (used by the runtime's numpy log-mel).
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160


# ---------------------------------------------------------------------------
# Computed buffers


def computed_buffers(cfg: S3TokenizerConfig | None = None) -> dict[str, torch.Tensor]:
    """`_mel_filters` [n_mels, n_fft//2+1] and `window` [n_fft] (periodic Hann), on CPU."""
    cfg = cfg or S3TokenizerConfig()
    filters = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
    with torch.device("cpu"):
        return {"_mel_filters": torch.tensor(filters, dtype=torch.float32),
                "window": torch.hann_window(cfg.n_fft, dtype=torch.float32)}


# ---------------------------------------------------------------------------
# Model


def _rope_cos_sin(n_pos: torch.Tensor | int, head_dim: int, theta: float, like: torch.Tensor):
    """cos/sin tables [T, head_dim] for positions 0..T-1, both halves sharing the frequencies."""
    half = (torch.arange(head_dim // 2, device=like.device) * 2).float() / head_dim
    inv_freq = 1.0 / (theta ** half)
    pos = torch.arange(n_pos, device=like.device).float()
    ang = pos[:, None] * inv_freq[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """Rotary embedding of x [B, T, H, 2*half] (rotate-half layout)."""
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _FSMNAttention(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        d = cfg.n_state
        self.n_head = cfg.n_head
        self.half = d // cfg.n_head // 2          # static, so the rotary slices are constants
        self.scale = (d // cfg.n_head) ** -0.25  # applied to q and to k
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.pad_left = (cfg.fsmn_kernel - 1) // 2
        self.pad_right = cfg.fsmn_kernel - 1 - self.pad_left
        # Zero padding around the depthwise conv; symmetric (odd kernel) padding is done by the conv itself.
        self.sym_pad = self.pad_left == self.pad_right
        self.fsmn_block = nn.Conv1d(d, d, cfg.fsmn_kernel, groups=d, bias=False,
                                    padding=self.pad_left if self.sym_pad else 0)

    def _fsmn(self, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # v: [B, T, D]; valid: [B, T, 1] float (1 inside the row, 0 in padding)
        v = v * valid
        vt = v.transpose(1, 2)
        if not self.sym_pad:
            vt = F.pad(vt, (self.pad_left, self.pad_right))
        mem = self.fsmn_block(vt).transpose(1, 2)
        return (mem + v) * valid

    def forward(self, x, key_bias, valid, cos, sin):
        b, t = x.shape[0], x.shape[1]
        q = self.query(x).reshape(b, t, self.n_head, -1)
        k = self.key(x).reshape(b, t, self.n_head, -1)
        v = self.value(x)
        q, k = _rotate(q, cos, sin, self.half), _rotate(k, cos, sin, self.half)
        memory = self._fsmn(v, valid)
        q = q.permute(0, 2, 1, 3) * self.scale                     # [B, H, T, Dh]
        k = k.permute(0, 2, 3, 1) * self.scale                     # [B, H, Dh, T]
        vh = v.reshape(b, t, self.n_head, -1).permute(0, 2, 1, 3)  # [B, H, T, Dh]
        w = torch.softmax(q @ k + key_bias, dim=-1)
        ctx = (w @ vh).permute(0, 2, 1, 3).flatten(2)
        return self.out(ctx) + memory


class _Block(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        self.attn = _FSMNAttention(cfg)
        self.attn_ln = nn.LayerNorm(cfg.n_state, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_state, 4 * cfg.n_state), nn.GELU(),
                                 nn.Linear(4 * cfg.n_state, cfg.n_state))
        self.mlp_ln = nn.LayerNorm(cfg.n_state, eps=1e-5)

    def forward(self, x, key_bias, valid, cos, sin):
        x = x + self.attn(self.attn_ln(x), key_bias, valid, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


def _strided_length(n: torch.Tensor) -> torch.Tensor:
    """Output length of a kernel-3, padding-1, stride-2 convolution: (n + 2*1 - (3-1) - 1) // 2 + 1."""
    return torch.div(n + 2 - 2 - 1, 2, rounding_mode="floor") + 1


def _valid(lengths: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """[B, T] bool: position < row length, T taken from like.shape[axis]."""
    pos = torch.arange(like.shape[axis], device=lengths.device)
    return pos[None, :] < lengths[:, None]


class _Encoder(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.n_state, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.n_state, cfg.n_state, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layer)])

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor):
        x = mels * _valid(lengths, mels, 2)[:, None, :]
        x = F.gelu(self.conv1(x))
        lengths = _strided_length(lengths)
        x = x * _valid(lengths, x, 2)[:, None, :]
        x = F.gelu(self.conv2(x))
        lengths = _strided_length(lengths)
        x = x.transpose(1, 2)                                      # [B, T', D]
        valid = _valid(lengths, x, 1)
        key_bias = ((1.0 - valid.float()) * -1.0e10)[:, None, None, :]
        valid = valid.float()[:, :, None]
        cos, sin = _rope_cos_sin(x.shape[1], self.cfg.n_state // self.cfg.n_head, self.cfg.rope_theta, x)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        for block in self.blocks:
            x = block(x, key_bias, valid, cos, sin)
        return x, lengths


class _FSQCodebook(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        self.project_down = nn.Linear(cfg.n_state, FSQ_DIMS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.project_down(x)) * 0.9990000128746033
        digits = torch.round(h) + 1
        powers = FSQ_LEVELS ** torch.arange(FSQ_DIMS, device=x.device, dtype=digits.dtype)
        return (digits * powers).sum(dim=-1).to(torch.int64)


class _FSQQuantizer(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        self._codebook = _FSQCodebook(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._codebook(x)


class S3Tokenizer(nn.Module):
    """mels [B, n_mels, T] (+ lengths [B]) -> tokens [B, ceil(T/4)] int64, token lengths [B] int64."""

    def __init__(self, cfg: S3TokenizerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or S3TokenizerConfig()
        self.encoder = _Encoder(cfg)
        self.quantizer = _FSQQuantizer(cfg)
        # Computed buffers (present in the state dict, absent from released files).
        n_freq = cfg.n_fft // 2 + 1
        self.register_buffer("_mel_filters", torch.zeros(cfg.n_mels, n_freq))
        self.register_buffer("window", torch.zeros(cfg.n_fft))
        if self.window.device.type != "meta":
            with torch.no_grad():
                for name, value in computed_buffers(cfg).items():
                    getattr(self, name).copy_(value)

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers to add to a released `tokenizer.*` state dict before a strict load."""
        return computed_buffers(self.cfg)

    def forward(self, mels: torch.Tensor, mel_lengths: torch.Tensor):
        hidden, token_lengths = self.encoder(mels, mel_lengths.to(torch.int64))
        return self.quantizer(hidden), token_lengths


class _S3TokenizerGraph(nn.Module):
    def __init__(self, model: S3Tokenizer):
        super().__init__()
        self.model = model

    def forward(self, mels: torch.Tensor, mel_lengths: torch.Tensor):
        tokens, token_lengths = self.model(mels, mel_lengths)
        return tokens, token_lengths


def graph_specs(model: S3Tokenizer, cfg: S3TokenizerConfig) -> list[GraphSpec]:
    """The `s3tokenizer` graph: `mels` [B,128,T], `mel_lengths` [B] -> `tokens` [B,T/4], `token_lengths` [B].

    Token ids past a row's `token_lengths` are not meaningful (as in the
    official batch path); the runtime cuts each row to its length.
    """
    n_mels = cfg.n_mels

    def make_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        t = max(lengths)
        mels = np.zeros((len(lengths), n_mels, t), dtype=np.float32)
        for i, n in enumerate(lengths):
            # The front end's log-mel lies in about [-1, 2] (8 dB range below the max, scaled).
            mels[i, :, :n] = rng.uniform(-0.8, 1.5, size=(n_mels, n)).astype(np.float32)
        return {"mels": mels, "mel_lengths": np.asarray(lengths, dtype=np.int64)}

    def take_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        n = lengths[i]
        return {"mels": batch["mels"][i:i + 1, :, :n], "mel_lengths": np.asarray([n], dtype=np.int64)}

    return [GraphSpec(
        name="s3tokenizer",
        module=_S3TokenizerGraph(model),
        input_names=["mels", "mel_lengths"],
        output_names=["tokens", "token_lengths"],
        dynamic_axes={"mels": {0: "batch", 2: "frames"}, "mel_lengths": {0: "batch"},
                      "tokens": {0: "batch", 1: "tokens"}, "token_lengths": {0: "batch"}},
        make_batch=make_batch,
        take_row=take_row,
        trace_lengths=[48, 37],
        # Padded rows of lengths 45 and 22 have an odd length after the first stride-2 conv,
        # so the second conv reads one frame past it: that frame must be masked.
        verify_lengths=[81, 45, 22],
        tolerance=Tolerance(atol=0.0),
        exact_outputs=("tokens", "token_lengths"),
    )]
