"""The end of every pipeline: one audio file per ok row and one results part per write task."""
from __future__ import annotations

import time
from typing import Iterable

import numpy as np
import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from actors.audio import encode_audio
from actors.rows import ERROR, OK
from actors.storage import StorageOptions, join, write_atomic
from jobs.store import AUDIO_DIR, RESULT_SCHEMA, OutputStore, audio_name


class AudioDatasink(Datasink):
    """Encodes and writes each ok row's audio, then a results part with the row's status and timings.

    Parts are merged into results.parquet by the driver (`OutputStore.consolidate`),
    which also makes a retried write task harmless.  `keep` names the stage
    outputs that go into the results (e.g. generated speech tokens).
    """

    def __init__(self, output: str, storage: StorageOptions, fmt: str, keep: Iterable[str] = ()) -> None:
        self.output, self.storage, self.fmt, self.keep = output, storage, fmt, tuple(keep)

    def write(self, blocks: Iterable[Block], ctx) -> int:
        store = OutputStore(self.output, self.storage)
        store.fs.create_dir(store.path(AUDIO_DIR), recursive=True)
        rows = [self._finish(store, row) for block in blocks
                for row in BlockAccessor.for_block(block).iter_rows(public_row_format=False)]
        if rows:
            table = pa.Table.from_pylist(rows)
            store.write_part(table.cast(pa.schema([
                RESULT_SCHEMA.field(f.name) if f.name in RESULT_SCHEMA.names else f for f in table.schema])))
        return len(rows)

    def _finish(self, store: OutputStore, row) -> dict:
        start = time.perf_counter()
        out = {k: row[k] for k in ("id", "status", "error")}
        out.update({k: row[k] for k in row if k.startswith("time_")})
        out.update({k: _plain(row[k]) for k in self.keep})
        out.update(audio_uri=None, duration_s=None, sample_rate=None)
        if out["status"] == OK:
            audio, rate = np.asarray(row["audio"], dtype=np.float32), int(row["sample_rate"])
            name = audio_name(out["id"], self.fmt)
            try:
                write_atomic(store.fs, store.path(name), encode_audio(audio, rate, self.fmt))
                out.update(audio_uri=join(self.output, name), duration_s=len(audio) / rate, sample_rate=rate)
            except (OSError, pa.ArrowException) as e:
                out.update(status=ERROR, error=f"writing audio failed: {e}")
        out["time_write_s"] = time.perf_counter() - start
        return out


def _plain(v):
    return v.tolist() if isinstance(v, np.ndarray) else v
