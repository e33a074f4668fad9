"""Re-verify an exported bundle against PyTorch.

    python -m export.verify BUNDLE [--checkpoint DIR_OR_S3_PREFIX]

Checks every file's sha256 (as workers do), then rebuilds the torch modules the
bundle was exported from -- a random-init bundle from its recorded config and
seed, a checkpoint bundle from its recorded location (or `--checkpoint`, whose
files must hash as recorded) -- and re-runs the export's verification: each
graph in ONNX Runtime vs torch at batch 1 and a padded batch, padded rows vs
rows alone, the LM's cached decode, the int8 LM's greedy agreement.  VITS
bundles re-run their batched-inference check.  Prints a JSON summary; a
failure prints `error: ...` and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from actors.bundle import load_bundle
from actors.errors import BundleError
from actors.storage import StorageOptions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.verify", description=__doc__.splitlines()[0])
    p.add_argument("bundle", help="bundle directory or s3:// prefix")
    p.add_argument("--checkpoint", default=None, help="checkpoint to rebuild the torch modules from "
                   "(default: the location bundle.json records)")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint URL for s3:// bundles or checkpoints")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    storage = StorageOptions.from_env(endpoint_url=args.endpoint_url)
    from export.chatterbox.__main__ import quiet_libraries
    quiet_libraries()
    try:
        family = load_bundle(args.bundle, storage).family
        if family == "vits":
            from actors.vits.piper import verify_batched
            report = {"bundle": args.bundle, "passed": True,
                      "batched": verify_batched(load_bundle(args.bundle, storage).path)}
        elif family == "chatterbox":
            from export.chatterbox.bundle_writer import summary, verify_bundle
            report = verify_bundle(args.bundle, checkpoint=args.checkpoint, storage=storage,
                                   threads=args.threads, log=log)
            report["graphs"] = summary(report["graphs"])
        else:
            raise BundleError(f"{args.bundle}: no verifier for family {family!r}")
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        from export.chatterbox.checkpoint import CheckpointError
        if not isinstance(e, (BundleError, CheckpointError, AssertionError, FileNotFoundError, ValueError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
