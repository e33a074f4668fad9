"""Pipelines in configs/*.yaml: an ordered list of stages, each with its options, backend, pool and serve block.

    family: vits                    # must equal the bundle's family
    bundle: default                 # dir, s3:// prefix, or "default" (the embedded Piper voice)
    format: wav                     # wav | flac
    io: {num_cpus: 0.25, rows_per_block: 32}
    defaults: {pool: {...}, backend: {...}, serve: {...}}   # merged under every stage
    stages:
      - name: vits
        class: actors.vits.VitsStage
        options: {...}              # validated against the class's Options
        backend: {engine: onnxruntime, device: cpu, threads: 1}
        pool: {min_actors: 1, max_actors: 2, batch_size: 8, num_cpus: 1, num_gpus: 0,
               max_tasks_in_flight: 2, max_concurrency: 1}
        serve: {min_replicas: 1, max_replicas: 2, max_batch_size: 8, ...}

Everything is checked on the driver before any cluster work: unknown keys, bad
types and out-of-range values name the file and the key; each stage's options
are validated against its Options type; the stages' declared columns must chain
(`check_chain`).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.backends import Backend
from actors.errors import ConfigError, describe_validation_error
from actors.stage import Column, Stage, StageOptions

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SERVE_CONFIG = CONFIG_DIR / "serve.yaml"
"""The Serve application's config (`serve run`), the one file under configs/ that is not a pipeline."""
DEFAULT_CONFIG = "vits"
FORMATS = ("wav", "flac")
# Columns the job itself writes into results.parquet; a manifest may not bring its own.
JOB_COLUMNS = ("status", "error", "audio_uri", "duration_s", "sample_rate", "audio", "time_write_s")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PoolSpec(_Strict):
    """The Ray Data actor pool of one stage."""

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    """Rows per stage call."""
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    """Fractional values share one GPU between actors (Ray does not enforce GPU memory)."""
    max_tasks_in_flight: int = Field(2, ge=1)
    """Batches queued per actor, so it never waits for its next input."""
    max_concurrency: int = Field(1, ge=1)
    """Calls one actor runs at once (threads); > 1 lets a stage merge them, e.g. a shared decode loop."""

    @model_validator(mode="after")
    def _sizes(self) -> "PoolSpec":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors {self.max_actors} < min_actors {self.min_actors}")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError("num_gpus above 1 must be a whole number")
        return self


