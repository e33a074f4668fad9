"""S3Gen container: the whole `s3gen.safetensors` key set in one module.

The released file holds four sub-models under fixed prefixes; `S3Gen` gives
each its released attribute name so that `S3Gen(...).state_dict()` has exactly
the official keys (see official_layout.json):

    tokenizer.*        S3Tokenizer (s3tokenizer.py; `_mel_filters`/`window` are computed buffers)
    speaker_encoder.*  CAMPPlus (campplus.py)
    flow.*             FlowEncoder (flow_encoder.py) holding the CFM estimator at
                       `flow.decoder.estimator.*` (cfm.py)
    mel2wav.*          HiFTGenerator (hift.py)

The exporter itself never needs all four at once: it builds and loads one
section at a time (`SECTIONS`, `build_section`) to keep the full-size export's
memory low.  The container is for key-set checks and strict loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from export.chatterbox.campplus import CAMPPlus, CAMPPlusConfig
from export.chatterbox.cfm import CFMConfig, CFMEstimator
from export.chatterbox.config import build_config
from export.chatterbox.flow_encoder import FlowDecoder, FlowEncoder, FlowEncoderConfig
from export.chatterbox.hift import HiFTConfig, HiFTGenerator
from export.chatterbox.s3tokenizer import S3Tokenizer, S3TokenizerConfig

# Prefix in s3gen.safetensors -> preset section(s) that size it.
SECTIONS: dict[str, str] = {
    "tokenizer": "s3tokenizer",
    "speaker_encoder": "campplus",
    "flow": "flow",          # + "cfm" for flow.decoder.estimator
    "mel2wav": "hift",
}
ESTIMATOR_PREFIX = "flow.decoder.estimator."
# In the state dict, absent from released files: built by S3Tokenizer.computed_buffers().
COMPUTED_BUFFERS = ("tokenizer._mel_filters", "tokenizer.window")


@dataclass
class S3GenConfig:
    """Sizes of the four S3Gen sub-models (defaults: the released model)."""

    s3tokenizer: S3TokenizerConfig = field(default_factory=S3TokenizerConfig)
    campplus: CAMPPlusConfig = field(default_factory=CAMPPlusConfig)
    flow: FlowEncoderConfig = field(default_factory=FlowEncoderConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)

    @classmethod
    def from_preset(cls, preset: dict[str, dict[str, Any]]) -> "S3GenConfig":
        return cls(
            s3tokenizer=build_config(S3TokenizerConfig, preset.get("s3tokenizer")),
            campplus=build_config(CAMPPlusConfig, preset.get("campplus")),
            flow=build_config(FlowEncoderConfig, preset.get("flow")),
            cfm=build_config(CFMConfig, preset.get("cfm")),
            hift=build_config(HiFTConfig, preset.get("hift")),
        )


class S3Gen(nn.Module):
    """Holder of the S3Gen sub-models under their released names (no forward: use the graphs)."""

    def __init__(self, cfg: S3GenConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or S3GenConfig()
        self.tokenizer = S3Tokenizer(cfg.s3tokenizer)
        self.speaker_encoder = CAMPPlus(cfg.campplus)
        self.flow = FlowEncoder(cfg.flow, decoder=FlowDecoder(CFMEstimator(cfg.cfm)))
        self.mel2wav = HiFTGenerator(cfg.hift)

    @property
    def estimator(self) -> CFMEstimator:
        return self.flow.decoder.estimator

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """The `tokenizer.*` buffers to add to a released state dict before a strict load."""
        return {f"tokenizer.{k}": v for k, v in self.tokenizer.computed_buffers().items()}


def build_section(name: str, cfg: S3GenConfig) -> nn.Module:
    """One released section alone: "tokenizer", "speaker_encoder", "flow" (without its
    estimator), "estimator" (`flow.decoder.estimator`) or "mel2wav"."""
    if name == "tokenizer":
        return S3Tokenizer(cfg.s3tokenizer)
    if name == "speaker_encoder":
        return CAMPPlus(cfg.campplus)
    if name == "flow":
        return FlowEncoder(cfg.flow)
    if name == "estimator":
        return CFMEstimator(cfg.cfm)
    if name == "mel2wav":
        return HiFTGenerator(cfg.hift)
    raise KeyError(f"no S3Gen section {name!r}")


def section_prefix(name: str) -> str:
    """Key prefix of a section in s3gen.safetensors."""
    return ESTIMATOR_PREFIX if name == "estimator" else f"{name}."


def expected_shapes(cfg: S3GenConfig) -> dict[str, tuple[int, ...]]:
    """Every key of s3gen.safetensors for this config and its shape (built on the meta device)."""
    with torch.device("meta"):
        model = S3Gen(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
