"""The bulk job on a real Ray autoscaler: worker nodes are added for the stage pools and removed when idle.

The autoscaler runs Ray's `fake_multinode` node provider, which launches each worker node as local
raylet processes (what `ray.cluster_utils.AutoscalingCluster` does). That class starts and stops its
head with `ray stop --force`, which kills every Ray process on the machine, so the head is started
here as a `Cluster` head node with the same autoscaling config, and only its own processes are ended.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from tests.conftest import REPO, free_port_pair

AWS = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
WORKER_CPUS = 2
"""The fake worker nodes are cluster/aws.yaml's CPU type shrunk to this machine (2 CPUs instead of 16)."""
MAX_WORKERS = 3
IDLE_TIMEOUT_S = 6


def fake_multinode_config(gcs_address: str) -> dict:
    """An autoscaler config for the fake_multinode provider with cluster/aws.yaml's head (no CPUs) and its
    CPU worker type (from zero nodes), at this machine's size and a short idle timeout."""
    cpu = AWS["available_node_types"]["cpu"]
    return {
        "cluster_name": "voxray-autoscaling-test",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": AWS["available_node_types"][AWS["head_node_type"]]["resources"],
                                 "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {**cpu["resources"], "CPU": WORKER_CPUS, "object_store_memory": 100 * 1024 * 1024},
                    "node_config": {}, "min_workers": cpu["min_workers"], "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "initialization_commands": [], "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def descendants(pid: int) -> list[int]:
    """Every live process started, directly or not, by `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def worker_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


@pytest.fixture(scope="module")
def autoscaling_cluster(voxray_cache, default_bundle, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    others = set(descendants(os.getpid()))  # e.g. the session's S3 server: not this cluster's to end
    port = free_port_pair()
    config = tmp_path_factory.mktemp("autoscaler") / "fake-multinode.yaml"
    gcs = f"{ray._private.services.get_node_ip_address()}:{port}"  # where the provider's nodes join
    config.write_text(yaml.safe_dump(fake_multinode_config(gcs)))
    with pytest.MonkeyPatch.context() as env:
        # read by the autoscaler process the head starts: the fake provider, and a 1 s update loop
        env.setenv("RAY_FAKE_CLUSTER", "1")
        env.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "gcs_server_port": port, "autoscaling_config": str(config),
            "object_store_memory": 100 * 1024 * 1024, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port_pair()})
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "VOXRAY_CACHE": str(voxray_cache)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    # worker nodes are children of the autoscaler's process: end them by pid with the head
    mine = [pid for pid in descendants(os.getpid()) if pid not in others]
    cluster.shutdown()
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_pools_that_do_not_fit_add_nodes_which_leave_when_idle(autoscaling_cluster, tmp_path):
    import ray
    from ray.util.state import list_actors

    from jobs.bulk_synth import JobArgs, run_job

    head = autoscaling_cluster.head_node.node_id
    assert worker_nodes() == [], "the cluster must start without worker nodes"
    config = tmp_path / "autoscale.yaml"
    # configs/test.yaml with 1.5 of a worker's 2 CPUs per actor and two actors: the head has no CPU and a
    # node holds one actor (plus room for read and write tasks), so the pool makes the autoscaler add two
    config.write_text((REPO / "configs" / "test.yaml").read_text()
                      .replace("num_cpus: 0.5", "num_cpus: 1.5").replace("min_actors: 1", "min_actors: 2"))
    n = 10
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"a{i}" for i in range(n)],
                             "text": [f"Autoscaled row {i}." for i in range(n)]}), manifest)
    summary = run_job(JobArgs(manifest=str(manifest), output=str(tmp_path / "out"), config=str(config)))
    assert (summary.rows, summary.ok, summary.failed) == (n, n, 0)
    results = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert sorted(r["id"] for r in results) == sorted(f"a{i}" for i in range(n))  # each row exactly once
    assert all(sf.info(r["audio_uri"]).frames > 0 for r in results)
    actors = [a for a in list_actors(detail=True) if "Stage_vits" in a.class_name]
    assert len({a.node_id for a in actors}) == 2, actors
    added = {node["NodeID"] for node in ray.nodes()} - {head}
    assert 2 <= len(added) <= MAX_WORKERS, added

    deadline = time.monotonic() + IDLE_TIMEOUT_S + 60
    while worker_nodes():  # idle nodes leave after the idle timeout
        assert time.monotonic() < deadline, f"idle nodes were not removed: {worker_nodes()}"
        time.sleep(1)
    removed = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
    assert removed == added
    print(f"autoscaling: {len(added)} nodes added, {len(removed)} removed when idle")
