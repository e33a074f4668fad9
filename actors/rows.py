"""Per-row bookkeeping for stages: status, error message and timings of every row."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np

OK, ERROR = "ok", "error"


def column(batch: dict[str, np.ndarray], name: str, i: int) -> Any:
    """Row i of an optional column (None when the column is absent or the value null).

    Nulls reach a numpy batch as None or as NaN, depending on how Ray converted the block.
    """
    values = batch.get(name)
    if values is None:
        return None
    value = values[i]
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    return value


class RowResults:
    """Status of each row of a batch; rows that an earlier step failed stay failed."""

    def __init__(self, batch: dict[str, np.ndarray]) -> None:
        n = len(next(iter(batch.values())))
        status, error = batch.get("status"), batch.get("error")
        self.errors: list[str | None] = [
            (str(error[i]) if error is not None else "failed earlier") if status is not None and status[i] == ERROR
            else None for i in range(n)]
        self.times: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n, dtype=np.float64))

    def fail(self, i: int, message: str) -> None:
        if self.errors[i] is None:  # keep the first cause
            self.errors[i] = message

    def ok(self, i: int) -> bool:
        return self.errors[i] is None

    def add_time(self, i: int, stage: str, seconds: float) -> None:
        self.times[stage][i] += seconds

    def to_columns(self, batch: dict[str, np.ndarray], audio: np.ndarray, sample_rate: int,
                   stages: Iterable[str]) -> dict[str, np.ndarray]:
        out = dict(batch)
        out["audio"] = audio
        out["sample_rate"] = np.full(len(audio), sample_rate, dtype=np.int32)
        out["duration_s"] = np.array([len(a) / sample_rate for a in audio], dtype=np.float64)
        out["status"] = np.array([OK if e is None else ERROR for e in self.errors], dtype=object)
        out["error"] = np.array(["" if e is None else e for e in self.errors], dtype=object)
        for stage in stages:
            out[f"time_{stage}_s"] = self.times[stage]
        return out
