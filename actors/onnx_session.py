"""ONNX Runtime sessions with an explicit, overridable provider choice."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

DEVICES = ("cpu", "cuda")


def create_session(path: str | Path, device: str = "cpu", threads: int = 1,
                   gpu_mem_limit: int | None = None) -> ort.InferenceSession:
    """A session on `device` ("cpu" or "cuda").

    `threads` caps intra-op threads so that several actors on one node don't
    oversubscribe it.  On "cuda" the session fails instead of silently falling
    back to the CPU when the CUDA provider cannot be loaded.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if device == "cpu":
        providers: list = ["CPUExecutionProvider"]
    else:
        cuda_opts: dict = {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}
        if gpu_mem_limit:
            cuda_opts["gpu_mem_limit"] = int(gpu_mem_limit)
        providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"CUDAExecutionProvider unavailable for {path} (got {sess.get_providers()}); "
                           "install the `gpu` extra and check the CUDA/cuDNN libraries")
    return sess
