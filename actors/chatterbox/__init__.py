"""The Chatterbox family: zero-shot voice cloning as five chained stages.

`Conditioning` (reference audio → voice, once per distinct reference) → `T3`
(text → speech tokens, one continuous-batching decode loop per actor) →
`S3GenEncoder` (tokens → mu) → `CFM` (flow-matching mel) → `Vocoder` (HiFT →
audio). configs/chatterbox-cpu.yaml and configs/chatterbox.yaml chain them.
"""
from actors.chatterbox.cfm import CFM
from actors.chatterbox.conditioning import Conditioning
from actors.chatterbox.s3gen import S3GenEncoder
from actors.chatterbox.t3 import T3
from actors.chatterbox.vocoder import Vocoder

__all__ = ["CFM", "Conditioning", "S3GenEncoder", "T3", "Vocoder"]
