"""Throughput benchmark (a script, not a timed test): the Ray job against the tools a user would pick instead.

    python jobs/benchmark.py --config vits --rows 400 --json bench/vits.json
    python jobs/benchmark.py --config chatterbox-cpu --bundle B --rows 12 \
        --variant bf16:cfm.backend.engine=openvino,cfm.backend.precision=bf16 --reference-json bench/chatterbox-cpu.json

Runs the same rows three ways, in one run, and prints audio-seconds per wall-second:

- the family's reference (vits: `piper-tts`, one process, ONNX Runtime on every core; chatterbox: the
  official generation loop in eager PyTorch at batch 1, `export.chatterbox.eager`, in a subprocess),
  or the `reference` section of an earlier report (`--reference-json`: it takes minutes for Chatterbox);
- the in-process runner over the same pipeline in one process, each stage's threads = the cores, once per
  variant: the config as given (`config`) and each `--variant NAME:STAGE.PATH=VALUE[,...]`, which sets
  keys of a stage's block (`options.X`, `backend.X`, `pool.X`; a variant's `backend.threads` wins over
  the cores; of the pools only the first one's `batch_size` matters in-process);
- the Ray bulk job (`run_job`) on the config as given, start-up included: Ray, the stage probe, actor
  start (`--skip-ray` leaves it out).

Then the ratios, per-stage seconds, per-stage utilization (in-process: the fraction of the run each stage
was working; Ray job: each stage's CPU time against the CPUs its pool reserves and against the node),
achieved batch sizes (in-process) and peak RSS (per stage for the Ray job), as JSON and as a markdown
table (also under "table"). Numbers from a shared machine are comparable only within one run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from pydantic import ValidationError

from actors.audio import encode_audio
from actors.bundle import Bundle, load_bundle
from actors.errors import ConfigError, VoxrayError, describe_validation_error
from actors.runner import run_local
from jobs.bulk_synth import EXAMPLE_MANIFEST, JobArgs, run_job
from jobs.config import PipelineSpec, PoolSpec, find_config, load_pipeline
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


@dataclass(frozen=True)
class Variant:
    """A named change to the pipeline for the in-process runner: "STAGE.PATH" → value."""

    name: str
    sets: dict[str, Any] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """`NAME:STAGE.PATH=VALUE[,STAGE.PATH=VALUE...]`, each VALUE read as YAML (numbers and booleans work)."""
    name, sep, body = text.partition(":")
    if not (sep and name and body):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:STAGE.PATH=VALUE[,STAGE.PATH=VALUE...]")
    sets: dict[str, Any] = {}
    for item in body.split(","):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or len(key.split(".")) < 3 or "" in key.split("."):
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not STAGE.PATH=VALUE "
                                             "(e.g. t3.options.max_rows=16)")
        try:
            sets[key] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r}: the value is not valid YAML ({e})") from None
    return Variant(name, sets)


def apply_sets(pipeline: PipelineSpec, sets: Mapping[str, Any], where: str) -> PipelineSpec:
    """`pipeline` with each "STAGE.PATH" set to its value, validated as a pipeline file is (`load_pipeline`)."""
    data = pipeline.model_dump(by_alias=True)
    stages = {s["name"]: s for s in data["stages"]}
    for key, value in sets.items():
        stage, *path = key.split(".")
        if stage not in stages:
            raise ConfigError(f"{where}: {key}: no stage {stage!r} in {pipeline.source} (stages: {list(stages)})")
        block = stages[stage]
        for part in path[:-1]:
            block = block.setdefault(part, {})
            if not isinstance(block, dict):
                raise ConfigError(f"{where}: {key}: {part} is not a mapping")
        block[path[-1]] = value
    try:
        spec = PipelineSpec.model_validate({**data, "source": pipeline.source})
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, where)) from None
    for i, stage_spec in enumerate(spec.stages):  # options are only checked against the stage class's Options
        stage_spec.parsed_options(where, f"stages.{i}.options")
    return spec


def in_process_spec(pipeline: PipelineSpec, variant: Variant, cores: int) -> PipelineSpec:
    """The pipeline the in-process runner times for `variant`: every stage on every core unless it says otherwise."""
    threads = {f"{s.name}.backend.threads": cores for s in pipeline.stages}
    return apply_sets(pipeline, threads | variant.sets, f"--variant {variant.name}")


def in_process(pipeline: PipelineSpec, table: pa.Table) -> dict:
    """Every stage in this process, batches of the first pool's size, encoding included."""
    gc.collect()  # the previous variant's stages, so its memory is neither counted nor in the way
    reset_peak_rss()
    stages = build_stages(pipeline)
    columns = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    run_local(stages, {k: v[:1] for k, v in columns.items()}, 1)  # warm-up: lazy loads, first-call costs
    start = time.perf_counter()
    out = run_local(stages, columns, pipeline.stages[0].pool.batch_size)
    audio_s = 0.0
    for audio, sr, status in zip(out["audio"], out["sample_rate"], out["status"]):
        if status == "ok":
            encode_audio(audio, int(sr), pipeline.format)
            audio_s += len(audio) / int(sr)
    wall = time.perf_counter() - start
    stage_s = {k[5:-2]: float(np.sum(v)) for k, v in out.items() if k.startswith("time_")}
    return rate(audio_s, wall, stage_s={k: round(v, 2) for k, v in stage_s.items()},
                busy={k: round(v / wall, 3) for k, v in stage_s.items()},
                failed=int((out["status"] != "ok").sum()), batches={s.name: s.batch_stats() for s in stages},
                peak_rss_mb=round(peak_rss_mb(), 1))


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM), Linux only; 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0


