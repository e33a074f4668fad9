"""Ray Data glue: a stage as a map_batches actor, and the datasink that writes its audio."""
from __future__ import annotations

import time
import uuid
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from actors.audio import encode_audio
from actors.rows import column
from actors.storage import StorageOptions, join
from jobs.job_config import StageConfig
from jobs.manifest import PARTS_DIR, RESULT_SCHEMA, audio_name

RESULT_COLUMNS = RESULT_SCHEMA.names


class SynthesizeUDF:
    """Runs a stage in a Ray actor and encodes its audio (map_batches constructor kwargs only)."""

    def __init__(self, stage: StageConfig, bundle: str, storage: StorageOptions, fmt: str) -> None:
        self.stage = stage.stage_class()(bundle, device=stage.device, threads=stage.threads,
                                         storage=storage, **stage.options)
        self.fmt = fmt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.stage(batch)
        encoded = np.empty(len(out["audio"]), dtype=object)
        for i, (samples, status) in enumerate(zip(out.pop("audio"), out["status"])):
            encoded[i] = encode_audio(samples, int(out["sample_rate"][i]), self.fmt) if status == "ok" else b""
        out["audio_bytes"] = encoded
        return {k: v for k, v in out.items() if k in RESULT_COLUMNS or k.startswith("time_") or k == "audio_bytes"}


def mark_unknown_speakers(batch: dict[str, np.ndarray], known: frozenset[str]) -> dict[str, np.ndarray]:
    """Rows whose speaker_id is not in the speaker manifest fail before any stage runs."""
    speakers = batch.get("speaker_id")
    status = np.array(batch["status"] if "status" in batch else ["ok"] * len(batch["id"]), dtype=object)
    error = np.array(batch["error"] if "error" in batch else [""] * len(batch["id"]), dtype=object)
    if speakers is not None:
        for i in range(len(speakers)):
            speaker = column(batch, "speaker_id", i)
            if speaker not in (None, "") and speaker not in known:
                status[i], error[i] = "error", f"unknown speaker {speaker!r} (not in the speaker manifest)"
    return {**batch, "status": status, "error": error}


class AudioDatasink(Datasink):
    """One audio file per ok row under OUTPUT/audio/, and one results part per write task.

    Parts are merged into OUTPUT/results.parquet by the driver when the job ends
    (jobs.manifest.consolidate), which also makes a retried write harmless.
    """

    def __init__(self, output: str, storage: StorageOptions, fmt: str) -> None:
        self.output, self.storage, self.fmt = output, storage, fmt

    def write(self, blocks: Iterable[Block], ctx) -> int:
        fs, root = self.storage.resolve(self.output)
        fs.create_dir(join(root, "audio"), recursive=True)
        rows: list[dict] = []
        for block in blocks:
            for row in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                rows.append(self._write_row(fs, root, dict(row)))
        if not rows:
            return 0
        fs.create_dir(join(root, PARTS_DIR), recursive=True)
        part = join(root, PARTS_DIR, f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), part, filesystem=fs)
        return len(rows)

    def _write_row(self, fs, root: str, row: dict) -> dict:
        start = time.perf_counter()
        audio = row.pop("audio_bytes")
        row["audio_uri"] = None
        if row["status"] == "ok":
            name = audio_name(row["id"], self.fmt)
            try:
                with fs.open_output_stream(join(root, name)) as f:
                    f.write(audio)
                row["audio_uri"] = join(self.output, name)
            except OSError as e:
                row["status"], row["error"] = "error", f"writing audio failed: {e}"
        row["time_write_s"] = time.perf_counter() - start
        return row
