"""Throughput benchmark (a script, not a timed test): the Ray job vs the in-process runner, same rows.

    python jobs/benchmark.py --rows 64 --json bench/vits.json

Prints, from one run: audio-seconds per wall-second for the in-process runner at
batch 1 and at the configured batch size, and for the Ray job; the ratios; and a
per-stage breakdown. Ray start-up is excluded; actor start-up is included.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.audio import encode_audio
from actors.bundle import load_bundle
from actors.runner import run_local
from jobs.bulk_synth import EXAMPLE_MANIFEST, JobArgs, run_job
from jobs.job_config import load_job_config


def make_rows(n: int) -> pa.Table:
    texts = pq.read_table(EXAMPLE_MANIFEST).column("text").to_pylist()
    return pa.table({"id": [f"bench-{i:05d}" for i in range(n)], "text": [texts[i % len(texts)] for i in range(n)]})


def in_process(stage, table: pa.Table, batch_size: int, fmt: str) -> dict:
    columns = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    start = time.perf_counter()
    out = run_local([stage], columns, batch_size)
    encode_start = time.perf_counter()
    for audio, sr in zip(out["audio"], out["sample_rate"]):
        encode_audio(audio, int(sr), fmt)
    wall = time.perf_counter() - start
    audio_s = float(out["duration_s"].sum())
    return {"wall_s": round(wall, 3), "audio_s": round(audio_s, 3), "audio_s_per_s": round(audio_s / wall, 3),
            "stage_s": {"text": round(float(out["time_text_s"].sum()), 3),
                        "vits": round(float(out["time_vits_s"].sum()), 3),
                        "encode": round(time.perf_counter() - encode_start, 3)},
            "failed": int((out["status"] != "ok").sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--config", help="job preset (default configs/vits.yaml)")
    p.add_argument("--json", default="bench/vits.json", help="where to write the results")
    args = p.parse_args(argv)
    config = load_job_config(args.config)
    table = make_rows(args.rows)
    bundle = load_bundle(config.bundle)
    stage = config.stage.stage_class()(bundle, device=config.stage.device, threads=config.stage.threads,
                                       **config.stage.options)
    run_local([stage], {"id": np.array(["warm"], dtype=object), "text": np.array(["Warm up."], dtype=object)}, 1)
    single = in_process(stage, table, 1, config.format)
    batched = in_process(stage, table, config.pool.batch_size, config.format)

    ray.init(logging_level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "bench.parquet"
        pq.write_table(table, manifest)
        start = time.perf_counter()
        summary = run_job(JobArgs(manifest=str(manifest), output=str(Path(tmp) / "out"), config=args.config))
        wall = time.perf_counter() - start
        results = pq.read_table(Path(tmp) / "out" / "results.parquet")
    ray_stats = {"wall_s": round(wall, 3), "audio_s": summary.audio_seconds,
                 "audio_s_per_s": round(summary.audio_seconds / wall, 3),
                 "stage_s": {c.removeprefix("time_").removesuffix("_s"): round(float(np.nansum(results.column(c).to_numpy(zero_copy_only=False))), 3)
                             for c in results.column_names if c.startswith("time_")},
                 "failed": summary.failed}
    report = {
        "rows": args.rows, "bundle": bundle.manifest.get("name"), "config": args.config or "configs/vits.yaml",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "pool": vars(config.pool), "threads_per_actor": config.stage.threads,
        "in_process_batch1": single, "in_process_batched": batched, "ray_job": ray_stats,
        "ratios": {"batched_vs_batch1": round(batched["audio_s_per_s"] / single["audio_s_per_s"], 3),
                   "ray_vs_in_process_batched": round(ray_stats["audio_s_per_s"] / batched["audio_s_per_s"], 3),
                   "ray_vs_in_process_batch1": round(ray_stats["audio_s_per_s"] / single["audio_s_per_s"], 3)},
    }
    ray.shutdown()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
