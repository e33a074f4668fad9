"""Job presets from configs/*.yaml: which stage, where it runs, how big the pool is."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "vits.yaml"


class ConfigError(ValueError):
    pass


@dataclass
class StageConfig:
    cls: str = "actors.vits.VitsStage"
    device: str = "cpu"
    threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)

    def stage_class(self) -> type:
        module, _, name = self.cls.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"stage class {self.cls!r} cannot be imported: {e}") from None


@dataclass
class PoolConfig:
    min_size: int = 1
    max_size: int = 2
    batch_size: int = 8
    rows_per_block: int = 32
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_tasks_in_flight_per_actor: int = 2


@dataclass
class IOConfig:
    """CPUs per read, filter and write task; fractional so they schedule beside the actors."""

    num_cpus: float = 0.25


@dataclass
class JobConfig:
    bundle: str = "default"
    format: str = "wav"
    stage: StageConfig = field(default_factory=StageConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    io: IOConfig = field(default_factory=IOConfig)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = {("cls" if k == "class" else k): v for k, v in data.items()}
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    nested = {"stage": StageConfig, "pool": PoolConfig, "io": IOConfig}
    kwargs = {k: _build(nested[k], v, f"{where}.{k}") if k in nested and cls is JobConfig else v
              for k, v in data.items()}
    return cls(**kwargs)


def load_job_config(path: str | Path | None = None) -> JobConfig:
    """A JobConfig from YAML (a path, or a name under configs/); the default is configs/vits.yaml."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file() and (CONFIG_DIR / path).is_file():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    config = _build(JobConfig, yaml.safe_load(path.read_text()) or {}, str(path))
    if config.pool.min_size < 1 or config.pool.max_size < config.pool.min_size:
        raise ConfigError(f"{path}: pool needs 1 <= min_size <= max_size")
    return config
