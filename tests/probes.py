"""Test-only stage and entry point that report whether torch was imported at run time."""
from __future__ import annotations

import sys

from actors.vits import VitsStage


class TorchFreeVitsStage(VitsStage):
    """A VitsStage that fails every row if its worker process has imported torch."""

    def __call__(self, batch):
        if "torch" in sys.modules:
            raise RuntimeError("torch was imported in a worker")
        return super().__call__(batch)


if __name__ == "__main__":
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.bulk_synth import main

    code = main(sys.argv[1:])
    print(f"TORCH_IN_DRIVER={'torch' in sys.modules}")
    sys.exit(code)