def reset_peak_rss() -> None:
    """Start this process's VmHWM again from its current RSS (Linux 4.0+), so each in-process variant
    reports its own peak rather than the largest so far; where that is refused the peak stays cumulative."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cpu_seconds(pid: int) -> float | None:
    """A process's CPU time so far (user + system), Linux only; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ActorUsage(threading.Thread):
    """Polls every stage actor on this node while a Ray job runs (stage from its class name): peak RSS and
    cumulative CPU time, the last value seen per process (what an actor uses after its last poll is missed)."""

    INTERVAL_S = 0.5

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak: dict[str, float] = {}
        self.cpu: dict[str, dict[int, float]] = {}
        """Stage → actor pid → CPU seconds."""
        self.stop = threading.Event()

    def run(self) -> None:
        node = ray.get_runtime_context().get_node_id()
        while True:
            stopping = self.stop.wait(self.INTERVAL_S)
            self._poll(node)  # once more after the stop: actors may outlive the job's last poll
            if stopping:
                return

    def _poll(self, node: str) -> None:
        from ray.util.state import list_actors

        try:
            actors = list_actors(filters=[("state", "=", "ALIVE")])
        except Exception:  # noqa: BLE001 - the state API is not up yet or is shutting down
            return
        for actor in actors:
            name = actor.class_name or ""
            if "Stage_" in name and actor.pid and actor.node_id == node:  # other nodes' pids are not ours
                stage = name.split("Stage_", 1)[1].rstrip(")")
                self.peak[stage] = max(self.peak.get(stage, 0.0), round(peak_rss_mb(actor.pid), 1))
                cpu = cpu_seconds(actor.pid)
                if cpu is not None:
                    self.cpu.setdefault(stage, {})[actor.pid] = cpu

    def usage(self, wall_s: float, pools: Mapping[str, PoolSpec]) -> dict[str, dict]:
        """Per stage, in pipeline order: CPU-seconds, the CPUs its pool reserves (num_cpus × actors seen),
        its utilization of that share and its fraction of the whole node, both over `wall_s`."""
        cores = os.cpu_count() or 1
        out = {}
        for stage, pool in pools.items():
            pids = self.cpu.get(stage)
            if not pids:
                continue
            cpu_s, share = sum(pids.values()), pool.num_cpus * len(pids)
            out[stage] = {"cpu_s": round(cpu_s, 2), "actors": len(pids), "share": round(share, 3),
                          "utilization": round(cpu_s / (wall_s * share), 3) if share else None,
                          "node_fraction": round(cpu_s / (wall_s * cores), 3)}
        return out


def ray_job(config: str, pipeline: PipelineSpec, table: pa.Table) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "bench.parquet"
        pq.write_table(table, manifest)
        start = time.perf_counter()
        ray.init(logging_level="WARNING")
        usage = ActorUsage()
        usage.start()
        summary = run_job(JobArgs(manifest=str(manifest), output=str(Path(tmp) / "out"), config=config,
                                  bundle=pipeline.bundle))
        wall = time.perf_counter() - start
        usage.stop.set()
        usage.join()
        results = pq.read_table(Path(tmp) / "out" / "results.parquet")
        ray.shutdown()
    stage_s = {c[5:-2]: round(float(np.nansum(results.column(c).to_numpy(zero_copy_only=False))), 2)
               for c in results.column_names if c.startswith("time_")}
    pools = {s.name: s.pool for s in pipeline.stages}
    return rate(summary.audio_seconds, wall, stage_s=stage_s, failed=summary.failed,
                peak_rss_mb={s: usage.peak[s] for s in pools if s in usage.peak}, usage=usage.usage(wall, pools))


def reused_reference(path: str, report: Mapping[str, Any]) -> dict:
    """The `reference` section of an earlier report, if it timed the same rows of the same bundle."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--reference-json {path}: cannot read it ({e})") from None
    if not isinstance(earlier.get("reference"), dict):
        raise ConfigError(f"--reference-json {path}: it has no reference section")
    for key in ("bundle", "rows", "max_new_tokens"):
        if key in earlier and earlier[key] != report.get(key):
            raise ConfigError(f"--reference-json {path}: it timed {key}={earlier[key]!r}, "
                              f"this run has {report.get(key)!r}")
    return earlier["reference"] | {"reused_from": path}


def ratios(report: Mapping[str, Any]) -> dict:
    """Audio-seconds per wall-second of one way over another's."""
    def over(a: dict, b: dict) -> float:
        return round(a["audio_s_per_s"] / b["audio_s_per_s"], 3)

    ref, ray_run, variants = report.get("reference"), report.get("ray_job"), report["in_process"]
    out: dict[str, Any] = {}
    if ray_run:
        out["ray_job_vs_in_process"] = over(ray_run, variants["config"])
        if ref:
            out["ray_job_vs_reference"] = over(ray_run, ref)
    if ref:
        out["in_process_vs_reference"] = {name: over(v, ref) for name, v in variants.items()}
    if len(variants) > 1:
        out["in_process_vs_config"] = {name: over(v, variants["config"]) for name, v in variants.items()
                                       if name != "config"}
    return out


