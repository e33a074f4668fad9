"""VoiceEncoder: the T3 speaker embedding (graph `ve`).

A stack of LSTMs reads one partial utterance of 40-bin power mels (160 frames)
and the last layer's final hidden state is projected, rectified and
L2-normalised.  The runtime splits the reference into partials, runs this
graph on all of them at once and averages/renormalises the per-partial
embeddings itself.

State-dict names follow `ve.safetensors` with no prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from export.chatterbox.spec import GraphSpec, Inputs, Tolerance


@dataclass
class VoiceEncoderConfig:
    """Sizes of the VoiceEncoder; defaults are the released model."""

    num_mels: int = 40            # input feature size (part of the graph contract)
    hidden_size: int = 256        # LSTM width
    num_layers: int = 3           # stacked LSTM layers
    embed_size: int = 256         # output embedding size (fed to T3's speaker projection)
    partial_frames: int = 160     # frames per partial utterance (contract)
    final_relu: bool = True       # rectify the projection before normalising


class VoiceEncoder(nn.Module):
    """Partial-utterance speaker encoder: mels [B, P, M] -> unit-norm embeddings [B, E]."""

    def __init__(self, cfg: VoiceEncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VoiceEncoderConfig()
        self.lstm = nn.LSTM(cfg.num_mels, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.embed_size)
        # Cosine-similarity scale/offset used only in training; kept so released files load strictly.
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(mels)
        emb = self.proj(h_n[-1])
        if self.cfg.final_relu:
            emb = torch.relu(emb)
        return emb / torch.linalg.norm(emb, dim=1, keepdim=True)


class _VEGraph(nn.Module):
    def __init__(self, model: VoiceEncoder):
        super().__init__()
        self.model = model

    def forward(self, mels: torch.Tensor):
        return (self.model(mels),)


def graph_specs(model: VoiceEncoder, cfg: VoiceEncoderConfig) -> list[GraphSpec]:
    """The `ve` graph: `mels` [B, 160, 40] -> `embeds` [B, 256].

    The time axis is fixed by the contract (one partial), so `lengths` only sets
    the number of rows; every row is independent (no padding involved).
    """
    frames, n_mels = cfg.partial_frames, cfg.num_mels

    def make_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        # Power mels are non-negative with a heavy tail; exponentials mimic that.
        mels = rng.exponential(0.5, size=(len(lengths), frames, n_mels)).astype(np.float32)
        return {"mels": mels}

    def take_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        return {"mels": batch["mels"][i:i + 1]}

    return [GraphSpec(
        name="ve",
        module=_VEGraph(model),
        input_names=["mels"],
        output_names=["embeds"],
        dynamic_axes={"mels": {0: "batch"}, "embeds": {0: "batch"}},
        make_batch=make_batch,
        take_row=take_row,
        trace_lengths=[frames, frames],
        verify_lengths=[frames, frames, frames],
        # Unit-norm outputs (|x| <= 1); LSTM kernels of torch and ORT differ by ~1e-7.
        tolerance=Tolerance(atol=1e-5, rtol=1e-4),
    )]
