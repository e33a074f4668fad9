"""Names and shapes of the released Chatterbox checkpoint files (package data: official_layout.json).

Every parameter and buffer of the official modules, per checkpoint file
(`ve.safetensors`, `t3_cfg.safetensors`, `s3gen.safetensors`), at the released
(full) sizes and in the official state-dict order.  The full-size modules must
match it exactly; the checkpoint loader uses it to explain a file that does not fit.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable

LAYOUT_FILE = Path(__file__).parent / "official_layout.json"


@functools.cache
def official_layout() -> dict[str, dict[str, list[int]]]:
    """{checkpoint file: {key: shape}}; parsed once and shared, so callers must not modify it."""
    with open(LAYOUT_FILE) as f:
        return json.load(f)


def section(file: str, prefix: str = "") -> dict[str, list[int]]:
    """The keys of `file` under `prefix`, prefix stripped (a fresh dict: callers may modify it)."""
    return {k[len(prefix):]: list(v) for k, v in official_layout()[file].items() if k.startswith(prefix)}


def matching_file(keys: Iterable[str]) -> str | None:
    """The official file holding more than half of `keys` (the files share no key), else None."""
    names = set(keys)
    counts = {file: len(names & layout.keys()) for file, layout in official_layout().items()}
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] * 2 > len(names) else None
