"""Test-only stage and entry point that report whether torch was imported at run time."""
from __future__ import annotations

import sys
import time

from actors import chatterbox
from actors.vits import VitsStage


def torch_free(cls: type) -> type:
    """`cls` failing every row if its worker process has imported torch."""

    def __call__(self, batch):
        if "torch" in sys.modules:
            raise RuntimeError("torch was imported in a worker")
        return cls.__call__(self, batch)

    return type(f"TorchFree{cls.__name__}", (cls,), {"__call__": __call__, "__module__": __name__})


TorchFreeVitsStage = torch_free(VitsStage)
TorchFreeConditioning = torch_free(chatterbox.Conditioning)
TorchFreeT3 = torch_free(chatterbox.T3)
TorchFreeS3GenEncoder = torch_free(chatterbox.S3GenEncoder)
TorchFreeCFM = torch_free(chatterbox.CFM)
TorchFreeVocoder = torch_free(chatterbox.Vocoder)


class SlowT3(chatterbox.T3):
    """T3 taking at least a second per call, so a test can kill its actor while rows are in flight."""

    def __call__(self, batch):
        time.sleep(1.0)
        return super().__call__(batch)


if __name__ == "__main__":
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.bulk_synth import main

    code = main(sys.argv[1:])
    print(f"TORCH_IN_DRIVER={'torch' in sys.modules}")
    sys.exit(code)
