"""Run stages in this process, without Ray: tests, debugging and the benchmarks' baseline."""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from actors.rows import Batch, batch_len


def iter_batches(columns: Batch, batch_size: int) -> Iterator[Batch]:
    for start in range(0, batch_len(columns), batch_size):
        yield {k: v[start:start + batch_size] for k, v in columns.items()}


def run_local(stages: Sequence[Callable[[Batch], Batch]], columns: Batch, batch_size: int) -> Batch:
    """Every row through every stage in order, `batch_size` rows at a time; rows keep their order."""
    outputs: list[Batch] = []
    for batch in iter_batches(columns, batch_size):
        for stage in stages:
            batch = stage(batch)
        outputs.append(batch)
    return {k: _concat([b[k] for b in outputs]) for k in outputs[0]}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if parts[0].dtype == object:
        out = np.empty(sum(len(p) for p in parts), dtype=object)
        for i, x in enumerate(x for p in parts for x in p):  # element-wise: equal-length arrays must not broadcast
            out[i] = x
        return out
    return np.concatenate(parts)
