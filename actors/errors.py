"""The one base class for problems a user can fix: a CLI prints the message and exits 2."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pydantic


class VoxrayError(Exception):
    """Unusable input, configuration, bundle or output; the message names what is wrong and where."""


class ConfigError(VoxrayError):
    """A pipeline file, stage option or backend setting is invalid."""


class BundleError(VoxrayError):
    """A bundle is missing, partial or corrupt; the message names the file."""


def describe_validation_error(error: pydantic.ValidationError, where: str, prefix: str = "") -> str:
    """One line per problem of a pydantic error, each naming the file and the key path."""
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in (*([prefix] if prefix else []), *problem["loc"]))
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        lines.append(f"{where}: {path}: {message}")
    return "\n".join(lines)
