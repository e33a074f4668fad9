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
import signal
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
    computed_once: dict[str, int] | None = None
    """For a stage computing once per value (voice conditioning): values `computed` by this run and
    rows that `reused` a cached result."""


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


def _work(manifest: pa.Table, pipeline: PipelineSpec, speakers: dict[str, str] | None,
          done: pa.Array) -> pa.Table:
    """The rows left to do, as the stages need them: id, the columns they read, and status/error
    for rows that fail before any stage (a speaker missing from the speaker manifest).

    Stages that clone a voice read `reference_audio`: the speaker manifest's `audio_uri` of the
    row's `speaker_id` (a URI given in the text manifest itself wins)."""
    todo = manifest.filter(pc.invert(pc.is_in(manifest.column("id"), value_set=done)))
    wanted = pipeline.input_columns()
    todo = todo.select(["id", *(c for c in wanted if c in todo.column_names)])
    status = [OK] * todo.num_rows
    error = [""] * todo.num_rows
    ids = todo.column("speaker_id").to_pylist() if "speaker_id" in todo.column_names else [None] * todo.num_rows
    if speakers is not None:
        for i, speaker in enumerate(ids):
            if speaker not in (None, "") and speaker not in speakers:
                status[i], error[i] = ERROR, f"unknown speaker {speaker!r} (not in the speaker manifest)"
    if "reference_audio" in wanted:
        given = todo.column("reference_audio").to_pylist() if "reference_audio" in todo.column_names \
            else [None] * todo.num_rows
        refs = [g or (speakers or {}).get(s) for g, s in zip(given, ids)]
        todo = todo.drop_columns([c for c in ("reference_audio",) if c in todo.column_names])
        todo = todo.append_column("reference_audio", pa.array(refs, pa.string()))
    return todo.append_column("status", pa.array(status)).append_column("error", pa.array(error))


def _compute_once(work: pa.Table, pipeline: PipelineSpec, storage: StorageOptions,
                  cache: str) -> tuple[pa.Table, tuple[int, str] | None]:
    """Run the first stage that computes once per value (e.g. a voice per reference) on one row per
    distinct value, so its cache is filled before the rows arrive; rows whose value failed fail now
    with that value's error. Returns the work rows, how many values were computed and the outcome column."""
    for spec in pipeline.stages:
        column, outcome = spec.stage_class().once_per or (None, None)
        if column in work.column_names:
            break
    else:
        return work, None
    pending = work.filter(pc.equal(work.column("status"), OK)).column(column)
    values = [v for v in pc.unique(pending).to_pylist() if v]
    if not values:
        return work, (0, outcome)
    first = pa.table({"id": [f"{column}-{k}" for k in range(len(values))], column: values,
                      "status": [OK] * len(values), "error": [""] * len(values)})
    once = pipeline.model_copy(update={"stages": [spec]})
    done = add_stages(ray.data.from_arrow(first), once, storage, cache).select_columns(
        [column, "status", "error", outcome]).take_all()
    failed = {r[column]: r["error"] for r in done if r["status"] != OK}
    computed = sum(1 for r in done if r[outcome] == "computed")
    status, error = work.column("status").to_pylist(), work.column("error").to_pylist()
    for i, v in enumerate(work.column(column).to_pylist()):
        if status[i] == OK and v in failed:
            status[i], error[i] = ERROR, failed[v]
    work = work.set_column(work.column_names.index("status"), "status", pa.array(status))
    work = work.set_column(work.column_names.index("error"), "error", pa.array(error))
    return work, (computed, outcome)


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
    speakers = None
    if args.speakers:
        table = read_speaker_manifest(args.speakers, storage)
        speakers = dict(zip(table.column("speaker_id").to_pylist(), table.column("audio_uri").to_pylist()))
    store = OutputStore(args.output, storage)
    store.check_writable()
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    with store.lock(run_id):
        before, _ = store.read_results()
        done = pc.unique(before.filter(pc.equal(before.column("status"), OK)).column("id"))
        work = _work(manifest, pipeline, speakers, done)
        log.info("manifest %s: %d rows, %d already done", args.manifest, manifest.num_rows,
                 manifest.num_rows - work.num_rows)
        interrupted, error, once = False, None, None
        if work.num_rows:
            if not ray.is_initialized():
                ray.init(logging_level=logging.WARNING)
            _check_stages_load(pipeline, storage, pipeline.io.num_cpus)
            try:
                work, once = _compute_once(work, pipeline, storage, store.cache)
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
        interrupted=interrupted, error=error,
        computed_once=once and {"computed": once[0], "reused": _reused(mine, work, once[1])})
    if interrupted:
        raise JobInterrupted(summary)
    return summary


def _reused(results: pa.Table, work: pa.Table, outcome: str) -> int:
    """Rows of this run whose once-per-value result came from a cache rather than being computed."""
    if outcome not in results.column_names:
        return 0
    now = results.filter(pc.is_in(results.column("id"), value_set=work.column("id")))
    return int(pc.sum(pc.is_in(now.column(outcome), value_set=pa.array(["memory", "store"]))).as_py() or 0)


def _run(work: pa.Table, pipeline: PipelineSpec, store: OutputStore, storage: StorageOptions) -> None:
    # at most rows_per_block rows per block, and at least one block per starting actor of the widest pool
    widest = max(s.pool.min_actors for s in pipeline.stages)
    step = max(1, min(pipeline.io.rows_per_block, -(-work.num_rows // widest)))
    ds = ray.data.from_arrow([work.slice(i, step) for i in range(0, work.num_rows, step)])
    ds = add_stages(ds, pipeline, storage, store.cache)
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


def setup_cli() -> None:
    """Logging, and SIGINT as KeyboardInterrupt (stop, keep what finished) even when a shell started the
    job in the background: non-interactive shells start background commands with SIGINT ignored."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    setup_cli()
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
