"""What the S3Gen stages share: per-chunk work units cut from rows, grouped into padded graph calls.

Each text chunk of a row is one unit (one S3Gen call in the official model); the
units of all rows of a batch are grouped by length so that a graph call wastes
little compute on padding.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from actors.bundle import Bundle
from actors.errors import BundleError


def length_groups(lengths: Sequence[int], max_rows: int, max_ratio: float) -> list[list[int]]:
    """Indices into `lengths` grouped for padded graph calls, shortest first.

    A group holds at most `max_rows` indices and its longest item is at most
    `max_ratio` times its shortest (`max_ratio` 1: equal lengths only).
    """
    groups: list[list[int]] = []
    for k in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if groups and len(groups[-1]) < max_rows and lengths[k] <= max_ratio * lengths[groups[-1][0]]:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def pad_last(arrays: Sequence[np.ndarray], dtype: Any = np.float32) -> np.ndarray:
    """Arrays of equal shape but for the last axis, stacked and right-padded with zeros."""
    out = np.zeros((len(arrays),) + arrays[0].shape[:-1] + (max(a.shape[-1] for a in arrays),), dtype=dtype)
    for b, a in enumerate(arrays):
        out[b, ..., :a.shape[-1]] = a
    return out


def model_config(bundle: Bundle, section: str) -> dict[str, Any]:
    """The sizes of one component (`flow`, `cfm`, `hift`) from bundle.json `model.config`."""
    try:
        return dict(bundle.manifest["model"]["config"][section])
    except (KeyError, TypeError):
        raise BundleError(f"bundle {bundle.path}: bundle.json has no model.config.{section}") from None
