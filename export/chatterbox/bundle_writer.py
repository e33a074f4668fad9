"""Write and verify a Chatterbox bundle: every contract graph, assets and bundle.json.

Components are built (or loaded from the checkpoint) one at a time, exported,
verified against the same torch module and freed before the next one, so a
full-size fp32 export holds at most one sub-model (T3: ~2 GB) plus its graph.

Verification, for every graph, compares ONNX Runtime (CPU) with our PyTorch
module on the same inputs at batch 1 and at a padded batch of >= 3 rows of
different lengths, and each padded row with the row run alone
(`graph_io.verify_graph`).  The LM additionally runs the T3 helper's
`verify_lm` (left-padded batched prefill + cached greedy decode: logits, KV
cache and greedy tokens).  fp16 graphs are compared with the fp32 torch
modules under the looser `FP16_TOLERANCE`; the int8 step graph by its next-token
distributions against the fp32 step graph's (`verify_lm_int8`, `INT8_THRESHOLDS`).
Any excess fails the export: the bundle is assembled in a staging directory and
only moved to its destination, with bundle.json, once everything passed.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from actors.bundle import FORMAT_VERSION, Bundle, load_bundle, sha256_file, write_manifest
from export.chatterbox import campplus, cfm, flow_encoder, hift, s3tokenizer, t3 as t3_mod, voice_encoder
from export.chatterbox.checkpoint import (COMPONENTS, VOICE_KEYS, Checkpoint, CheckpointError, ModelConfig,
                                          RandomInit, Source, weights_fingerprint)
from export.chatterbox.graph_io import EXTERNAL_DATA_BYTES, export_graph, save_onnx, verify_graph
from export.chatterbox.spec import GraphSpec, Tolerance

FAMILY = "chatterbox"
SAMPLE_RATE = 24000
EXPORTER = "export.chatterbox"

# The graph contract (docs/architecture.md, "the graph contract"), in bundle order, by component.
COMPONENT_GRAPHS: dict[str, tuple[str, ...]] = {
    "ve": ("ve",),
    "t3": ("t3_cond", "t3_text_embed", "t3_speech_embed", "t3_lm", "t3_lm_step"),
    "tokenizer": ("s3tokenizer",),
    "speaker_encoder": ("campplus",),
    "flow": ("s3gen_encoder",),
    "estimator": ("cfm_estimator",),
    "mel2wav": ("hift_f0", "hift_decoder"),
}
GRAPHS = tuple(g for c in COMPONENTS for g in COMPONENT_GRAPHS[c])
# fp32 bundles: t3_lm_step with int8 MatMul weights (lm_verify.quantize_lm), for CPU workers.
INT8_LM = "t3_lm_step_int8"
INT8_FILE = "t3_lm_step.int8.onnx"

# fp16 bundles: graphs kept in fp32.  Both run once per reference voice (cached per
# speaker), so fp16 buys nothing there: the tokenizer's ids must match the fp32 model
# exactly, and CAM++ in fp16 drifts by ~5 % of its O(1) x-vector (measured on tiny).
FP16_KEEP_FP32 = ("s3tokenizer", "campplus")
# fp16 bundles: float inputs whose arithmetic stays fp32 (see fp16.py).
FP16_PRECISE_INPUTS = {"cfm_estimator": ("t", "mask")}
# fp16 graph (fp32 IO) vs the fp32 torch module: |a-b| <= atol + rtol*|b|.
FP16_TOLERANCE: dict[str, Tolerance] = {
    "ve": Tolerance(atol=5e-3, rtol=2e-2),
    "campplus": Tolerance(atol=5e-2, rtol=5e-2),
    "t3_cond": Tolerance(atol=2e-2, rtol=2e-2),
    "t3_text_embed": Tolerance(atol=5e-3, rtol=1e-2),
    "t3_speech_embed": Tolerance(atol=5e-3, rtol=1e-2),
    "t3_lm": Tolerance(atol=0.15, rtol=0.05),
    "t3_lm_step": Tolerance(atol=0.15, rtol=0.05),
    "s3gen_encoder": Tolerance(atol=2e-2, rtol=2e-2),
    "cfm_estimator": Tolerance(atol=0.1, rtol=5e-2),
    "hift_f0": Tolerance(atol=0.5, rtol=1e-2),
    "hift_decoder": Tolerance(atol=2e-2, rtol=5e-2),
}

GENERATION = {
    "t3": {"temperature": 0.8, "cfg_weight": 0.5, "min_p": 0.05, "top_p": 1.0, "repetition_penalty": 1.2,
           "exaggeration": 0.5, "max_new_tokens": 1000},
    # filled from the CFM config: n_timesteps, t_scheduler, cfg_rate
    "cfm": {},
}
RATES = {"reference_sample_rate": 16000, "s3gen_sample_rate": 24000, "speech_token_hz": 25, "mel_hz": 50,
         "samples_per_mel_frame": 480, "t3_prompt_seconds": 6, "s3gen_prompt_seconds": 10,
         "ve_mel": {"n_mels": 40, "n_fft": 400, "hop_length": 160, "power": 2.0, "fmax": 8000,
                    "partial_frames": 160, "partials_per_second": 1.3},
         "s3gen_mel": {"n_mels": 80, "n_fft": 1920, "hop_length": 480, "fmax": 8000},
         "campplus_fbank": {"n_mels": 80, "sample_rate": 16000},
         "s3tokenizer_mel": {"n_mels": 128, "n_fft": 400, "hop_length": 160}}

Log = Callable[[str], None]


@dataclass
class ExportOptions:
    dtype: str = "fp32"                 # "fp32" or "fp16" (GPU bundles; IO stays fp32)
    quantize_lm: str | None = None      # "int8" | "none"; None: int8 for fp32 bundles, none for fp16
    threads: int = 2                    # torch and ORT (LM checks) threads
    decode_steps: int = 8               # cached greedy decode steps checked by verify_lm
    int8_steps: int = 64                # teacher-forced decode steps compared by verify_lm_int8
    tolerance_scale: float = 1.0        # multiplies every tolerance (0 forces a failure: tests)
    external_data_bytes: int = EXTERNAL_DATA_BYTES  # graphs larger than this keep weights in <name>.onnx.data
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "fp16"):
            raise ValueError(f"dtype must be fp32 or fp16, not {self.dtype!r}")
        if self.quantize_lm not in (None, "none", "int8"):
            raise ValueError(f"--quantize-lm must be none or int8, not {self.quantize_lm!r}")
        if self.quantize_lm is None:
            self.quantize_lm = "int8" if self.dtype == "fp32" else None
        elif self.quantize_lm == "none":
            self.quantize_lm = None
        if self.quantize_lm and self.dtype != "fp32":
            raise ValueError("--quantize-lm int8 is for fp32 (CPU) bundles; it cannot be combined with --dtype fp16")


class VerificationError(AssertionError):
    """A graph differs from its torch module by more than the stated tolerance."""


# --------------------------------------------------------------------------- specs


def graph_specs(component: str, model: nn.Module, cfg: ModelConfig) -> list[GraphSpec]:
    if component == "ve":
        return voice_encoder.graph_specs(model, cfg.voice_encoder)
    if component == "t3":
        return t3_mod.graph_specs(model, cfg.t3)
    if component == "tokenizer":
        return s3tokenizer.graph_specs(model, cfg.s3gen.s3tokenizer)
    if component == "speaker_encoder":
        return campplus.graph_specs(model, cfg.s3gen.campplus)
    if component == "flow":
        return flow_encoder.graph_specs(model, cfg.s3gen.flow)
    if component == "estimator":
        return cfm.graph_specs(model, cfg.s3gen.cfm)
    if component == "mel2wav":
        return hift.graph_specs(model, cfg.s3gen.hift)
    raise KeyError(component)


def graph_dtype(name: str, bundle_dtype: str) -> str:
    return "float16" if bundle_dtype == "fp16" and name not in FP16_KEEP_FP32 else "float32"


def tolerance_for(spec_name: str, default: Tolerance, dtype: str, scale: float) -> Tolerance:
    tol = FP16_TOLERANCE[spec_name] if dtype == "float16" else default
    return Tolerance(atol=tol.atol * scale, rtol=tol.rtol * scale)


# --------------------------------------------------------------------------- writing graphs


def _write_graph(spec: GraphSpec, out_dir: Path, dtype: str, log: Log,
                 external_bytes: int) -> tuple[str, list[str], dict | None]:
    """Export `spec` to `<out_dir>/<name>.onnx` (+ one external data file `<name>.onnx.data` when
    the weights exceed `external_bytes`; torch itself switches to external data past 2 GB);
    fp16 graphs are converted from the fp32 export.  Returns (file, external files, fp16 info)."""
    name = spec.name
    work = out_dir / f".work-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        exported = export_graph(spec, work)
        extras = [f for f in work.iterdir() if f != exported]
        final = out_dir / f"{name}.onnx"
        external: list[str] = []
        info = None
        if dtype == "float16":
            from export.chatterbox.fp16 import convert_fp16
            info = convert_fp16(exported, final, precise_inputs=FP16_PRECISE_INPUTS.get(name, ()),
                                external_bytes=external_bytes)
            external = info.pop("external_data")
        elif extras or sum(f.stat().st_size for f in work.iterdir()) > external_bytes:
            # past 2 GB torch writes one file per tensor: gather them into one data file
            log(f"  {name}: weights -> external data {name}.onnx.data")
            external = save_onnx(onnx.load(str(exported)), final, external_bytes=0)
        else:
            exported.replace(final)
        return final.name, external, info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _axes(spec: GraphSpec) -> dict[str, dict[str, str]]:
    return {k: {str(a): label for a, label in v.items()} for k, v in spec.dynamic_axes.items()}


def _graph_entry(root: Path, spec: GraphSpec, file: str, external: list[str], dtype: str,
                 component: str, fp16_info: dict | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": file, "sha256": sha256_file(root / file), "inputs": list(spec.input_names),
                             "outputs": list(spec.output_names), "dynamic_axes": _axes(spec),
                             "dtype": dtype, "io_dtype": "float32", "component": component}
    if external:
        entry["external_data"] = {f: sha256_file(root / f) for f in external}
    if fp16_info is not None:
        entry["fp32_islands"] = fp16_info
    return entry


# --------------------------------------------------------------------------- verification


def verify_component(component: str, model: nn.Module, cfg: ModelConfig, graph_files: dict[str, Path],
                     dtypes: dict[str, str], options: ExportOptions, log: Log,
                     int8_file: Path | None = None, lm_fp32_file: Path | None = None) -> dict[str, dict]:
    """Check each of the component's graphs (paths in `graph_files`) against `model`.

    Raises VerificationError naming the graph and check; returns per-graph reports.
    """
    reports: dict[str, dict] = {}
    for spec in graph_specs(component, model, cfg):
        path = graph_files[spec.name]
        dtype = dtypes[spec.name]
        tol = tolerance_for(spec.name, spec.tolerance, dtype, options.tolerance_scale)
        spec = dataclasses.replace(spec, tolerance=tol)
        start = time.perf_counter()
        try:
            report = verify_graph(spec, path)
            report["dtype"] = dtype
            if spec.name == "t3_lm":
                from export.chatterbox.lm_verify import verify_lm
                report = {"right_padded_step": report,
                          "left_padded_decode": verify_lm(model, cfg.t3, path, decode_steps=options.decode_steps,
                                                          tolerance=tol, threads=options.threads),
                          "dtype": dtype, "tolerance": {"atol": tol.atol, "rtol": tol.rtol}}
            elif spec.name == "t3_lm_step":
                from export.chatterbox.lm_verify import verify_lm_step
                report = {"right_padded_step": report,
                          "runtime_cache_vs_t3_lm": verify_lm_step(model, cfg.t3, path, graph_files["t3_lm"],
                                                                   decode_steps=options.decode_steps,
                                                                   tolerance=tol, threads=options.threads),
                          "dtype": dtype, "tolerance": {"atol": tol.atol, "rtol": tol.rtol}}
        except AssertionError as e:
            raise VerificationError(f"verification failed: {e}") from None
        report["seconds"] = round(time.perf_counter() - start, 2)
        report["passed"] = True
        reports[spec.name] = report
        log(f"  verified {spec.name} ({dtype}): max error {_max_err(report):.3g} "
            f"(atol {tol.atol:g}, rtol {tol.rtol:g}) in {report['seconds']:.1f}s")
    if component == "t3" and int8_file is not None:
        from export.chatterbox.lm_verify import int8_thresholds, verify_lm_int8
        start = time.perf_counter()
        # the bounds scale with tolerance_scale; 0 (tests) asks for the impossible, to exercise the failure path
        try:
            rep = verify_lm_int8(model, cfg.t3, lm_fp32_file or graph_files["t3_lm_step"], int8_file,
                                 steps=options.int8_steps, thresholds=int8_thresholds(options.tolerance_scale),
                                 threads=options.threads)
        except AssertionError as e:
            raise VerificationError(f"verification failed: {e}") from None
        rep["seconds"] = round(time.perf_counter() - start, 2)
        rep["passed"] = True
        reports[INT8_LM] = rep
        agree = rep["confident_agreement"]
        log(f"  verified {INT8_LM} vs t3_lm_step: KL mean {rep['kl_mean']:.3g} max {rep['kl_max']:.3g}, relative "
            f"logit error {rep['relative_logit_error']:.3g}, confident top-1 agreement "
            f"{'n/a' if agree is None else f'{agree:.3f}'} ({rep['rows']} rows x {rep['steps']} steps) "
            f"in {rep['seconds']:.1f}s")
    return reports


def _max_err(report: dict) -> float:
    errs = []

    def walk(r: Any) -> None:
        if isinstance(r, dict):
            for k, v in r.items():
                if k == "max_abs_error" and isinstance(v, dict):
                    errs.extend(float(x) for x in v.values())
                else:
                    walk(v)
    walk(report)
    return max(errs, default=0.0)


# --------------------------------------------------------------------------- export


def _staging_dir(out: Path) -> Path:
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty (use --overwrite to replace it)")


def model_section(cfg: ModelConfig) -> dict[str, Any]:
    t3c = cfg.t3
    return {
        "config": cfg.sections(),
        "tokens": {"start_text": t3c.start_text_token, "stop_text": t3c.stop_text_token,
                   "start_speech": t3c.start_speech_token, "stop_speech": t3c.stop_speech_token,
                   "speech_vocab_size": cfg.s3gen.flow.vocab_size, "text_vocab_size": t3c.text_vocab_size},
        "t3": {"num_layers": t3c.num_layers, "num_kv_heads": t3c.num_kv_heads, "head_dim": t3c.head_dim,
               "hidden_size": t3c.hidden_size, "cond_len": t3c.cond_len, "prompt_len": t3c.prompt_len,
               "speech_positions": t3c.speech_positions, "text_positions": t3c.text_positions},
        "rates": RATES,
    }


def generation_defaults(cfg: ModelConfig) -> dict[str, Any]:
    gen = json.loads(json.dumps(GENERATION))
    c = cfg.s3gen.cfm
    gen["cfm"] = {"n_timesteps": c.n_timesteps, "t_scheduler": c.t_scheduler, "cfg_rate": c.cfg_rate}
    return gen


def export_bundle(source: Source, out: Path, options: ExportOptions | None = None,
                  log: Log = print) -> dict[str, Any]:
    """Export every contract graph of `source` into the bundle directory `out`; returns bundle.json."""
    options = options or ExportOptions()
    out = Path(out)
    _check_out(out, options.overwrite)
    cfg = source.cfg
    torch.set_num_threads(max(1, options.threads))
    started = time.perf_counter()
    if isinstance(source, Checkpoint):
        log(f"checking checkpoint {source.location}")
        source.check()
    staging = _staging_dir(out)
    graphs: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    fingerprints: dict[str, str] = {}
    try:
        for component in COMPONENTS:
            t0 = time.perf_counter()
            model = source.load(component)
            fingerprints[component] = weights_fingerprint(model)
            log(f"{component}: loaded in {time.perf_counter() - t0:.1f}s")
            files: dict[str, Path] = {}
            dtypes: dict[str, str] = {}
            lm_fp32: Path | None = None
            int8: Path | None = None
            for spec in graph_specs(component, model, cfg):
                t0 = time.perf_counter()
                dtype = graph_dtype(spec.name, options.dtype)
                file, external, info = _write_graph(spec, staging, dtype, log, options.external_data_bytes)
                files[spec.name], dtypes[spec.name] = staging / file, dtype
                graphs[spec.name] = _graph_entry(staging, spec, file, external, dtype, component, info)
                size = sum((staging / f).stat().st_size for f in [file, *external])
                log(f"  exported {file} ({size / 1e6:.1f} MB, {dtype}) in {time.perf_counter() - t0:.1f}s")
                if spec.name == "t3_lm_step" and options.quantize_lm == "int8":
                    from export.chatterbox.lm_verify import quantize_lm
                    t0 = time.perf_counter()
                    info = quantize_lm(staging / file, staging / INT8_FILE,
                                       external_bytes=options.external_data_bytes)
                    int8, lm_fp32 = staging / INT8_FILE, staging / file
                    ext8 = info.pop("external_data")
                    del info["file"]
                    graphs[INT8_LM] = _graph_entry(staging, spec, INT8_FILE, ext8, "int8-dynamic", component, None)
                    graphs[INT8_LM].update({"reference_graph": "t3_lm_step", "quantization": info})
                    size = sum((staging / f).stat().st_size for f in [INT8_FILE, *ext8])
                    log(f"  quantized {INT8_FILE} ({size / 1e6:.1f} MB, {info['quantized_matmuls']} int8 MatMuls, "
                        f"{len(info['fp32_matmuls'])} kept fp32) in {time.perf_counter() - t0:.1f}s")
            reports.update(verify_component(component, model, cfg, files, dtypes, options, log,
                                            int8_file=int8, lm_fp32_file=lm_fp32))
            del model
            gc.collect()

        assets: dict[str, Any] = {}
        source.text_tokenizer(staging / "tokenizer.json")
        from export.chatterbox.text_tokenizer import check_tokenizer
        tok = check_tokenizer(staging / "tokenizer.json", cfg.t3, "tokenizer.json")
        assets["text_tokenizer"] = {"file": "tokenizer.json", "sha256": sha256_file(staging / "tokenizer.json"),
                                    "format": "tokenizers", "space_token": tok["space_token"],
                                    "vocab_size": tok["vocab_size"],
                                    "synthetic": isinstance(source, RandomInit)}
        voice = source.default_voice()
        if voice is not None:
            np.savez(staging / "default_voice.npz", **voice)
            assets["default_voice"] = {"file": "default_voice.npz",
                                       "sha256": sha256_file(staging / "default_voice.npz"),
                                       "format": "npz", "keys": VOICE_KEYS,
                                       "synthetic": isinstance(source, RandomInit)}

        src_desc = source.describe()
        src_desc.update({"exporter": EXPORTER, "weights_sha256": fingerprints,
                         "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                                      "onnxruntime": __import__("onnxruntime").__version__}})
        manifest = {
            "format_version": FORMAT_VERSION,
            "family": FAMILY,
            "name": out.name,
            "sample_rate": SAMPLE_RATE,
            "dtype": options.dtype,
            "graphs": {name: graphs[name] for name in [*GRAPHS, INT8_LM] if name in graphs},
            "assets": assets,
            "generation": generation_defaults(cfg),
            "model": model_section(cfg),
            "source": src_desc,
            "verification": {"passed": True, "by": EXPORTER, "graphs": reports,
                             "tolerance_scale": options.tolerance_scale,
                             "fp16_tolerances": ({k: dataclasses.asdict(v) for k, v in FP16_TOLERANCE.items()}
                                                 if options.dtype == "fp16" else None),
                             "seconds": round(time.perf_counter() - started, 1)},
        }
        write_manifest(staging, _jsonable(manifest))
        load_bundle(str(staging))          # what workers do: every file present, every hash right
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        return manifest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        source.close()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# --------------------------------------------------------------------------- re-verification


def source_from_manifest(manifest: dict[str, Any], checkpoint: str | None = None,
                         storage=None) -> Source:
    """The torch weights a bundle was exported from, rebuilt from what bundle.json records."""
    src = manifest.get("source") or {}
    try:
        cfg = ModelConfig.from_sections(manifest["model"]["config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"bundle.json has no usable model config ({e})") from None
    kind = src.get("kind")
    if checkpoint is not None:
        kind = "checkpoint"
    if kind == "random-init":
        return RandomInit(cfg, seed=int(src["seed"]), preset=src.get("preset"))
    if kind == "checkpoint":
        location = checkpoint or src.get("location")
        if not location:
            raise CheckpointError("bundle.json records no checkpoint location: pass --checkpoint")
        ckpt = Checkpoint(location, cfg, storage=storage)
        for name, digest in (src.get("files") or {}).items():
            if checkpoint is not None and name not in ("ve.safetensors", "t3_cfg.safetensors", "t3_cfg.pt",
                                                       "s3gen.safetensors"):
                continue
            if ckpt.exists(name) and ckpt.sha256(name) != digest:
                raise CheckpointError(f"checkpoint file {name} at {location} differs from the one the bundle "
                                      f"was exported from (sha256 {ckpt.sha256(name)[:12]}… != {digest[:12]}…)")
        return ckpt
    raise CheckpointError(f"bundle.json source kind {kind!r} cannot be rebuilt: pass --checkpoint")


def verify_bundle(path: str, checkpoint: str | None = None, storage=None, threads: int = 2,
                  log: Log = print) -> dict[str, Any]:
    """Re-run the export verification of a Chatterbox bundle against rebuilt torch modules."""
    bundle: Bundle = load_bundle(path, storage)
    manifest = bundle.manifest
    if manifest["family"] != FAMILY:
        raise ValueError(f"{path}: family {manifest['family']!r} is not {FAMILY!r}")
    torch.set_num_threads(max(1, threads))
    source = source_from_manifest(manifest, checkpoint, storage)
    options = ExportOptions(threads=threads, dtype=manifest.get("dtype", "fp32"),
                            decode_steps=_recorded(manifest, "decode_steps", 8),
                            int8_steps=_recorded(manifest, "steps", 64, graph=INT8_LM))
    recorded = (manifest.get("source") or {}).get("weights_sha256", {})
    started = time.perf_counter()
    reports: dict[str, Any] = {}
    try:
        for component in COMPONENTS:
            names = [n for n in COMPONENT_GRAPHS[component] if n in manifest["graphs"]]
            if not names:
                continue
            model = source.load(component)
            fp = weights_fingerprint(model)
            if component in recorded and recorded[component] != fp:
                raise CheckpointError(f"rebuilt {component} weights differ from the ones exported "
                                      f"(fingerprint {fp[:12]}… != {recorded[component][:12]}…)")
            files = {n: bundle.graph(n) for n in names}
            dtypes = {n: manifest["graphs"][n].get("dtype", "float32") for n in names}
            int8 = bundle.graph(INT8_LM) if component == "t3" and INT8_LM in manifest["graphs"] else None
            log(f"{component}: rebuilt, verifying {', '.join(names + ([INT8_LM] if int8 else []))}")
            reports.update(verify_component(component, model, source.cfg, files, dtypes, options, log,
                                            int8_file=int8))
            del model
            gc.collect()
    finally:
        source.close()
    missing = [g for g in GRAPHS if g not in manifest["graphs"]]
    if missing:
        raise VerificationError(f"{path}: bundle lacks contract graphs {missing}")
    return {"bundle": str(bundle.path), "passed": True, "seconds": round(time.perf_counter() - started, 1),
            "graphs": reports}


def _recorded(manifest: dict, key: str, default: int, graph: str = "t3_lm") -> int:
    rep = ((manifest.get("verification") or {}).get("graphs") or {}).get(graph) or {}
    if graph == "t3_lm":
        rep = rep.get("left_padded_decode") or {}
    return int(rep.get(key, default))


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Max error per graph and output check, for printing."""
    out = {}
    for name, rep in report.items():
        if name == INT8_LM:
            out[name] = {k: rep[k] for k in ("kl_mean", "kl_max", "confident_agreement", "relative_logit_error",
                                             "greedy_agreement", "steps")}
        else:
            out[name] = {"max_abs_error": float(f"{_max_err(rep):.3g}"), "tolerance": rep.get("tolerance")}
    return out

