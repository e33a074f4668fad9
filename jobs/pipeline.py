"""The one piece of Ray glue that chains any pipeline: each stage a `map_batches` actor pool.

Intermediate columns (phoneme ids, tokens, mels, audio) move from pool to pool
through Ray's object store; nothing is written to files between stages.
"""
from __future__ import annotations

import ray

from actors.bundle import Bundle, load_bundle
from actors.rows import Batch
from actors.stage import Stage
from actors.storage import StorageOptions
from jobs.config import PipelineSpec, StageSpec


def build_stage(spec: StageSpec, bundle: Bundle | str, storage: StorageOptions | None = None,
                cache: str | None = None, **backend: object) -> Stage:
    """A stage from its pipeline entry; `backend` overrides configured backend fields (e.g. device="cpu")."""
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, storage)
    return spec.stage_class()(bundle, options=spec.options, backend=spec.backend.model_copy(update=backend),
                              name=spec.name, storage=storage, cache=cache)


def build_stages(pipeline: PipelineSpec, storage: StorageOptions | None = None, cache: str | None = None,
                 **backend: object) -> list[Stage]:
    """Every stage of `pipeline` in order, sharing one loaded bundle."""
    bundle = load_bundle(pipeline.bundle, storage)
    return [build_stage(s, bundle, storage, cache, **backend) for s in pipeline.stages]


class StageUDF:
    """A stage inside a Ray Data actor (constructor kwargs only: the bundle loads in the actor)."""

    def __init__(self, spec: StageSpec, bundle: str, storage: StorageOptions, cache: str | None) -> None:
        self.stage = build_stage(spec, bundle, storage, cache)

    def __call__(self, batch: Batch) -> Batch:
        return self.stage(batch)


def add_stages(ds: ray.data.Dataset, pipeline: PipelineSpec, storage: StorageOptions,
               cache: str | None = None) -> ray.data.Dataset:
    """`ds` through every stage of `pipeline` in order, each in its own actor pool; `cache` is
    where stages keep what later runs can reuse (e.g. voice conditionings)."""
    for spec in pipeline.stages:
        pool = spec.pool
        # Concurrent calls run on threads of one actor: a stage such as T3 feeds them all into one loop.
        threads = {"max_concurrent_calls_per_actor": pool.max_concurrency, "enable_true_multi_threading": True} \
            if pool.max_concurrency > 1 else {}
        # A class per stage names its actors (MapWorker(MapBatches(Stage_t3))) in logs, the dashboard, the state API.
        udf = type(f"Stage_{spec.name}", (StageUDF,), {})
        ds = ds.map_batches(
            udf, fn_constructor_kwargs={"spec": spec, "bundle": pipeline.bundle, "storage": storage,
                                             "cache": cache},
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors,
                                               max_tasks_in_flight_per_actor=max(pool.max_tasks_in_flight,
                                                                                 pool.max_concurrency),
                                               **threads),
            batch_size=pool.batch_size, num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
            batch_format="numpy")
    return ds
