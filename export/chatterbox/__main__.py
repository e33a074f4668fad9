"""Export a Chatterbox model to a verified voxray bundle.

    python -m export.chatterbox --checkpoint DIR_OR_S3_PREFIX --out BUNDLE_DIR
    python -m export.chatterbox --random-init --config tiny --seed 0 --out BUNDLE_DIR

The checkpoint is the official file layout (ve.safetensors, t3_cfg.safetensors,
s3gen.safetensors, tokenizer.json, optional conds.pt), local or under an s3://
prefix (credentials from the AWS environment variables; --endpoint-url for
S3-compatible servers).  `--random-init` needs no checkpoint: seeded random
weights of a size preset (configs/chatterbox/<name>.yaml) for tests and
benchmarks.  Every graph is verified against its PyTorch module before the
bundle is written; problems print `error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from actors.errors import BundleError
from actors.storage import StorageOptions
from export.chatterbox.graph_io import EXTERNAL_DATA_BYTES


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def quiet_libraries() -> None:
    """Tracer and ORT optimizer chatter is not for users: keep warnings from torch.onnx and ORT
    below error level (the export's own log and errors are unaffected)."""
    import warnings

    import onnxruntime as ort

    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    try:
        from torch.jit import TracerWarning
        warnings.filterwarnings("ignore", category=TracerWarning)
    except ImportError:
        pass
    ort.set_default_logger_severity(3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.chatterbox", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR_OR_S3_PREFIX", help="official-layout checkpoint to export")
    src.add_argument("--random-init", action="store_true", help="seeded random weights instead of a checkpoint")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--config", default=None,
                   help="size preset (tiny, full) or YAML path; default: full (the released sizes)")
    p.add_argument("--seed", type=int, default=0, help="random-init seed (default 0)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="graph precision; fp16 is for GPU bundles (IO stays fp32, checked on the CPU)")
    p.add_argument("--quantize-lm", choices=["none", "int8"], default=None,
                   help="int8 (the default for fp32 bundles): also write t3_lm_step.int8.onnx, the decode step graph "
                        "with int8 MatMul weights for CPU workers, checked against fp32; none: skip it "
                        "(fp16 bundles: always none)")
    p.add_argument("--threads", type=int, default=_threads(), help="torch / ONNX Runtime threads")
    p.add_argument("--decode-steps", type=int, default=8, help="cached greedy decode steps the LM check runs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint URL for an s3:// checkpoint")
    p.add_argument("--tolerance-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # tests: 0 forces failure
    p.add_argument("--external-data-threshold", type=int, default=EXTERNAL_DATA_BYTES,
                   help="graphs with more weight bytes than this keep them in <graph>.onnx.data")
    p.add_argument("--quiet", action="store_true", help="print only the final JSON summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.chatterbox.bundle_writer import ExportOptions, VerificationError, export_bundle, summary
    from export.chatterbox.checkpoint import Checkpoint, CheckpointError, ModelConfig, RandomInit

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    quiet_libraries()
    start = time.perf_counter()
    try:
        options = ExportOptions(dtype=args.dtype, quantize_lm=args.quantize_lm, threads=args.threads,
                                decode_steps=args.decode_steps, tolerance_scale=args.tolerance_scale,
                                overwrite=args.overwrite, external_data_bytes=args.external_data_threshold)
        preset = args.config or "full"
        cfg = ModelConfig.from_preset(preset)
        if args.random_init:
            source = RandomInit(cfg, seed=args.seed, preset=preset)
        else:
            storage = StorageOptions.from_env(endpoint_url=args.endpoint_url)
            source = Checkpoint(args.checkpoint, cfg, storage=storage)
        manifest = export_bundle(source, args.out, options, log=log)
    except (CheckpointError, VerificationError, BundleError, FileNotFoundError, FileExistsError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = [g["file"] for g in manifest["graphs"].values()] + \
        [f for g in manifest["graphs"].values() for f in g.get("external_data", {})] + \
        [a["file"] for a in manifest["assets"].values()] + ["bundle.json"]
    size = sum((args.out / f).stat().st_size for f in files)
    print(json.dumps({"bundle": str(args.out), "seconds": round(time.perf_counter() - start, 1),
                      "bytes": size, "dtype": manifest["dtype"], "source": manifest["source"]["kind"],
                      "verification": summary(manifest["verification"]["graphs"])}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
