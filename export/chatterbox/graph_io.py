"""Export a GraphSpec to ONNX and check it against its torch module."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.chatterbox.spec import GraphSpec, Inputs, Tolerance

OPSET = 17
# Graphs whose weights pass this keep them in one `<name>.onnx.data` file (protobuf caps a file at 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_graph(spec: GraphSpec, out_dir: Path, seed: int = 0) -> Path:
    """Trace `spec.module` at `spec.trace_lengths` and write `<name>.onnx` (external data past 2 GB)."""
    path = Path(out_dir) / f"{spec.name}.onnx"
    inputs = spec.make_batch(spec.trace_lengths, np.random.default_rng(seed))
    args = tuple(torch.from_numpy(inputs[n]) for n in spec.input_names)
    spec.module.eval()
    with torch.no_grad():
        torch.onnx.export(
            spec.module, args, str(path), input_names=spec.input_names,
            output_names=spec.output_names, dynamic_axes=spec.dynamic_axes,
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
    return path


def save_onnx(model: onnx.ModelProto, path: Path, external_bytes: int) -> list[str]:
    """Save `model`; weights past `external_bytes` go to one `<name>.data` file beside it
    (protobuf caps a file at 2 GB). Returns the external files written."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size <= external_bytes:
        onnx.save_model(model, str(path))
        return []
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    (path.parent / data).chmod(0o644)  # onnx creates it owner-only; bundles are shared read-only
    return [data]


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, spec: GraphSpec, inputs: Inputs) -> dict[str, np.ndarray]:
    outs = sess.run(spec.output_names, {n: inputs[n] for n in spec.input_names})
    return dict(zip(spec.output_names, outs))


def run_torch(spec: GraphSpec, inputs: Inputs) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = spec.module(*(torch.from_numpy(inputs[n]) for n in spec.input_names))
    if isinstance(outs, torch.Tensor):
        outs = (outs,)
    return {n: o.detach().float().numpy() if o.is_floating_point() else o.numpy()
            for n, o in zip(spec.output_names, outs)}


def max_error(a: np.ndarray, b: np.ndarray, tol: Tolerance) -> tuple[float, bool]:
    """Max absolute error and whether every element is within atol + rtol*|b|."""
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} != {b.shape}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    ok = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(b.astype(np.float64))))
    return float(diff.max(initial=0.0)), ok


def crop_like(batched_row: np.ndarray, alone: np.ndarray) -> np.ndarray:
    """Row of a padded output cut down to the shape of the same row run alone (right padding)."""
    return batched_row[tuple(slice(0, n) for n in alone.shape)]


def verify_graph(spec: GraphSpec, path: Path, seed: int = 1) -> dict:
    """ORT vs torch at batch 1 and at a padded batch, and each padded row vs that row alone.

    Returns the max errors measured; raises AssertionError naming the graph,
    output and check when a tolerance is exceeded.
    """
    sess = session(path)
    rng = np.random.default_rng(seed)
    lengths = spec.verify_lengths
    batch = spec.make_batch(lengths, rng)
    report: dict = {"batch_sizes": [1, len(lengths)], "lengths": list(lengths),
                    "tolerance": {"atol": spec.tolerance.atol, "rtol": spec.tolerance.rtol},
                    "row_tail_margin": dict(spec.row_tail_margin), "max_abs_error": {}}

    def check(kind: str, name: str, got: np.ndarray, want: np.ndarray) -> None:
        if name in spec.exact_outputs:
            if got.shape != want.shape or not np.array_equal(got, want):
                raise AssertionError(f"{spec.name}: {kind} output {name} differs")
            err = 0.0
        else:
            err, ok = max_error(got, want, spec.tolerance)
            if not ok:
                raise AssertionError(f"{spec.name}: {kind} output {name} max error {err:.3g} exceeds "
                                     f"atol={spec.tolerance.atol} rtol={spec.tolerance.rtol}")
        key = f"{kind}/{name}"
        report["max_abs_error"][key] = max(report["max_abs_error"].get(key, 0.0), err)

    ort_batch = run_onnx(sess, spec, batch)
    for name, want in run_torch(spec, batch).items():
        check("onnx_vs_torch_batched", name, ort_batch[name], want)
    for i in range(len(lengths)):
        row = spec.take_row(batch, i, lengths)
        ort_row = run_onnx(sess, spec, row)
        for name, want in run_torch(spec, row).items():
            check("onnx_vs_torch_batch1", name, ort_row[name], want)
        for name, alone in ort_row.items():
            padded = crop_like(ort_batch[name][i:i + 1], alone)
            margin = spec.row_tail_margin.get(name, 0)
            if margin:
                padded, alone = padded[..., :-margin], alone[..., :-margin]
            check("padded_row_vs_alone", name, padded, alone)
    return report
