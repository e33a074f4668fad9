"""The stage contract every model family follows.

A stage is a plain Python class, Ray-agnostic, used unchanged by Ray Data actor
pools (bulk jobs) and the in-process runner, and meant for Ray Serve deployments:

    stage = SomeStage(bundle, options={...}, backend=Backend(...), sessions=None, name=None,
                      storage=None, cache=None)
    out = stage(batch)            # batch: dict of equal-length numpy columns

A subclass declares what it reads and writes, and implements `process`:

- `family`: the bundle family it runs on; `graphs`: the bundle graphs it opens
  (inputs and outputs checked against bundle.json when opened);
- `Options`: a pydantic model of its options (unknown keys are errors);
- `requires` / `provides`: column name → `Column`; the pipeline checks the
  chain (manifest columns + earlier stages' outputs) before any work, and the
  bulk job checks manifest columns against the declared kinds and ranges;
- `drops`: intermediate columns it consumes that later stages don't need;
- `process(batch, rows)`: gets only the rows still alive and returns every
  provided column for each of them; `rows.fail(i, message)` fails one row.

`__call__` does the bookkeeping the contract promises: rows that failed
earlier pass through untouched, exactly one output row per input row
(checked), a `time_<name>_s` column, and a batch that raises is bisected down
to the rows that broke it, which fail alone with the exception's message.
"""
from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from actors.backends import Backend, Session, open_session, relative_error
from actors.bundle import Bundle
from actors.errors import BundleError, ConfigError, describe_validation_error
from actors.rows import Batch, RowStatus, batch_len, value
from actors.storage import StorageOptions

