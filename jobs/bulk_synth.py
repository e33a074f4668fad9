"""Bulk synthesis: a Parquet text manifest in, one audio file per row and a results Parquet out.

    python jobs/bulk_synth.py                      # embedded default: example manifest → ./out
    ray job submit --working-dir . -- python jobs/bulk_synth.py --manifest s3://b/m.parquet --output s3://b/out

Exit status: 0 every row ok, 1 some rows failed (everything else was written),
2 the job could not start (bad manifest, config, bundle or arguments).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.audio import FORMATS
from actors.bundle import BundleError, load_bundle
from actors.storage import StorageOptions, join
from jobs.job_config import ConfigError, load_job_config
from jobs.manifest import (RESULTS_FILE, ManifestError, consolidate, done_ids, read_results,
                           read_speaker_manifest, validate_text_manifest)
from jobs.stage_udf import AudioDatasink, SynthesizeUDF, mark_unknown_speakers

EXAMPLE_MANIFEST = Path(__file__).resolve().parent / "examples" / "hello.parquet"
log = logging.getLogger("voxray.bulk_synth")


@dataclass
class JobArgs:
    manifest: str = str(EXAMPLE_MANIFEST)
    output: str = "out"
    speakers: str | None = None
    bundle: str | None = None
    format: str | None = None
    config: str | None = None
    endpoint_url: str | None = None


@dataclass
class JobSummary:
    rows: int
    ok: int
    failed: int
    skipped: int
    audio_seconds: float
    wall_seconds: float
    results: str


def _drop_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=done)))


def run_job(args: JobArgs) -> JobSummary:
    """Synthesize every row not already done under `args.output`; raises on unusable input."""
    start = time.perf_counter()
    storage = StorageOptions.from_env(args.endpoint_url)
    config = load_job_config(args.config)
    bundle = args.bundle or config.bundle
    fmt = args.format or config.format
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {sorted(FORMATS)}, got {fmt!r}")
    manifest = validate_text_manifest(args.manifest, storage)
    known = None
    if args.speakers:
        known = frozenset(read_speaker_manifest(args.speakers, storage).column("speaker_id").to_pylist())
    load_bundle(bundle, storage)  # fail before any cluster work if the bundle is unusable
    done = done_ids(read_results(args.output, storage))
    skipped = int(pc.sum(pc.is_in(manifest.ids, value_set=done)).as_py() or 0)
    log.info("manifest %s: %d rows, %d already done", args.manifest, len(manifest.ids), skipped)

    if skipped < len(manifest.ids):
        if not ray.is_initialized():
            ray.init(logging_level=logging.WARNING)
        fs, path = storage.resolve(args.manifest)
        pool, io_cpus = config.pool, config.io.num_cpus
        # The file-listing step of Ray Data's v2 reader always asks for a whole CPU, which
        # deadlocks when the actors hold most of a node; the v1 reader takes fractional CPUs
        # and splits a one-file manifest into blocks, so every actor in the pool gets work.
        ray.data.DataContext.get_current().use_datasource_v2 = False
        num_blocks = max(1, -(-len(manifest.ids) // pool.rows_per_block))
        ds = ray.data.read_parquet(path, filesystem=fs, num_cpus=io_cpus, override_num_blocks=num_blocks)
        if skipped:
            ds = ds.map_batches(_drop_done, fn_kwargs={"done": done}, batch_format="pyarrow", num_cpus=io_cpus)
        if known is not None:
            ds = ds.map_batches(mark_unknown_speakers, fn_kwargs={"known": known}, batch_format="numpy",
                                num_cpus=io_cpus)
        ds = ds.map_batches(
            SynthesizeUDF,
            fn_constructor_kwargs={"stage": config.stage, "bundle": bundle, "storage": storage, "fmt": fmt},
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                               max_tasks_in_flight_per_actor=pool.max_tasks_in_flight_per_actor),
            batch_size=pool.batch_size, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, batch_format="numpy",
        )
        ds.write_datasink(AudioDatasink(args.output, storage, fmt),
                          ray_remote_args={"num_cpus": io_cpus})

    results = consolidate(args.output, storage, manifest.ids)
    ok = pc.equal(results.column("status"), "ok")
    return JobSummary(
        rows=results.num_rows, ok=int(pc.sum(ok).as_py() or 0),
        failed=int(pc.sum(pc.invert(ok)).as_py() or 0), skipped=skipped,
        audio_seconds=round(float(pc.sum(results.filter(ok).column("duration_s")).as_py() or 0.0), 2),
        wall_seconds=round(time.perf_counter() - start, 2), results=join(args.output, RESULTS_FILE))


def parse_args(argv: list[str] | None) -> JobArgs:
    p = argparse.ArgumentParser(prog="bulk_synth", description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default=str(EXAMPLE_MANIFEST),
                   help="text manifest Parquet (local path or s3://): id, text, optional speaker_id and "
                        "per-row generation parameters (default: the example that ships with voxray)")
    p.add_argument("--speakers", help="speaker manifest Parquet: speaker_id, audio_uri")
    p.add_argument("--output", default="out", help="output directory or s3:// prefix (default: ./out)")
    p.add_argument("--bundle", help="bundle dir, s3:// prefix, or 'default' (default: from the config)")
    p.add_argument("--format", choices=sorted(FORMATS), help="audio format (default: from the config)")
    p.add_argument("--config", help="job preset YAML, a path or a name under configs/ (default: vits.yaml)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 "
                                          "(default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL); "
                                          "credentials come from the standard AWS variables")
    return JobArgs(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        summary = run_job(args)
    except (ManifestError, ConfigError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(summary), indent=2))
    if summary.failed:
        print(f"{summary.failed} of {summary.rows} rows failed; see status/error in {summary.results}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
