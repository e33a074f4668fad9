"""Bundles: a directory (local or s3://) holding bundle.json, ONNX graphs and assets.

bundle.json (format v1) names the model family, sample rate, every graph file
with its sha256, IO names and dynamic axes, asset files, default generation
parameters, what it was exported from and the export's verification results.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.errors import BundleError, VoxrayError
from actors.storage import StorageOptions, is_s3, join

if TYPE_CHECKING:
    from actors.backends import Backend, Session

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
DEFAULT_BUNDLE = "default"
REQUIRED_KEYS = ("format_version", "family", "sample_rate", "graphs")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("VOXRAY_CACHE", Path.home() / ".cache" / "voxray"))


@dataclass
class Bundle:
    """A verified bundle on local disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def sample_rate(self) -> int:
        return int(self.manifest["sample_rate"])

    @property
    def generation(self) -> dict[str, Any]:
        return self.manifest.get("generation", {})

    def graph(self, name: str) -> Path:
        try:
            return self.path / self.manifest["graphs"][name]["file"]
        except KeyError:
            raise BundleError(f"{self.path / MANIFEST}: no graph named {name!r}") from None

    def open(self, name: str, backend: "Backend") -> "Session":
        """A session for graph `name`; its inputs and outputs must be the ones bundle.json states."""
        from actors.backends import open_session

        path = self.graph(name)
        try:
            session = open_session(path, backend)
        except VoxrayError:
            raise
        except Exception as e:  # a graph whose hash matches but that the engine cannot load
            raise BundleError(f"bundle {self.path}: graph {name!r} ({path.name}) cannot be loaded: {e}") from e
        entry = self.manifest["graphs"][name]
        for side, got in (("inputs", session.input_names), ("outputs", session.output_names)):
            want = entry.get(side)
            if want is not None and sorted(want) != sorted(got):
                raise BundleError(f"bundle {self.path}: graph {name!r} has {side} {sorted(got)}, "
                                  f"bundle.json states {sorted(want)}")
        return session

    def asset(self, name: str) -> Path:
        try:
            return self.path / self.manifest["assets"][name]["file"]
        except KeyError:
            raise BundleError(f"{self.path / MANIFEST}: no asset named {name!r}") from None


def files_of(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file the manifest lists, relative path → sha256 (external ONNX data included)."""
    out: dict[str, str] = {}
    for section in ("graphs", "assets"):
        for entry in manifest.get(section, {}).values():
            out[entry["file"]] = entry["sha256"]
            out.update(entry.get("external_data", {}))
    return out


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """bundle.json checked for the shape every reader relies on; BundleError naming the key otherwise."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where}: missing keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {manifest['format_version']} is not supported "
                          f"(this voxray reads {FORMAT_VERSION})")
    if not isinstance(manifest["family"], str) or not isinstance(manifest["sample_rate"], int):
        raise BundleError(f"{where}: family must be a string and sample_rate an integer")
    for section in ("graphs", "assets"):
        entries = manifest.get(section, {})
        if not isinstance(entries, dict):
            raise BundleError(f"{where}: {section} must be an object")
        for name, entry in entries.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                    or not isinstance(entry.get("sha256"), str):
                raise BundleError(f"{where}: {section}.{name} needs string keys 'file' and 'sha256'")
            if not isinstance(entry.get("external_data", {}), dict):
                raise BundleError(f"{where}: {section}.{name}.external_data must be an object")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any], label: str | None = None) -> None:
    """Every listed file is present and has its sha256.

    Hashing a multi-GB bundle in every actor of every pool would dominate start-up, so a
    marker in the node's cache remembers the sizes and modification times of files that
    were verified; an unchanged bundle is hashed once per node.
    """
    files = files_of(manifest)
    missing = [rel for rel in files if not (root / rel).is_file()]
    if missing:
        raise BundleError(f"bundle {label or root}: missing file {missing[0]}")
    stamp = hashlib.sha256(json.dumps(
        [(rel, digest, (root / rel).stat().st_size, (root / rel).stat().st_mtime_ns)
         for rel, digest in sorted(files.items())]).encode()).hexdigest()
    marker = cache_root() / "verified" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    if marker.is_file() and marker.read_text() == stamp:
        return
    for rel, digest in files.items():
        if sha256_file(root / rel) != digest:
            raise BundleError(f"bundle {label or root}: file {rel} is corrupt (sha256 mismatch)")
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
    tmp.write_text(stamp)
    tmp.replace(marker)


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (Path(root) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_bundle(uri: str, storage: StorageOptions | None = None) -> Bundle:
    """Open a bundle by local path, s3:// prefix, or "default" (the embedded Piper voice).

    S3 bundles are downloaded once into a local cache keyed by the sha256 of
    their bundle.json (which pins every file's hash); every file is checked
    against its sha256 before the bundle is returned, once per node (`verify_files`).
    """
    if uri == DEFAULT_BUNDLE:
        from actors.vits.piper import ensure_default_bundle

        uri = str(ensure_default_bundle())
    if is_s3(uri):
        return _load_s3(uri, storage or StorageOptions.from_env())
    root = Path(uri).expanduser()
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"bundle {root}: missing file {MANIFEST}")
    manifest = parse_manifest(manifest_path.read_text(), str(manifest_path))
    verify_files(root, manifest)
    return Bundle(root, manifest)


def _load_s3(uri: str, storage: StorageOptions) -> Bundle:
    fs, prefix = storage.resolve(uri)
    try:
        with fs.open_input_stream(join(prefix, MANIFEST)) as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError) as e:
        raise BundleError(f"bundle {uri}: cannot read {MANIFEST} ({e})") from None
    manifest = parse_manifest(text, join(uri, MANIFEST))
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    root = cache_root() / "bundles" / key
    if (root / MANIFEST).is_file():
        verify_files(root, manifest)
        return Bundle(root, manifest)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root.parent))
    try:
        for rel in files_of(manifest):
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with fs.open_input_stream(join(prefix, rel)) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (FileNotFoundError, OSError) as e:
                raise BundleError(f"bundle {uri}: missing file {rel} ({e})") from None
        (staging / MANIFEST).write_text(text)
        try:
            staging.rename(root)
        except OSError:  # another worker on this node finished first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        verify_files(root, manifest, label=uri)
    except BundleError:
        shutil.rmtree(root, ignore_errors=True)  # a corrupt copy must not be trusted by the next load
        raise
    return Bundle(root, manifest)