def per_stage(values: Mapping[str, Any], fmt: str) -> str:
    return ", ".join(f"{stage} {fmt.format(v)}" for stage, v in values.items()) or "–"


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per way: rates, ratios, per-stage seconds, utilization and peak RSS."""
    ref, config = report.get("reference"), report["in_process"]["config"]
    rows: list[tuple[str, dict, str, str]] = []  # way, its entry, utilization, peak RSS
    if ref:
        reused = f"; reused from {ref['reused_from']}" if "reused_from" in ref else ""
        rows.append((f"reference: {ref['tool']}{reused}", ref, "–",
                     f"{ref['peak_rss_mb']:.0f}" if "peak_rss_mb" in ref else "–"))
    for name, v in report["in_process"].items():
        rows.append((f"in-process `{name}`", v, "busy: " + per_stage(v["busy"], "{:.2f}"),
                     f"{v['peak_rss_mb']:.0f}"))
    if "ray_job" in report:
        v = report["ray_job"]
        usage = {s: ("–" if u["utilization"] is None else f"{u['utilization']:.2f}")  # a pool with no CPUs
                 + f" (node {u['node_fraction']:.2f})" for s, u in v["usage"].items()}
        rows.append(("Ray job", v, per_stage(usage, "{}"), per_stage(v["peak_rss_mb"], "{:.0f}")))
    lines = ["| way | audio-s per wall-s | vs reference | vs in-process `config` | stage seconds "
             + "| utilization | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for way, v, usage, rss in rows:
        speed = v["audio_s_per_s"]
        vs_ref = f"{speed / ref['audio_s_per_s']:.2f}" if ref else "–"
        lines.append(f"| {way} | {speed:#.3g} | {vs_ref} | {speed / config['audio_s_per_s']:.2f} "
                     f"| {per_stage(v.get('stage_s', {}), '{:.1f}')} | {usage} | {rss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="vits", help="pipeline (a path or a name under configs/)")
    p.add_argument("--bundle", help="bundle (default: the pipeline's)")
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="Chatterbox: speech tokens per row at most (greedy decoding; 25 per audio second)")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME:SET[,SET...]",
                   help="also run the in-process runner with SET = STAGE.PATH=VALUE applied "
                        "(e.g. t3.options.max_rows=16, cfm.backend.engine=openvino); repeatable")
    p.add_argument("--skip-ray", action="store_true", help="leave out the Ray job")
    p.add_argument("--reference-json", metavar="PATH",
                   help="reuse the reference section of this earlier report instead of running the reference")
    p.add_argument("--json", help="where to write the results (default: bench/<config>.json)")
    args = p.parse_args(argv)
    try:
        report = run(args)
    except VoxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.json or f"bench/{find_config(args.config).stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print("\n" + report["table"])
    return 0


def run(args: argparse.Namespace) -> dict:
    """Every way the arguments ask for, timed on the same rows; config and variant mistakes fail before any run."""
    pipeline = load_pipeline(args.config).with_overrides(args.bundle)
    cores = os.cpu_count() or 1
    variants = [Variant("config"), *args.variant]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant names must be unique and not 'config' (the config as given), got {names[1:]}")
    specs = {v.name: in_process_spec(pipeline, v, cores) for v in variants}
    bundle = load_bundle(pipeline.bundle)
    table = make_rows(args.rows, pipeline.family, args.max_new_tokens)
    report: dict = {"config": str(find_config(args.config)), "bundle": bundle.manifest.get("name"),
                    "rows": args.rows, "machine": {"cpus": cores, "cpu": cpu_model(),
                                                   "python": platform.python_version(), "ray": ray.__version__},
                    "pools": {s.name: s.pool.model_dump() | {"threads": s.backend.threads} for s in pipeline.stages},
                    "variants": {v.name: v.sets for v in variants}}
    if pipeline.family == "chatterbox":
        report["max_new_tokens"] = args.max_new_tokens
    if args.reference_json:
        report["reference"] = reused_reference(args.reference_json, report)
    # The Ray job first, while this process holds no stage: memory the in-process stages freed is not all
    # returned to the OS, and on a small node the job's actors need it (else Ray's memory monitor kills one).
    if not args.skip_ray:
        report["ray_job"] = ray_job(args.config, pipeline, table)
    report["in_process"] = {name: in_process(spec, table) for name, spec in specs.items()}
    if pipeline.family in BASELINES and not args.reference_json:
        report["reference"] = BASELINES[pipeline.family](bundle, table, pipeline.format)
    report["ratios"] = ratios(report)
    report["table"] = markdown_table(report)
    return report


if __name__ == "__main__":
    sys.exit(main())
