"""The VITS family (Piper voices): phonemized text in, audio out, one ONNX graph.

Three stage classes: `VitsFrontend` (text → phoneme ids) and `VitsSynth`
(phoneme ids → audio) run as separate pools, or `VitsStage` runs both in one
pool (the default pipeline, configs/vits.yaml).
"""
from actors.vits.frontend import VitsFrontend
from actors.vits.stage import VitsStage
from actors.vits.synth import VitsSynth

__all__ = ["VitsFrontend", "VitsStage", "VitsSynth"]
