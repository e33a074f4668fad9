"""Per-row state that travels with every batch through every stage: `status` and `error`."""
from __future__ import annotations

from typing import Any

import numpy as np

OK, ERROR = "ok", "error"
Batch = dict[str, np.ndarray]


def batch_len(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def value(batch: Batch, name: str, i: int) -> Any:
    """Row i of an optional column (None when the column is absent or the value null).

    Nulls reach a numpy batch as None or as NaN, depending on how Ray converted the block.
    """
    values = batch.get(name)
    if values is None:
        return None
    v = values[i]
    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return None
    return v


class RowStatus:
    """Which rows of a batch are still alive, and why the others failed (the first cause is kept)."""

    def __init__(self, errors: list[str | None]) -> None:
        self.errors = errors

    @classmethod
    def of(cls, batch: Batch) -> "RowStatus":
        """The status a batch arrives with: rows an earlier stage (or the driver) failed stay failed."""
        n = batch_len(batch)
        status, error = batch.get("status"), batch.get("error")
        if status is None:
            return cls([None] * n)
        return cls([None if status[i] == OK else str(error[i] if error is not None else "") or "failed earlier"
                    for i in range(n)])

    def ok(self, i: int) -> bool:
        return self.errors[i] is None

    def fail(self, i: int, message: str) -> None:
        if self.errors[i] is None:
            self.errors[i] = message

    def columns(self) -> Batch:
        return {"status": np.array([OK if e is None else ERROR for e in self.errors], dtype=object),
                "error": np.array(["" if e is None else e for e in self.errors], dtype=object)}
