"""Bulk synthesis: a Parquet text manifest in, one audio file per row and a results Parquet out.

    python jobs/bulk_synth.py                      # embedded default: example manifest → ./out
    ray job submit --working-dir . -- python jobs/bulk_synth.py --manifest s3://b/m.parquet --output s3://b/out

Exit status: 0 every row of the manifest ok, 1 some rows failed (everything else
was written), 2 the job could not start (bad manifest, config, bundle, output or
arguments; nothing was synthesized) or its results file could not be written,
130 interrupted (what finished was written).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.bundle import load_bundle
from actors.errors import BundleError, VoxrayError
from actors.rows import ERROR, OK
from actors.storage import StorageOptions, join
from jobs.config import FORMATS, PipelineSpec, load_pipeline
from jobs.manifest import read_speaker_manifest, read_text_manifest
from jobs.pipeline import add_stages, build_stages
from jobs.sink import AudioDatasink
from jobs.store import RESULTS_FILE, OutputError, OutputStore

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
    """Rows of this manifest."""
    ok: int
    failed: int
    skipped: int
    """Rows already done in an earlier run (not redone)."""
    done_now: int
    """Rows synthesized by this run."""
    audio_seconds: float
    wall_seconds: float
    results: str
    interrupted: bool = False
    error: str | None = None
    """Why the run stopped early, if it did (its rows without a result are marked failed)."""


class JobInterrupted(Exception):
    def __init__(self, summary: JobSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary


def _probe(pipeline: PipelineSpec, storage: StorageOptions) -> None:
    """Build every stage once on CPU: graphs load, IO names match bundle.json, reduced precisions pass."""
    build_stages(pipeline, storage, device="cpu")


def _check_stages_load(pipeline: PipelineSpec, storage: StorageOptions, num_cpus: float) -> None:
    """`_probe` in one short-lived worker, so the driver never holds a big model's memory."""
    task = ray.remote(num_cpus=num_cpus, max_calls=1, max_retries=0)(_probe)
    try:
        ray.get(task.remote(pipeline, storage))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        if isinstance(cause, VoxrayError):
            raise cause from None
        raise BundleError(f"bundle {pipeline.bundle}: the stages cannot be built: {cause!r}") from None


def _work(manifest: pa.Table, pipeline: PipelineSpec, known_speakers: frozenset[str] | None,
          done: pa.Array) -> pa.Table:
    """The rows left to do, as the stages need them: id, the columns they read, and status/error
    for rows that fail before any stage (a speaker missing from the speaker manifest)."""
    todo = manifest.filter(pc.invert(pc.is_in(manifest.column("id"), value_set=done)))
    todo = todo.select(["id", *(c for c in pipeline.input_columns() if c in todo.column_names)])
    status = [OK] * todo.num_rows
    error = [""] * todo.num_rows
    if known_speakers is not None and "speaker_id" in todo.column_names:
        for i, speaker in enumerate(todo.column("speaker_id").to_pylist()):
            if speaker not in (None, "") and speaker not in known_speakers:
                status[i], error[i] = ERROR, f"unknown speaker {speaker!r} (not in the speaker manifest)"
    return todo.append_column("status", pa.array(status)).append_column("error", pa.array(error))


