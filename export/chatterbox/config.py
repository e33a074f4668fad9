"""Model-size presets for the Chatterbox export (configs/chatterbox/<preset>.yaml)."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "chatterbox"
T = TypeVar("T")


def load_preset(name_or_path: str) -> dict[str, dict[str, Any]]:
    """Sections of a preset by name (`tiny`, `full`) or YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no Chatterbox config preset {name_or_path!r} (looked for {path})")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def build_config(cls: type[T], section: dict[str, Any] | None) -> T:
    """A component config dataclass from a preset section; unknown keys are an error."""
    section = section or {}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    return cls(**section)
