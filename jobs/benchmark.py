"""Throughput benchmark (a script, not a timed test): the Ray job against the tools a user would pick instead.

    python jobs/benchmark.py --config vits --rows 400 --json bench/vits.json

Runs the same rows three ways, in one run, and prints audio-seconds per wall-second:

- the family's reference tool (vits: `piper-tts`, one process, ONNX Runtime on every core);
- the in-process runner over the same pipeline in one process, each stage's threads = the cores;
- the Ray bulk job (`run_job`), start-up included: Ray, the stage probe, actor start.

Then the ratios (Ray job / reference, Ray job / in-process) and per-stage seconds.
Numbers from a shared machine are comparable only within one run.
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
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.audio import encode_audio
from actors.bundle import Bundle, load_bundle
from actors.runner import run_local
from jobs.bulk_synth import EXAMPLE_MANIFEST, JobArgs, run_job
from jobs.config import PipelineSpec, find_config, load_pipeline
from jobs.pipeline import build_stages


def make_rows(n: int) -> pa.Table:
    texts = pq.read_table(EXAMPLE_MANIFEST).column("text").to_pylist()
    return pa.table({"id": [f"bench-{i:05d}" for i in range(n)], "text": [texts[i % len(texts)] for i in range(n)]})


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rate(audio_s: float, wall_s: float, **extra) -> dict:
    return {"wall_s": round(wall_s, 2), "audio_s": round(audio_s, 2), "audio_s_per_s": round(audio_s / wall_s, 3),
            **extra}


def piper_tts(bundle: Bundle, texts: list[str], fmt: str) -> dict:
    """piper-tts as its users run it: one PiperVoice, ONNX Runtime's default threads (every core)."""
    from piper import PiperVoice

    start = time.perf_counter()
    voice = PiperVoice.load(bundle.graph("vits"), bundle.asset("voice_config"))
    audio_s = 0.0
    for text in texts:
        samples = np.concatenate([c.audio_float_array for c in voice.synthesize(text)])
        encode_audio(samples, voice.config.sample_rate, fmt)
        audio_s += len(samples) / voice.config.sample_rate
    return rate(audio_s, time.perf_counter() - start, tool="piper-tts")


BASELINES: dict[str, Callable[[Bundle, list[str], str], dict]] = {"vits": piper_tts}
"""The reference each family is measured against, by bundle family."""


def in_process(pipeline: PipelineSpec, table: pa.Table, cores: int) -> dict:
    """Every stage in this process with all the cores, batches of the first pool's size, encoding included."""
    stages = build_stages(pipeline, threads=cores)
    columns = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    run_local(stages, {k: v[:1] for k, v in columns.items()}, 1)  # warm-up: lazy loads, first-call costs
    start = time.perf_counter()
    out = run_local(stages, columns, pipeline.stages[0].pool.batch_size)
    audio_s = 0.0
    for audio, sr, status in zip(out["audio"], out["sample_rate"], out["status"]):
        if status == "ok":
            encode_audio(audio, int(sr), pipeline.format)
            audio_s += len(audio) / int(sr)
    stage_s = {k[5:-2]: round(float(np.sum(v)), 2) for k, v in out.items() if k.startswith("time_")}
    return rate(audio_s, time.perf_counter() - start, stage_s=stage_s, failed=int((out["status"] != "ok").sum()))


def ray_job(config: str, bundle: str, table: pa.Table) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "bench.parquet"
        pq.write_table(table, manifest)
        start = time.perf_counter()
        ray.init(logging_level="WARNING")
        summary = run_job(JobArgs(manifest=str(manifest), output=str(Path(tmp) / "out"), config=config,
                                  bundle=bundle))
        wall = time.perf_counter() - start
        results = pq.read_table(Path(tmp) / "out" / "results.parquet")
        ray.shutdown()
    stage_s = {c[5:-2]: round(float(np.nansum(results.column(c).to_numpy(zero_copy_only=False))), 2)
               for c in results.column_names if c.startswith("time_")}
    return rate(summary.audio_seconds, wall, stage_s=stage_s, failed=summary.failed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="vits", help="pipeline (a path or a name under configs/)")
    p.add_argument("--bundle", help="bundle (default: the pipeline's)")
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--json", help="where to write the results (default: bench/<config>.json)")
    args = p.parse_args(argv)
    pipeline = load_pipeline(args.config).with_overrides(args.bundle)
    bundle = load_bundle(pipeline.bundle)
    table = make_rows(args.rows)
    cores = os.cpu_count() or 1
    report: dict = {"config": str(find_config(args.config)), "bundle": bundle.manifest.get("name"),
                    "rows": args.rows, "machine": {"cpus": cores, "cpu": cpu_model(),
                                                   "python": platform.python_version(), "ray": ray.__version__},
                    "pools": {s.name: s.pool.model_dump() | {"threads": s.backend.threads} for s in pipeline.stages}}
    texts = table.column("text").to_pylist()
    if pipeline.family in BASELINES:
        report["reference"] = BASELINES[pipeline.family](bundle, texts, pipeline.format)
    report["in_process"] = in_process(pipeline, table, cores)
    report["ray_job"] = ray_job(args.config, pipeline.bundle, table)
    ray_rate = report["ray_job"]["audio_s_per_s"]
    report["ratios"] = {"ray_job_vs_in_process": round(ray_rate / report["in_process"]["audio_s_per_s"], 3)}
    if "reference" in report:
        report["ratios"]["ray_job_vs_reference"] = round(ray_rate / report["reference"]["audio_s_per_s"], 3)
    out = Path(args.json or f"bench/{find_config(args.config).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