class ServeSpec(_Strict):
    """The Ray Serve deployment of one stage (replicas and dynamic batching)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    max_ongoing_requests: int = Field(16, ge=1)
    upscale_delay_s: float = Field(5.0, ge=0)
    """Load above the target this long adds replicas (Serve's default, 30 s, is slow for interactive TTS)."""
    downscale_delay_s: float = Field(120.0, ge=0)

    @model_validator(mode="after")
    def _sizes(self) -> "ServeSpec":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        if self.max_ongoing_requests < self.max_batch_size:  # a replica never sees more than this at once
            raise ValueError("max_ongoing_requests must be at least max_batch_size")
        return self


class StageSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    """Names the stage's pool, its timing column time_<name>_s and its Serve deployment."""
    class_: str = Field(alias="class", pattern=r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)
    backend: Backend = Backend()
    pool: PoolSpec = PoolSpec()
    serve: ServeSpec = ServeSpec()

    def stage_class(self) -> type[Stage]:
        module, _, attr = self.class_.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"stage {self.name!r}: class {self.class_!r} cannot be imported ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise ConfigError(f"stage {self.name!r}: {self.class_!r} is not a voxray Stage class")
        return cls

    def parsed_options(self, where: str, prefix: str) -> StageOptions:
        return self.stage_class().Options.parse(self.options, where, prefix)


class IOSpec(_Strict):
    """Read, write and bookkeeping tasks: fractional CPUs so they schedule beside the actors."""

    num_cpus: float = Field(0.25, gt=0)
    rows_per_block: int = Field(32, ge=1)
    """Rows per block of the manifest: finer streaming and less work redone after a failure."""


class PipelineSpec(_Strict):
    family: str
    bundle: str | None = "default"
    """A bundle dir, s3:// prefix or "default"; null: the job must be given --bundle."""
    format: Literal["wav", "flac"] = "wav"
    io: IOSpec = IOSpec()
    stages: list[StageSpec] = Field(min_length=1)
    source: str = Field("", exclude=True)
    """The file it came from, for messages."""

    @model_validator(mode="after")
    def _unique_names(self) -> "PipelineSpec":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    def with_overrides(self, bundle: str | None = None, fmt: str | None = None) -> "PipelineSpec":
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
        spec = self.model_copy(update={k: v for k, v in (("bundle", bundle), ("format", fmt)) if v is not None})
        if spec.bundle is None:
            raise ConfigError(f"{self.source or 'pipeline'} names no bundle: give one with --bundle")
        return spec

    def stage_classes(self) -> list[type[Stage]]:
        return [s.stage_class() for s in self.stages]

    def input_columns(self) -> dict[str, Column]:
        """Columns the stages read from the manifest (not made by an earlier stage)."""
        made: set[str] = set()
        wanted: dict[str, Column] = {}
        for cls in self.stage_classes():
            for name, column in cls.requires.items():
                if name not in made:
                    wanted.setdefault(name, column)
            made |= set(cls.provides)
        return wanted

    def reserved_columns(self) -> set[str]:
        """Names a manifest may not use: the job's and every stage's own columns."""
        names = set(JOB_COLUMNS) | {f"time_{s.name}_s" for s in self.stages}
        for cls in self.stage_classes():
            names |= set(cls.provides)
        return names

    def result_columns(self) -> dict[str, Column]:
        """Stage outputs kept in results.parquet beside the job's own columns."""
        return {k: c for cls in self.stage_classes() for k, c in cls.provides.items() if c.result}

    def check_chain(self, columns: Iterable[str]) -> None:
        """Each stage's required columns exist when it runs; the last stage makes the audio."""
        where = self.source or "pipeline"
        available = set(columns)
        for spec, cls in zip(self.stages, self.stage_classes()):
            if cls.family != self.family:
                raise ConfigError(f"{where}: stage {spec.name!r} ({spec.class_}) runs on {cls.family!r} bundles, "
                                  f"the pipeline's family is {self.family!r}")
            missing = sorted(k for k, c in cls.requires.items() if not c.optional and k not in available)
            if missing:
                raise ConfigError(f"{where}: stage {spec.name!r} needs columns {missing}, which neither the "
                                  f"manifest nor an earlier stage provides (available: {sorted(available)})")
            available = (available | set(cls.provides)) - set(cls.drops)
        if not {"audio", "sample_rate"} <= available:
            raise ConfigError(f"{where}: the last stage must provide 'audio' and 'sample_rate'")


def find_config(name: str | Path | None) -> Path:
    """A pipeline file by path, or by name under configs/ ("vits", "vits.yaml")."""
    raw = str(name or DEFAULT_CONFIG)
    candidates = [Path(raw), CONFIG_DIR / raw, CONFIG_DIR / f"{raw}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"config file not found: {raw} (a path, or one of {pipeline_names()})")


def pipeline_names() -> list[str]:
    """The pipelines shipped under configs/, by name."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p != SERVE_CONFIG)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


_DEFAULTABLE = {"backend": Backend, "pool": PoolSpec, "serve": ServeSpec}


def load_pipeline(name: str | Path | None = None) -> PipelineSpec:
    """The pipeline at `name` (see `find_config`), fully validated, stage classes and options included."""
    path = find_config(name)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    defaults = raw.pop("defaults", None) or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: defaults must be a mapping")
    for key, value in defaults.items():
        if key not in _DEFAULTABLE:
            raise ConfigError(f"{where}: defaults.{key}: unknown key (one of {sorted(_DEFAULTABLE)})")
        unknown = sorted(set(value or {}) - set(_DEFAULTABLE[key].model_fields))
        if unknown:
            raise ConfigError(f"{where}: defaults.{key}.{unknown[0]}: unknown key")
    stages = raw.get("stages")
    if isinstance(stages, list) and defaults:
        raw["stages"] = [_merge(defaults, s) if isinstance(s, dict) else s for s in stages]
    try:
        spec = PipelineSpec.model_validate({**raw, "source": where})
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, where)) from None
    for i, stage in enumerate(spec.stages):
        try:
            stage.stage_class()
        except ConfigError as e:
            raise ConfigError(f"{where}: stages.{i}.class: {e}") from None
        stage.parsed_options(where, f"stages.{i}.options")
    return spec
