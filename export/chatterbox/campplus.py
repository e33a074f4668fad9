"""CAM++ speaker verification network: the S3Gen x-vector (graph `campplus`).

Input is an 80-bin Kaldi fbank of 16 kHz audio, mean-normalised over the
utterance, as [B, T, 80].  A 2-D residual front end (FCM) over
(frequency, time) is flattened into channels, followed by a strided TDNN,
three densely connected blocks of context-aware-masking (CAM) TDNN layers
with transitions, mean+std statistics pooling and a dense layer with a
non-affine batch norm -> [B, 192].

State-dict names follow `s3gen.safetensors` under `speaker_encoder.` (prefix
stripped).  Evaluation mode only (batch norms use running statistics).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.chatterbox.spec import GraphSpec, Inputs, Tolerance


@dataclass
class CAMPPlusConfig:
    """Sizes of CAM++; defaults are the released model."""

    feat_dim: int = 80                       # fbank bins (contract)
    embedding_size: int = 192                # x-vector size (fed to the flow's speaker projection)
    head_channels: int = 32                  # FCM front-end channels
    head_blocks: tuple[int, int] = (2, 2)    # residual blocks in the two strided FCM stages
    init_channels: int = 128                 # TDNN output channels
    growth_rate: int = 32                    # channels each CAM dense layer adds
    bn_size: int = 4                         # bottleneck = bn_size * growth_rate
    block_layers: tuple[int, ...] = (12, 24, 16)
    block_kernels: tuple[int, ...] = (3, 3, 3)
    block_dilations: tuple[int, ...] = (1, 2, 2)
    cam_reduction: int = 2                   # squeeze ratio of the CAM context branch
    seg_len: int = 100                       # frames per segment of the CAM segment pooling


class _BNReLU(nn.Module):
    """Batch norm then (optionally) ReLU; the norm lives at `.batchnorm` like the released names."""

    def __init__(self, channels: int, relu: bool = True, affine: bool = True):
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(channels, affine=affine)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.batchnorm(x)
        return F.relu(x) if self.relu else x


class _ResBlock2d(nn.Module):
    """Two 3x3 convolutions with a residual path; the stride applies to the frequency axis only."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(c_out))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class _FCMHead(nn.Module):
    """2-D residual front end; output [B, C * F/8, T]."""

    def __init__(self, cfg: CAMPPlusConfig):
        super().__init__()
        c = cfg.head_channels
        self.conv1 = nn.Conv2d(1, c, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(*[_ResBlock2d(c, c, 2 if i == 0 else 1) for i in range(cfg.head_blocks[0])])
        self.layer2 = nn.Sequential(*[_ResBlock2d(c, c, 2 if i == 0 else 1) for i in range(cfg.head_blocks[1])])
        self.conv2 = nn.Conv2d(c, c, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.out_channels = c * (cfg.feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, F, T]
        y = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        y = self.layer2(self.layer1(y))
        y = F.relu(self.bn2(self.conv2(y)))
        return y.flatten(1, 2)


class _TDNN(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int):
        super().__init__()
        self.linear = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)
        self.nonlinear = _BNReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class _CAMLayer(nn.Module):
    """Local dilated convolution gated by a context built from the utterance mean and segment means."""

    def __init__(self, c_bn: int, c_out: int, kernel: int, dilation: int, reduction: int, seg_len: int):
        super().__init__()
        self.linear_local = nn.Conv1d(c_bn, c_out, kernel, padding=(kernel - 1) // 2 * dilation,
                                      dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(c_bn, c_bn // reduction, 1)
        self.linear2 = nn.Conv1d(c_bn // reduction, c_out, 1)
        self.seg_len = seg_len

    def _segment_means(self, x: torch.Tensor) -> torch.Tensor:
        # Mean over consecutive segments of seg_len frames (the last one may be short),
        # broadcast back to every frame of its segment.
        seg = F.avg_pool1d(x, kernel_size=self.seg_len, stride=self.seg_len, ceil_mode=True)
        seg = seg.unsqueeze(-1).expand(-1, -1, -1, self.seg_len).flatten(2)
        return seg[..., : x.shape[-1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear_local(x)
        ctx = x.mean(-1, keepdim=True) + self._segment_means(x)
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(ctx))))
        return local * gate


class _CAMDenseLayer(nn.Module):
    def __init__(self, c_in: int, cfg: CAMPPlusConfig, kernel: int, dilation: int):
        super().__init__()
        c_bn = cfg.bn_size * cfg.growth_rate
        self.nonlinear1 = _BNReLU(c_in)
        self.linear1 = nn.Conv1d(c_in, c_bn, 1, bias=False)
        self.nonlinear2 = _BNReLU(c_bn)
        self.cam_layer = _CAMLayer(c_bn, cfg.growth_rate, kernel, dilation, cfg.cam_reduction, cfg.seg_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class _CAMDenseBlock(nn.Module):
    """Densely connected CAM layers: each appends growth_rate channels (`tdnnd1`, `tdnnd2`, ...)."""

    def __init__(self, c_in: int, n_layers: int, cfg: CAMPPlusConfig, kernel: int, dilation: int):
        super().__init__()
        self.n_layers = n_layers
        for i in range(n_layers):
            self.add_module(f"tdnnd{i + 1}", _CAMDenseLayer(c_in + i * cfg.growth_rate, cfg, kernel, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_layers):
            x = torch.cat([x, getattr(self, f"tdnnd{i + 1}")(x)], dim=1)
        return x


class _Transit(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.nonlinear = _BNReLU(c_in)
        self.linear = nn.Conv1d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class _StatsPool(nn.Module):
    """Mean and unbiased standard deviation over time, concatenated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class _Dense(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = nn.Conv1d(c_in, c_out, 1, bias=False)
        self.nonlinear = _BNReLU(c_out, relu=False, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C]
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """fbank [B, T, F] -> x-vector [B, embedding_size]."""

    def __init__(self, cfg: CAMPPlusConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CAMPPlusConfig()
        self.head = _FCMHead(cfg)
        xv = nn.Sequential()
        xv.add_module("tdnn", _TDNN(self.head.out_channels, cfg.init_channels, 5, stride=2))
        c = cfg.init_channels
        for i, (n, k, d) in enumerate(zip(cfg.block_layers, cfg.block_kernels, cfg.block_dilations)):
            xv.add_module(f"block{i + 1}", _CAMDenseBlock(c, n, cfg, k, d))
            c += n * cfg.growth_rate
            xv.add_module(f"transit{i + 1}", _Transit(c, c // 2))
            c //= 2
        xv.add_module("out_nonlinear", _BNReLU(c))
        xv.add_module("stats", _StatsPool())
        xv.add_module("dense", _Dense(2 * c, cfg.embedding_size))
        self.xvector = xv

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.xvector(self.head(fbank.transpose(1, 2)))


class _CAMPPlusGraph(nn.Module):
    def __init__(self, model: CAMPPlus):
        super().__init__()
        self.model = model

    def forward(self, fbank: torch.Tensor):
        return (self.model(fbank),)


def graph_specs(model: CAMPPlus, cfg: CAMPPlusConfig) -> list[GraphSpec]:
    """The `campplus` graph: `fbank` [B, T, 80] -> `xvector` [B, 192].

    The contract has no lengths input and the network pools over the whole time
    axis (segment means, statistics pooling), so a row padded to a longer batch
    cannot equal the row alone.  Batches are therefore of equal-length rows with
    distinct content (the runtime groups references of equal fbank length or
    runs them one at a time); the time axis is still dynamic, and verification
    uses a length other than the traced one, spanning a partial pooling segment.
    """
    n_bins = cfg.feat_dim

    def make_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        t = max(lengths)
        fb = np.zeros((len(lengths), t, n_bins), dtype=np.float32)
        for i, n in enumerate(lengths):
            x = rng.normal(0.0, 2.0, size=(n, n_bins)).astype(np.float32)
            fb[i, :n] = x - x.mean(axis=0, keepdims=True)  # mean-normalised like the front end
        return {"fbank": fb}

    def take_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        return {"fbank": batch["fbank"][i:i + 1, : lengths[i]]}

    seg = cfg.seg_len
    return [GraphSpec(
        name="campplus",
        module=_CAMPPlusGraph(model),
        input_names=["fbank"],
        output_names=["xvector"],
        dynamic_axes={"fbank": {0: "batch", 1: "frames"}, "xvector": {0: "batch"}},
        make_batch=make_batch,
        take_row=take_row,
        # After the stride-2 TDNN: traced at 1.5 segments, verified at 2.3 segments.
        trace_lengths=[3 * seg, 3 * seg],
        verify_lengths=[int(4.6 * seg)] * 3,
        # x-vector entries are O(1); deep conv stack with BN folding in ORT.
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
    )]
