"""Manifests in: read once on the driver and checked before any work.

A text manifest has `id` (unique, non-empty strings) and the columns the
pipeline's stages read (`text`, optional `speaker_id` and per-row parameters);
any other columns are the user's own and come back in the results.
"""
from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.errors import VoxrayError
from actors.stage import Column
from actors.storage import StorageOptions
from jobs.config import PipelineSpec

SPEAKER_COLUMNS = ("speaker_id", "audio_uri")
_KINDS = {
    "str": (pa.types.is_string, pa.types.is_large_string),
    "float": (pa.types.is_integer, pa.types.is_floating),
    "int": (pa.types.is_integer,),
}
_VIOLATES = {">": pc.less_equal, ">=": pc.less, "<=": pc.greater}


class ManifestError(VoxrayError):
    """The manifest as a whole cannot be used; nothing was synthesized."""


def _read(uri: str, storage: StorageOptions, what: str) -> pa.Table:
    """The whole table: every page is read here, so a corrupt one is found before any work."""
    fs, path = storage.resolve(uri)
    try:
        return pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise ManifestError(f"{what} {uri}: not found") from None
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"{what} {uri}: unreadable as Parquet ({str(e).splitlines()[0]})") from None


def _check_keys(keys: pa.ChunkedArray, name: str, what: str) -> None:
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        raise ManifestError(f"{what}: column {name!r} must be strings, got {keys.type}")
    empty = pc.or_kleene(pc.is_null(keys), pc.equal(pc.utf8_trim_whitespace(keys), ""))
    missing = pc.sum(empty).as_py() or 0
    if missing:
        first = pc.index(empty, True).as_py()
        raise ManifestError(f"{what}: {missing} rows have no {name} (first at row {first})")
    counts = pc.value_counts(keys)
    dupes = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist()
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:5])
        raise ManifestError(f"{what}: {len(dupes)} duplicate {name} values ({shown}{', ...' if len(dupes) > 5 else ''})")


def _check_column(table: pa.Table, name: str, column: Column, what: str) -> None:
    """Type and, for parameters, range of every non-null value."""
    values = table.column(name)
    if pa.types.is_null(values.type):
        return
    if not any(test(values.type) for test in _KINDS.get(column.kind, (lambda t: True,))):
        raise ManifestError(f"{what}: column {name!r} must hold {column.kind} values ({column.doc}), "
                            f"got {values.type}")
    if column.kind not in ("float", "int"):
        return
    numbers = pc.cast(values, pa.float64())
    bad = pc.is_nan(numbers)
    for op, bound in column.bounds:
        bad = pc.or_(bad, _VIOLATES[op](numbers, bound))
    bad = pc.fill_null(bad, False)
    count = pc.sum(bad).as_py() or 0
    if count:
        first = pc.index(bad, True).as_py()
        v = numbers[first].as_py()
        shown = "NaN" if math.isnan(v) else f"{v:g}"
        raise ManifestError(f"{what}: {count} rows have {name} outside its range ({column.range_text()}, no NaN); "
                            f"first: id {table.column('id')[first].as_py()!r} has {name}={shown}")


def read_text_manifest(uri: str, storage: StorageOptions, pipeline: PipelineSpec) -> pa.Table:
    """The manifest, checked against what `pipeline` reads and writes; ManifestError otherwise."""
    what = "text manifest"
    table = _read(uri, storage, what)
    columns = pipeline.input_columns()
    missing = [c for c in ("id", *(k for k, c in columns.items() if not c.optional)) if c not in table.column_names]
    if missing:
        raise ManifestError(f"{what} {uri}: missing columns {missing} (has {table.column_names})")
    reserved = sorted(set(table.column_names) & pipeline.reserved_columns())
    if reserved:
        raise ManifestError(f"{what} {uri}: columns {reserved} are the job's own (results carry them); "
                            "rename or drop them in the manifest")
    _check_keys(table.column("id"), "id", f"{what} {uri}")
    for name, column in columns.items():
        if name in table.column_names:
            _check_column(table, name, column, f"{what} {uri}")
    pipeline.check_chain(table.column_names)
    return table


def read_speaker_manifest(uri: str, storage: StorageOptions) -> pa.Table:
    what = "speaker manifest"
    table = _read(uri, storage, what)
    missing = [c for c in SPEAKER_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{what} {uri}: missing columns {missing} (has {table.column_names})")
    _check_keys(table.column("speaker_id"), "speaker_id", f"{what} {uri}")
    return table
