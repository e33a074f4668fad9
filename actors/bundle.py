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
from typing import Any

from actors.storage import StorageOptions, is_s3, join

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
DEFAULT_BUNDLE = "default"
REQUIRED_KEYS = ("format_version", "family", "sample_rate", "graphs")


class BundleError(Exception):
    """A bundle is missing, partial or corrupt; the message names the file."""


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
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{where}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where}: missing keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {manifest['format_version']} is not supported "
                          f"(this voxray reads {FORMAT_VERSION})")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any], label: str | None = None) -> None:
    for rel, digest in files_of(manifest).items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"bundle {label or root}: missing file {rel}")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle {label or root}: file {rel} is corrupt (sha256 mismatch)")


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    (Path(root) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_bundle(uri: str, storage: StorageOptions | None = None) -> Bundle:
    """Open a bundle by local path, s3:// prefix, or "default" (the embedded Piper voice).

    S3 bundles are downloaded once into a local cache keyed by the sha256 of
    their bundle.json (which pins every file's hash); every file is checked
    against its sha256 before the bundle is returned.
    """
    if uri == DEFAULT_BUNDLE:
        from export.vits import ensure_default_bundle  # no torch: the Piper import only edits ONNX
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
        verify_files(staging, manifest, label=uri)
        (staging / MANIFEST).write_text(text)
        try:
            staging.rename(root)
        except OSError:  # another worker on this node finished first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    verify_files(root, manifest)
    return Bundle(root, manifest)
