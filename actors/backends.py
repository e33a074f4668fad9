"""Inference backends behind one small session interface: ONNX Runtime (CPU, CUDA) and OpenVINO (CPU).

The backend is chosen per stage because none wins everywhere: on an AMX Xeon
OpenVINO bf16 runs the Chatterbox CFM estimator 2.6x faster than ONNX Runtime
fp32, and is slower on the T3 step graph.  A reduced precision is only used
after the stage has compared it with fp32 on its own graphs (`Stage`).
"""
from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal, Mapping, Protocol, Sequence

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.errors import ConfigError


class Backend(BaseModel):
    """Where and how a stage runs its graphs (the `backend` block of a pipeline stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["onnxruntime", "openvino"] = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    threads: int = Field(1, ge=1, le=256)
    """Intra-op threads per session: set it to the actor's CPUs so actors don't oversubscribe a node."""
    spin: bool = True
    """ONNX Runtime's idle intra-op threads spin-wait for the next op: fastest when a stage has its cores to
    itself; turn it off where stages share cores (a small node), or spinning burns the CPU the others need."""
    precision: Literal["f32", "bf16"] = "f32"
    """bf16 runs through OpenVINO on CPUs that have it; checked against f32 when the stage loads."""
    tolerance: float = Field(0.05, gt=0, le=1)
    """Largest error allowed for a reduced precision, relative to the peak of the f32 output."""
    gpu_mem_limit_mb: int | None = Field(None, ge=1)
    """Cap for ONNX Runtime's CUDA arena: Ray does not enforce fractional GPU memory."""

    @model_validator(mode="after")
    def _supported(self) -> "Backend":
        if self.engine == "openvino" and self.device != "cpu":
            raise ValueError("engine openvino runs on device cpu only")
        if self.precision == "bf16" and self.engine != "openvino":
            raise ValueError("precision bf16 needs engine openvino (ONNX Runtime runs these graphs in f32)")
        return self


class Session(Protocol):
    """What a stage needs from a loaded graph."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """The named outputs (all, in graph order, when None) for one call."""
        ...


class OrtSession:
    """An ONNX Runtime session that fails, instead of silently falling back to CPU, when CUDA is asked for."""

    def __init__(self, path: str | Path, backend: Backend) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = backend.threads
        opts.inter_op_num_threads = 1
        if not backend.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if backend.device == "cpu":
            providers: list = ["CPUExecutionProvider"]
        else:
            cuda: dict = {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}
            if backend.gpu_mem_limit_mb:
                cuda["gpu_mem_limit"] = backend.gpu_mem_limit_mb << 20
            providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        if backend.device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise ConfigError(f"{path}: device cuda asked for, but ONNX Runtime's CUDA provider is unavailable "
                              f"(got {self.session.get_providers()}); install the `gpu` extra and check "
                              "the CUDA and cuDNN libraries")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        return self.session.run(list(outputs) if outputs else None, dict(feeds))


@cache
def _openvino_core():
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError("engine openvino needs the openvino package: pip install 'voxray[openvino]'") from None
    return ov.Core()


class OpenVinoSession:
    """An OpenVINO CPU model compiled for f32 or bf16; dynamic shapes as exported."""

    def __init__(self, path: str | Path, backend: Backend) -> None:
        core = _openvino_core()
        if backend.precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ConfigError("precision bf16 asked for, but this CPU has no bf16 support "
                              "(OpenVINO CPU capabilities: "
                              f"{core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}); use precision f32")
        compiled = core.compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": backend.precision, "INFERENCE_NUM_THREADS": backend.threads,
            "PERFORMANCE_HINT": "LATENCY"})
        self.request = compiled.create_infer_request()
        # A tensor can carry several names (an output that is also an internal node's result):
        # address each by the name the ONNX graph declares, as ONNX Runtime does.
        graph = onnx.load(str(path), load_external_data=False).graph
        self.input_names = tuple(i.name for i in graph.input)
        self._outputs = {o.name: next(c for c in compiled.outputs if o.name in c.get_names())
                         for o in graph.output}
        self.output_names = tuple(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        result = self.request.infer(dict(feeds))
        return [np.array(result[self._outputs[name]]) for name in (outputs or self.output_names)]


def open_session(path: str | Path, backend: Backend) -> Session:
    """A session for the graph at `path` on `backend`."""
    if backend.engine == "openvino":
        return OpenVinoSession(path, backend)
    return OrtSession(path, backend)


def relative_error(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Largest |candidate - reference| over all outputs, relative to each reference output's peak.

    Outputs of different shapes (a reduced precision changed a length) count as an infinite error.
    """
    worst = 0.0
    for ref, got in zip(reference, candidate, strict=True):
        if ref.shape != got.shape:
            return float("inf")
        ref, got = ref.astype(np.float64), got.astype(np.float64)
        if ref.size:
            worst = max(worst, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return worst