def run_job(args: JobArgs) -> JobSummary:
    """Synthesize every row of the manifest not already done under `args.output`.

    Raises VoxrayError before any work when something is unusable, and
    JobInterrupted (after writing the results of what finished) on Ctrl-C.
    """
    start = time.perf_counter()
    storage = StorageOptions.from_env(args.endpoint_url)
    pipeline = load_pipeline(args.config).with_overrides(args.bundle, args.format)
    bundle = load_bundle(pipeline.bundle, storage)
    if bundle.family != pipeline.family:
        raise BundleError(f"bundle {pipeline.bundle} is a {bundle.family!r} bundle; pipeline "
                          f"{pipeline.source} runs {pipeline.family!r} bundles")
    manifest = read_text_manifest(args.manifest, storage, pipeline)
    known = None
    if args.speakers:
        known = frozenset(read_speaker_manifest(args.speakers, storage).column("speaker_id").to_pylist())
    store = OutputStore(args.output, storage)
    store.check_writable()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with store.lock(run_id):
        before, _ = store.read_results()
        done = pc.unique(before.filter(pc.equal(before.column("status"), OK)).column("id"))
        work = _work(manifest, pipeline, known, done)
        log.info("manifest %s: %d rows, %d already done", args.manifest, manifest.num_rows,
                 manifest.num_rows - work.num_rows)
        interrupted, error = False, None
        if work.num_rows:
            if not ray.is_initialized():
                ray.init(logging_level=logging.WARNING)
            _check_stages_load(pipeline, storage, pipeline.io.num_cpus)
            try:
                _run(work, pipeline, store, storage)
            except KeyboardInterrupt:
                interrupted = True
            except Exception as e:  # noqa: BLE001 - whatever stopped it, keep what finished
                log.exception("the job stopped early")
                cause = getattr(e, "cause", None) or e  # a worker's exception, unwrapped
                error = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
        try:
            results = store.consolidate(manifest.drop_columns(
                [c for c in manifest.column_names if c in pipeline.input_columns() and c != "id"]))
        except (OSError, pa.ArrowException) as e:
            raise OutputError(f"cannot write {join(args.output, RESULTS_FILE)} ({str(e).splitlines()[0]}); "
                              "the finished rows' parts stay and the next run merges them") from None
    mine = results.filter(pc.is_in(results.column("id"), value_set=manifest.column("id")))
    ok = pc.fill_null(pc.equal(mine.column("status"), OK), False)
    n_ok = int(pc.sum(ok).as_py() or 0)
    skipped = manifest.num_rows - work.num_rows
    summary = JobSummary(
        rows=manifest.num_rows, ok=n_ok, failed=manifest.num_rows - n_ok, skipped=skipped,
        done_now=n_ok - skipped,
        audio_seconds=round(float(pc.sum(mine.filter(ok).column("duration_s")).as_py() or 0.0), 2),
        wall_seconds=round(time.perf_counter() - start, 2), results=join(args.output, RESULTS_FILE),
        interrupted=interrupted, error=error)
    if interrupted:
        raise JobInterrupted(summary)
    return summary


def _run(work: pa.Table, pipeline: PipelineSpec, store: OutputStore, storage: StorageOptions) -> None:
    # at most rows_per_block rows per block, and at least one block per starting actor of the widest pool
    widest = max(s.pool.min_actors for s in pipeline.stages)
    step = max(1, min(pipeline.io.rows_per_block, -(-work.num_rows // widest)))
    ds = ray.data.from_arrow([work.slice(i, step) for i in range(0, work.num_rows, step)])
    ds = add_stages(ds, pipeline, storage)
    ds.write_datasink(AudioDatasink(store.uri, storage, pipeline.format, keep=pipeline.result_columns()),
                      ray_remote_args={"num_cpus": pipeline.io.num_cpus})


def parse_args(argv: list[str] | None) -> JobArgs:
    p = argparse.ArgumentParser(prog="bulk_synth", description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default=str(EXAMPLE_MANIFEST),
                   help="text manifest Parquet (local path or s3://): id, text, optional speaker_id and "
                        "per-row generation parameters (default: the example that ships with voxray)")
    p.add_argument("--speakers", help="speaker manifest Parquet: speaker_id, audio_uri")
    p.add_argument("--output", default="out", help="output directory or s3:// prefix (default: ./out)")
    p.add_argument("--bundle", help="bundle dir, s3:// prefix, or 'default' (default: from the config)")
    p.add_argument("--format", choices=FORMATS, help="audio format (default: from the config)")
    p.add_argument("--config", help="pipeline YAML: a path or a name under configs/ (default: vits)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 "
                                          "(default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL); "
                                          "credentials come from the standard AWS variables")
    return JobArgs(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        summary = run_job(args)
    except VoxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JobInterrupted as e:
        print(json.dumps(asdict(e.summary), indent=2))
        print(f"interrupted: {e.summary.done_now} rows done by this run are in {e.summary.results}; "
              "run again to do the rest", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # while starting or consolidating: a re-run picks up every finished part
        print("interrupted", file=sys.stderr)
        return 130
    print(json.dumps(asdict(summary), indent=2))
    if summary.error:
        print(f"error: the job stopped early ({summary.error}); finished rows are in {summary.results}",
              file=sys.stderr)
    if summary.failed:
        print(f"{summary.failed} of {summary.rows} rows failed; see status/error in {summary.results}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
