"""Throughput benchmark (a script, not a timed test): the Ray job against the tools a user would pick instead.

    python jobs/benchmark.py --config vits --rows 400 --json bench/vits.json

Runs the same rows three ways, in one run, and prints audio-seconds per wall-second:

- the family's reference (vits: `piper-tts`, one process, ONNX Runtime on every core; chatterbox: the
  official generation loop in eager PyTorch at batch 1, `export.chatterbox.eager`, in a subprocess);
- the in-process runner over the same pipeline in one process, each stage's threads = the cores;
- the Ray bulk job (`run_job`), start-up included: Ray, the stage probe, actor start.

Then the ratios (Ray job / reference, Ray job / in-process), per-stage seconds, achieved batch sizes
(in-process) and peak RSS (per stage actor for the Ray job).
Numbers from a shared machine are comparable only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
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


def make_rows(n: int, family: str, max_new_tokens: int) -> pa.Table:
    """The example texts, cycled; Chatterbox rows decode greedily so every run makes the same tokens."""
    texts = pq.read_table(EXAMPLE_MANIFEST).column("text").to_pylist()
    cols = {"id": [f"bench-{i:05d}" for i in range(n)], "text": [texts[i % len(texts)] for i in range(n)]}
    if family == "chatterbox":
        cols |= {"temperature": [0.0] * n, "max_new_tokens": [max_new_tokens] * n, "seed": list(range(n))}
    return pa.table(cols)


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rate(audio_s: float, wall_s: float, **extra) -> dict:
    return {"wall_s": round(wall_s, 2), "audio_s": round(audio_s, 2), "audio_s_per_s": round(audio_s / wall_s, 3),
            **extra}


def piper_tts(bundle: Bundle, table: pa.Table, fmt: str) -> dict:
    """piper-tts as its users run it: one PiperVoice, ONNX Runtime's default threads (every core)."""
    from piper import PiperVoice

    start = time.perf_counter()
    voice = PiperVoice.load(bundle.graph("vits"), bundle.asset("voice_config"))
    audio_s = 0.0
    for text in table.column("text").to_pylist():
        samples = np.concatenate([c.audio_float_array for c in voice.synthesize(text)])
        encode_audio(samples, voice.config.sample_rate, fmt)
        audio_s += len(samples) / voice.config.sample_rate
    return rate(audio_s, time.perf_counter() - start, tool="piper-tts")


def eager_chatterbox(bundle: Bundle, table: pa.Table, fmt: str) -> dict:
    """The official generation loop in eager PyTorch, one utterance at a time (`export.chatterbox.eager`),
    in a subprocess: jobs never import torch."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest, report = Path(tmp) / "rows.parquet", Path(tmp) / "eager.json"
        pq.write_table(table, manifest)
        subprocess.run([sys.executable, "-m", "export.chatterbox.eager", "--bundle", str(bundle.path),
                        "--manifest", str(manifest), "--format", fmt, "--json", str(report)],
                       check=True, cwd=Path(__file__).resolve().parents[1])
        result = json.loads(report.read_text())
    return rate(result["audio_s"], result["wall_s"], tool="eager PyTorch, batch 1 (official loop)",
                stage_s=result["stage_s"], peak_rss_mb=result["peak_rss_mb"])


BASELINES: dict[str, Callable[[Bundle, pa.Table, str], dict]] = {"vits": piper_tts, "chatterbox": eager_chatterbox}
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
    return rate(audio_s, time.perf_counter() - start, stage_s=stage_s, failed=int((out["status"] != "ok").sum()),
                batches={s.name: s.batch_stats() for s in stages}, peak_rss_mb=round(peak_rss_mb(), 1))


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM), Linux only; 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0


class ActorMemory(threading.Thread):
    """Polls the peak RSS of every stage actor on this node while a Ray job runs (stage from its class name)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from ray.util.state import list_actors

        while not self.stop.wait(1.0):
            try:
                actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            except Exception:  # noqa: BLE001 - the state API is not up yet or is shutting down
                continue
            for actor in actors:
                name = actor.class_name or ""
                if "Stage_" in name and actor.pid:
                    stage = name.split("Stage_", 1)[1].rstrip(")")
                    self.peak[stage] = max(self.peak.get(stage, 0.0), round(peak_rss_mb(actor.pid), 1))


def ray_job(config: str, bundle: str, table: pa.Table) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "bench.parquet"
        pq.write_table(table, manifest)
        start = time.perf_counter()
        ray.init(logging_level="WARNING")
        memory = ActorMemory()
        memory.start()
        summary = run_job(JobArgs(manifest=str(manifest), output=str(Path(tmp) / "out"), config=config,
                                  bundle=bundle))
        wall = time.perf_counter() - start
        memory.stop.set()
        results = pq.read_table(Path(tmp) / "out" / "results.parquet")
        ray.shutdown()
    stage_s = {c[5:-2]: round(float(np.nansum(results.column(c).to_numpy(zero_copy_only=False))), 2)
               for c in results.column_names if c.startswith("time_")}
    return rate(summary.audio_seconds, wall, stage_s=stage_s, failed=summary.failed, peak_rss_mb=memory.peak)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="vits", help="pipeline (a path or a name under configs/)")
    p.add_argument("--bundle", help="bundle (default: the pipeline's)")
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="Chatterbox: speech tokens per row at most (greedy decoding; 25 per audio second)")
    p.add_argument("--json", help="where to write the results (default: bench/<config>.json)")
    args = p.parse_args(argv)
    pipeline = load_pipeline(args.config).with_overrides(args.bundle)
    bundle = load_bundle(pipeline.bundle)
    table = make_rows(args.rows, pipeline.family, args.max_new_tokens)
    cores = os.cpu_count() or 1
    report: dict = {"config": str(find_config(args.config)), "bundle": bundle.manifest.get("name"),
                    "rows": args.rows, "machine": {"cpus": cores, "cpu": cpu_model(),
                                                   "python": platform.python_version(), "ray": ray.__version__},
                    "pools": {s.name: s.pool.model_dump() | {"threads": s.backend.threads} for s in pipeline.stages}}
    if pipeline.family in BASELINES:
        report["reference"] = BASELINES[pipeline.family](bundle, table, pipeline.format)
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
