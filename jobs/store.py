"""An output folder (local or s3://) as a store of results by id, across runs and manifests.

    OUTPUT/audio/<name>.<fmt>          one file per ok row (see `audio_name`)
    OUTPUT/_results_parts/part-*.parquet  one per write task of a running job
    OUTPUT/results.parquet             every id ever written here, its latest result
    OUTPUT/_damaged/                   unreadable parts or results set aside (their rows are redone)
    OUTPUT/_cache/                     what stages keep for later runs (e.g. voice conditionings)
    OUTPUT/_voxray.lock                held by the one job writing here

Every file appears under its final name only when complete (`write_atomic`).
One job at a time: a second job refuses to start while the lock is held; a lock
whose holder died (same host and its process gone, or no heartbeat for
`LOCK_STALE_S`) is taken over.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actors.errors import VoxrayError
from actors.rows import OK
from actors.storage import StorageOptions, is_s3, join, write_atomic

RESULTS_FILE = "results.parquet"
PARTS_DIR = "_results_parts"
AUDIO_DIR = "audio"
DAMAGED_DIR = "_damaged"
CACHE_DIR = "_cache"
LOCK_FILE = "_voxray.lock"
LOCK_HEARTBEAT_S = 10.0
LOCK_STALE_S = 60.0
MAX_NAME_CHARS = 120
"""Longer percent-encoded ids are cut and given a hash suffix: file systems allow 255 bytes per name."""
RESULT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("audio_uri", pa.string()),
    ("duration_s", pa.float64()),
    ("sample_rate", pa.int32()),
])
log = logging.getLogger("voxray.store")


class OutputError(VoxrayError):
    """The output cannot be written, or another job is writing to it."""


def audio_name(row_id: str, fmt: str) -> str:
    """A row's audio file, relative to the output: the id percent-encoded into one safe path part.

    An encoded id over MAX_NAME_CHARS keeps its first part (never cutting an escape) plus
    `~` and 16 hex digits of the id's sha256: unique and the same on every run.
    """
    name = urllib.parse.quote(row_id, safe="-_.~ ")
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    if len(name) > MAX_NAME_CHARS:
        cut = MAX_NAME_CHARS - 17
        while "%" in name[cut - 2:cut]:  # don't split a %XX escape
            cut -= 1
        name = f"{name[:cut]}~{hashlib.sha256(row_id.encode()).hexdigest()[:16]}"
    return f"{AUDIO_DIR}/{name}.{fmt}"


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def concat(tables: list[pa.Table | None]) -> pa.Table:
    """Results written by different runs (unreadable ones are None): columns unified by name."""
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables, promote_options="permissive") if tables else RESULT_SCHEMA.empty_table()


def latest_per_id(table: pa.Table) -> pa.Table:
    """One row per id: the last ok row, else the last row (rows are oldest first), sorted by id."""
    n = table.num_rows
    if not n:
        return table
    ok = pc.fill_null(pc.equal(table.column("status"), OK), False).to_numpy(zero_copy_only=False)
    key = ok.astype(np.int64) * n + np.arange(n, dtype=np.int64)
    best = (pa.table({"id": table.column("id"), "key": key}).group_by("id").aggregate([("key", "max")])
            .column("key_max").to_numpy())
    return table.take(pa.array(np.sort(best % n))).sort_by("id")


class OutputStore:
    def __init__(self, uri: str, storage: StorageOptions) -> None:
        self.uri, self.storage = uri, storage
        self.fs, self.root = storage.resolve(uri)
        self.cache = join(uri, CACHE_DIR)
        """The folder stages keep reusable results in (`Stage.cache`)."""

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def check_writable(self) -> None:
        """Create the output and write and delete a probe file there, before any work."""
        probe = self.path(f"_voxray.probe-{uuid.uuid4().hex[:12]}")
        try:
            info = self.fs.get_file_info(self.root)
            if info.type == pafs.FileType.File:
                raise OutputError(f"output {self.uri} is a file, not a folder")
            self.fs.create_dir(self.root, recursive=True)
            write_atomic(self.fs, probe, b"probe")
            self.fs.delete_file(probe)
        except OutputError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise OutputError(f"output {self.uri} is not writable: {str(e).splitlines()[0]}") from None

    # --- results -------------------------------------------------------------------------------

    def _parts(self) -> list[str]:
        selector = pafs.FileSelector(self.path(PARTS_DIR), allow_not_found=True)
        return sorted(f.path for f in self.fs.get_file_info(selector)
                      if f.type == pafs.FileType.File and f.base_name.startswith("part-")
                      and f.base_name.endswith(".parquet"))

    def _read_or_set_aside(self, path: str) -> pa.Table | None:
        try:
            table = pq.read_table(path, filesystem=self.fs)
            if "id" not in table.column_names or "status" not in table.column_names:
                raise pa.ArrowInvalid("no id/status columns")
            return table
        except (pa.ArrowException, OSError) as e:
            name = path.rsplit("/", 1)[-1]
            target = self.path(DAMAGED_DIR, f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}-{name}")
            self.fs.create_dir(self.path(DAMAGED_DIR), recursive=True)
            self.fs.move(path, target)
            log.warning("%s is damaged (%s): set aside as %s; its rows will be redone", path, e, target)
            return None

    def read_results(self) -> tuple[pa.Table, list[str]]:
        """All results so far (consolidated, then parts of interrupted runs) and the parts read.

        A file that cannot be read is moved to _damaged/ with a warning, never fatal.
        """
        tables = []
        if self.fs.get_file_info(self.path(RESULTS_FILE)).type == pafs.FileType.File:
            tables.append(self._read_or_set_aside(self.path(RESULTS_FILE)))
        parts = self._parts()
        tables += [self._read_or_set_aside(p) for p in parts]
        return concat(tables), parts

    def write_part(self, table: pa.Table) -> None:
        self.fs.create_dir(self.path(PARTS_DIR), recursive=True)
        write_atomic(self.fs, self.path(PARTS_DIR, f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"),
                     table_bytes(table))

    def consolidate(self, manifest: pa.Table) -> pa.Table:
        """results.parquet := every row ever written here, latest per id; then the parts are removed.

        The manifest's rows get its own columns back (`manifest`: id plus the columns to keep);
        a manifest id with no result at all gets an error row rather than vanishing.
        """
        ids = manifest.column("id").combine_chunks()
        results, parts = self.read_results()
        results = latest_per_id(results)
        unseen = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=results.column("id"))))
        if len(unseen):
            missing = pa.table({"id": unseen, "status": pa.array(["error"] * len(unseen)),
                                "error": pa.array(["no result was produced for this row"] * len(unseen))})
            results = latest_per_id(concat([results, missing]))
        results = self._with_manifest_columns(results, manifest)
        write_atomic(self.fs, self.path(RESULTS_FILE), table_bytes(results))
        for part in parts:
            self.fs.delete_file(part)
        return results

    @staticmethod
    def _with_manifest_columns(results: pa.Table, manifest: pa.Table) -> pa.Table:
        """The manifest's own columns for its rows; other rows keep what earlier runs stored."""
        at = pc.index_in(results.column("id"), value_set=manifest.column("id"))
        mine = pc.is_valid(at)
        for name in manifest.column_names:
            if name == "id":
                continue
            ours = manifest.column(name).take(at)
            if name in results.column_names:
                old = results.column(name)
                try:
                    merged = pc.if_else(mine, ours, old.cast(ours.type))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    # an earlier manifest had another type under this name: keep both, as text
                    merged = pc.if_else(mine, ours.cast(pa.string()), old.cast(pa.string()))
                results = results.set_column(results.schema.get_field_index(name), name, merged)
            else:
                results = results.append_column(name, ours)
        return results

    # --- one job at a time ----------------------------------------------------------------------

    @contextmanager
    def lock(self, run_id: str) -> Iterator[None]:
        lock = _Lock(self, run_id)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()