Kind = Literal["str", "float", "int", "array", "bytes"]
_HOLDS = {">": operator.gt, ">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Column:
    """A column a stage reads or writes: its kind, meaning and, for parameters, its valid range."""

    kind: Kind
    doc: str
    optional: bool = False
    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    dtype: str = "float32"
    """Element type of an "array" column (the fill for failed rows is an empty array of it)."""
    result: bool = False
    """Kept in the results Parquet (intermediates are not)."""

    def check(self, name: str, v: Any) -> Any:
        """A row's value converted to the column's kind; ValueError naming the column if it is invalid."""
        if self.kind in ("float", "int"):
            try:
                number = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={v!r} is not a number") from None
            if math.isnan(number):
                raise ValueError(f"{name} is NaN")
            for op, bound in self.bounds:
                if not _HOLDS[op](number, bound):
                    raise ValueError(f"{name}={number:g} is out of range (must be {op} {bound:g})")
            return int(number) if self.kind == "int" else number
        if self.kind == "str" and not isinstance(v, str):
            raise ValueError(f"{name}={v!r} is not a string")
        return v

    @property
    def bounds(self) -> list[tuple[str, float]]:
        """The range as (comparison, bound) pairs a valid value satisfies, e.g. [(">=", 0.1), ("<=", 10)]."""
        return [(op, b) for op, b in ((">", self.gt), (">=", self.ge), ("<=", self.le)) if b is not None]

    def range_text(self) -> str:
        return " and ".join(f"{op} {b:g}" for op, b in self.bounds)

    def fill(self, n: int) -> np.ndarray:
        """Values for rows without output (failed rows)."""
        if self.kind == "float":
            return np.full(n, np.nan)
        if self.kind == "int":
            return np.zeros(n, dtype=self.dtype if self.dtype.startswith("int") else "int64")
        out = np.empty(n, dtype=object)
        empty = {"str": "", "bytes": b""}.get(self.kind)
        for i in range(n):
            out[i] = np.zeros(0, dtype=self.dtype) if self.kind == "array" else empty
        return out


class StageOptions(BaseModel):
    """Base of every stage's options: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, data: "StageOptions | Mapping[str, Any] | None", where: str,
              prefix: str = "options") -> "StageOptions":
        """Validated options; ConfigError naming `where` and the key path (`prefix`.key) otherwise."""
        if isinstance(data, cls):
            return data
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as e:
            raise ConfigError(describe_validation_error(e, where, prefix)) from None


class Stage:
    """Base class of every stage; see the module docstring for the contract."""

    name: ClassVar[str]
    family: ClassVar[str]
    Options: ClassVar[type[StageOptions]] = StageOptions
    requires: ClassVar[Mapping[str, Column]] = {}
    provides: ClassVar[Mapping[str, Column]] = {}
    drops: ClassVar[tuple[str, ...]] = ()
    graphs: ClassVar[tuple[str, ...]] = ()
    once_per: ClassVar[tuple[str, str] | None] = None
    """(input column, outcome column): rows with equal input values get equal outputs, which the stage
    caches (under `cache`) and reports per row in the outcome column as "computed", "memory" or "store".
    The bulk job first runs the stage on one row per distinct value, so each is computed once."""

    def __init__(self, bundle: Bundle, *, options: StageOptions | Mapping[str, Any] | None = None,
                 backend: Backend | None = None, sessions: Mapping[str, Session] | None = None,
                 name: str | None = None, storage: StorageOptions | None = None,
                 cache: str | None = None) -> None:
        if bundle.family != self.family:
            raise BundleError(f"{type(self).__name__} runs on {self.family!r} bundles; "
                              f"{bundle.path} is a {bundle.family!r} bundle")
        self.bundle = bundle
        self.name = name or type(self).name
        self.options = self.Options.parse(options, f"stage {self.name!r}")
        self.backend = backend or Backend()
        self.storage = storage or StorageOptions.from_env()
        self.cache = cache
        """A folder (local or s3://) where the stage may keep what it computed for later runs
        (the bulk job passes `<output>/_cache`); None: nothing is kept beyond the process."""
        given = dict(sessions or {})
        self.sessions: dict[str, Session] = {
            g: given[g] if g in given else bundle.open(self.bundle_graph(g), self.backend) for g in self.graphs}
        self.precision_errors = {g: self._verify_precision(g) for g in self.graphs
                                 if g not in given and self.backend.precision != "f32"}
        self._calls = self._rows_in = 0

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        """Every provided column for every row of `batch` (all alive when called)."""
        raise NotImplementedError

    def bundle_graph(self, graph: str) -> str:
        """The bundle graph that serves `graph` (a stage option may pick a verified variant, e.g. int8)."""
        return graph

    def probe_feeds(self, graph: str) -> dict[str, np.ndarray]:
        """Representative inputs of `graph`, used to check a reduced precision against f32."""
        raise ConfigError(f"stage {self.name!r} has no probe inputs for graph {graph!r}: "
                          "it cannot run at a reduced precision")

    def row_value(self, batch: Batch, name: str, i: int, default: Any = None) -> Any:
        """Row i of a declared input column, checked against its declaration; `default` when null."""
        v = value(batch, name, i)
        return default if v is None else self.requires[name].check(name, v)

    def batch_stats(self) -> dict[str, float]:
        """Batches this instance has seen: calls and mean rows per call (stages add their own figures)."""
        return {"calls": self._calls, "rows_per_call": round(self._rows_in / max(self._calls, 1), 2)}

    def __call__(self, batch: Batch) -> Batch:
        n = batch_len(batch)
        self._calls += 1
        self._rows_in += n
        rows = RowStatus.of(batch)
        out = {name: column.fill(n) for name, column in self.provides.items()}
        elapsed = np.zeros(n, dtype=np.float64)
        self._run([i for i in range(n) if rows.ok(i)], batch, rows, out, elapsed)
        result = {k: v for k, v in batch.items() if k not in self.drops}
        result.update(out)
        result.update(rows.columns())
        result[f"time_{self.name}_s"] = elapsed
        return result

    def _run(self, live: list[int], batch: Batch, rows: RowStatus, out: Batch, elapsed: np.ndarray) -> None:
        if not live:
            return
        sub = {k: v[live] for k, v in batch.items()}
        sub_rows = RowStatus([None] * len(live))
        start = time.perf_counter()
        try:
            produced = self.process(sub, sub_rows)
            missing = [k for k in self.provides if k not in produced or len(produced[k]) != len(live)]
            if missing:
                raise RuntimeError(f"stage {self.name!r} returned no value for {len(live)} rows "
                                   f"in columns {missing} (one row out per row in)")
        except Exception as e:  # isolate the rows that broke the batch
            if len(live) == 1:
                rows.fail(live[0], f"{self.name}: {type(e).__name__}: {e}")
                return
            half = len(live) // 2
            self._run(live[:half], batch, rows, out, elapsed)
            self._run(live[half:], batch, rows, out, elapsed)
            return
        share = (time.perf_counter() - start) / len(live)
        for j, i in enumerate(live):
            elapsed[i] += share
            if not sub_rows.ok(j):
                rows.fail(i, sub_rows.errors[j])
                continue
            for k in self.provides:
                out[k][i] = produced[k][j]

    def _verify_precision(self, graph: str) -> float:
        """The reduced-precision session against an ONNX Runtime f32 one on the stage's probe inputs."""
        feeds = self.probe_feeds(graph)
        reference = open_session(self.bundle.graph(graph), Backend(threads=self.backend.threads)).run(feeds)
        error = relative_error(reference, self.sessions[graph].run(feeds))
        if error > self.backend.tolerance:
            raise ConfigError(f"stage {self.name!r}: graph {graph!r} at precision {self.backend.precision} "
                              f"differs from f32 by {error:.3g} (relative to the output's peak), over the "
                              f"tolerance {self.backend.tolerance:g}; use precision f32 or raise tolerance")
        return error
