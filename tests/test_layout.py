"""The repository's structure rules: layering, packaging, bundle verification once per node."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import actors.bundle as bundle_mod
from actors.bundle import load_bundle
from actors.errors import BundleError
from tests.conftest import REPO, tool


def test_layering_contracts_hold():
    """actors/, jobs/ and cluster/ never import export/ or torch; actors/ never imports Ray (pyproject.toml)."""
    done = subprocess.run([tool("lint-imports", "import-linter")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_the_wheel_carries_every_package_and_its_data(tmp_path):
    """Packages are found automatically: a new family folder cannot be left out of the wheel."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("voxray-*.whl"))).namelist()
    packages = {str(p.parent.relative_to(REPO)) for top in ("actors", "jobs", "export", "cluster")
                for p in (REPO / top).rglob("__init__.py")}
    assert {"actors/vits", "actors/dsp", "export/chatterbox"} <= packages
    for package in packages:
        assert f"{package}/__init__.py" in names, package
    assert "export/chatterbox/official_layout.json" in names and "jobs/examples/hello.parquet" in names


def test_a_bundle_is_hashed_once_per_node_until_a_file_changes(default_bundle, tmp_path, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle, copy)
    hashed: list[str] = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    load_bundle(str(copy))
    assert sorted(hashed) == ["model.onnx", "voice.json"]
    load_bundle(str(copy))
    load_bundle(str(copy))
    assert len(hashed) == 2  # the marker in the node's cache vouches for unchanged files
    data = bytearray((copy / "voice.json").read_bytes())
    data[-2:] = b"  "  # same size, new content and modification time
    time.sleep(0.01)
    (copy / "voice.json").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="voice.json is corrupt"):
        load_bundle(str(copy))