class _Lock:
    """OUTPUT/_voxray.lock: created only if absent (O_EXCL locally, If-None-Match on S3), heartbeat
    while held, taken over only from a dead holder (conditional on its exact content)."""

    def __init__(self, store: OutputStore, run_id: str) -> None:
        self.store, self.path = store, store.path(LOCK_FILE)
        self.me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.s3 = store.storage.boto3_client() if is_s3(store.uri) else None
        if self.s3:
            self.bucket, _, self.key = self.path.partition("/")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: str | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def _create(self) -> bool:
        if self.s3:
            from botocore.exceptions import ClientError
            try:
                self._token = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                 IfNoneMatch="*")["ETag"]
                return True
            except ClientError as e:
                if e.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                    return False
                raise
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._body())
        try:
            os.link(tmp, self.path)  # appears whole, and only if absent
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _read(self) -> tuple[dict, str] | None:
        """The holder's record and a token identifying this exact version of the lock."""
        try:
            if self.s3:
                got = self.s3.get_object(Bucket=self.bucket, Key=self.key)
                body, token = got["Body"].read(), got["ETag"]
            else:
                with open(self.path, "rb") as f:
                    body = f.read()
                token = hashlib.sha256(body).hexdigest()
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - S3 NoSuchKey and friends
            if self.s3 and getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        try:
            record = json.loads(body)
        except ValueError:
            record = None
        if not isinstance(record, dict):  # unreadable: judged by its age alone
            record = {"heartbeat": self._modified()}
        return record, token

    def _modified(self) -> float:
        if self.s3:
            return self.s3.head_object(Bucket=self.bucket, Key=self.key)["LastModified"].timestamp()
        return os.stat(self.path).st_mtime

    def _take_over(self, token: str) -> bool:
        """Remove the dead holder's lock only if it is still exactly that version, then create ours."""
        if self.s3:
            from botocore.exceptions import ClientError
            try:
                self._token = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                 IfMatch=token)["ETag"]
                return True
            except ClientError:
                return False
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)  # only one taker can move this file
        except FileNotFoundError:
            return self._create()
        with open(aside, "rb") as f:
            moved = hashlib.sha256(f.read()).hexdigest()
        if moved != token:  # another taker's fresh lock: put it back, ours is refused
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)
        return moved == token and self._create()

    @staticmethod
    def _dead(record: dict) -> bool:
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
            try:
                os.kill(record["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return time.time() - float(record.get("heartbeat", 0)) > LOCK_STALE_S

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                break
            current = self._read()
            if current is None:
                continue
            record, token = current
            if not self._dead(record):
                age = time.time() - float(record.get("heartbeat", 0))
                raise OutputError(
                    f"output {self.store.uri} is in use by run {record.get('run_id')} (host {record.get('host')}, "
                    f"pid {record.get('pid')}, last heartbeat {age:.0f} s ago): two jobs cannot write to one "
                    f"output at once. If that run is gone, its lock expires {LOCK_STALE_S:.0f} s after its last "
                    f"heartbeat, or delete {join(self.store.uri, LOCK_FILE)}")
            log.warning("taking over the lock of run %s, which is no longer running", record.get("run_id"))
            if self._take_over(token):
                break
        else:
            raise OutputError(f"output {self.store.uri}: could not take its lock (another job is starting?)")
        self._thread = threading.Thread(target=self._beat, name="voxray-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                if self.s3:
                    self._token = self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                     IfMatch=self._token)["ETag"]
                else:
                    write_atomic(self.store.fs, self.path, self._body())
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the lock is stale only after many
                log.warning("lock heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        current = self._read()
        if current and current[0].get("run_id") == self.me["run_id"]:
            if self.s3:
                self.s3.delete_object(Bucket=self.bucket, Key=self.key)
            else:
                os.unlink(self.path)
