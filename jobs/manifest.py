"""Manifests in and results out: schemas, up-front validation, and the results Parquet."""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.storage import StorageOptions, join

TEXT_COLUMNS = ("id", "text")
SPEAKER_COLUMNS = ("speaker_id", "audio_uri")
RESULTS_FILE = "results.parquet"
PARTS_DIR = "_results_parts"
AUDIO_DIR = "audio"
RESULT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("audio_uri", pa.string()),
    ("duration_s", pa.float64()),
    ("sample_rate", pa.int32()),
    ("status", pa.string()),
    ("error", pa.string()),
])


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; nothing was synthesized."""


@dataclass
class TextManifest:
    uri: str
    ids: pa.Array


def _read_columns(uri: str, storage: StorageOptions, columns: list[str] | None, what: str) -> pa.Table:
    fs, path = storage.resolve(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise ManifestError(f"{what} {uri}: not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{what} {uri}: unreadable as Parquet ({e})") from None


def _schema(uri: str, storage: StorageOptions, what: str) -> pa.Schema:
    fs, path = storage.resolve(uri)
    try:
        return pq.ParquetDataset(path, filesystem=fs).schema
    except FileNotFoundError:
        raise ManifestError(f"{what} {uri}: not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"{what} {uri}: unreadable as Parquet ({e})") from None


def _check_keys(keys: pa.ChunkedArray, name: str, what: str) -> None:
    if not pa.types.is_string(keys.type) and not pa.types.is_large_string(keys.type):
        raise ManifestError(f"{what}: column {name!r} must be strings, got {keys.type}")
    empty = pc.or_kleene(pc.is_null(keys), pc.equal(pc.utf8_trim_whitespace(keys), ""))
    missing = pc.sum(empty).as_py() or 0
    if missing:
        first = pc.index(empty, True).as_py()
        raise ManifestError(f"{what}: {missing} rows have no {name} (first at row {first})")
    counts = pc.value_counts(keys)
    dupes = [c["values"] for c in counts.to_pylist() if c["counts"] > 1]
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:5])
        raise ManifestError(f"{what}: {len(dupes)} duplicate {name} values ({shown}{', ...' if len(dupes) > 5 else ''})")


def validate_text_manifest(uri: str, storage: StorageOptions) -> TextManifest:
    """Reject an unreadable manifest, missing columns, missing or duplicate ids, before any work."""
    what = "text manifest"
    schema = _schema(uri, storage, what)
    missing = [c for c in TEXT_COLUMNS if c not in schema.names]
    if missing:
        raise ManifestError(f"{what} {uri}: missing columns {missing} (has {schema.names})")
    ids = _read_columns(uri, storage, ["id"], what).column("id")
    _check_keys(ids, "id", f"{what} {uri}")
    return TextManifest(uri, ids.combine_chunks())


def read_speaker_manifest(uri: str, storage: StorageOptions) -> pa.Table:
    what = "speaker manifest"
    table = _read_columns(uri, storage, None, what)
    missing = [c for c in SPEAKER_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{what} {uri}: missing columns {missing} (has {table.column_names})")
    _check_keys(table.column("speaker_id"), "speaker_id", f"{what} {uri}")
    return table


def audio_name(row_id: str, fmt: str) -> str:
    """File name for a row's audio: the id, percent-encoded so any id is a safe single path part."""
    name = urllib.parse.quote(row_id, safe="-_.~ ")
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    return f"{AUDIO_DIR}/{name}.{fmt}"


def read_results(output: str, storage: StorageOptions) -> pa.Table:
    """Results so far under `output`: the consolidated file plus parts left by an interrupted run."""
    fs, root = storage.resolve(output)
    tables = []
    info = fs.get_file_info(join(root, RESULTS_FILE))
    if info.type.name == "File":
        tables.append(pq.read_table(join(root, RESULTS_FILE), filesystem=fs))
    tables += [pq.read_table(f.path, filesystem=fs) for f in _parts(fs, root)]
    if not tables:
        return RESULT_SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def _parts(fs, root: str) -> list:
    from pyarrow.fs import FileSelector

    selector = FileSelector(join(root, PARTS_DIR), allow_not_found=True)
    return sorted((f for f in fs.get_file_info(selector) if f.path.endswith(".parquet")), key=lambda f: f.path)


def done_ids(results: pa.Table) -> pa.Array:
    """Ids that already have audio: a re-run skips them."""
    ok = results.filter(pc.equal(results.column("status"), "ok"))
    return pc.unique(ok.column("id")) if ok.num_rows else pa.array([], pa.string())


def consolidate(output: str, storage: StorageOptions, manifest_ids: pa.Array) -> pa.Table:
    """One result row per manifest id, written to results.parquet; parts are removed afterwards.

    Rows seen several times (a retried write, a re-run) keep an ok result over
    an error and the newest otherwise; a manifest id with no result at all gets
    an error row rather than vanishing.
    """
    fs, root = storage.resolve(output)
    results = read_results(output, storage)
    # Rows are oldest first (consolidated file, then parts in write order); keep per id
    # the last ok row, else the last row.
    status_ok = pc.equal(results.column("status"), "ok").to_pylist()
    best: dict[str, int] = {}
    for i, row_id in enumerate(results.column("id").to_pylist()):
        prev = best.get(row_id)
        if prev is None or status_ok[i] or not status_ok[prev]:
            best[row_id] = i
    results = results.take(pa.array(sorted(best.values()), pa.int64()))
    in_manifest = pc.is_in(results.column("id"), value_set=manifest_ids)
    results = results.filter(in_manifest)
    unseen = pc.filter(manifest_ids, pc.invert(pc.is_in(manifest_ids, value_set=results.column("id"))))
    if len(unseen):
        missing = {name: pa.nulls(len(unseen), RESULT_SCHEMA.field(name).type) for name in RESULT_SCHEMA.names}
        missing.update(id=unseen, status=pa.array(["error"] * len(unseen)),
                       error=pa.array(["no result was produced for this row"] * len(unseen)))
        results = pa.concat_tables([results, pa.table(missing).select(results.column_names)
                                     .cast(results.schema, safe=False)], promote_options="permissive")
    tmp = join(root, f".{RESULTS_FILE}.tmp")
    pq.write_table(results, tmp, filesystem=fs)
    fs.move(tmp, join(root, RESULTS_FILE))
    for part in _parts(fs, root):
        fs.delete_file(part.path)
    return results
