"""A worker node dies mid-job: a real head and worker nodes on loopback, one node's processes killed at once.

(The driver being killed or interrupted is covered by tests/test_hardening.py.)
"""
from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs.store import PARTS_DIR
from tests.conftest import REPO


@pytest.fixture(scope="module")
def head_and_workers(voxray_cache, default_bundle):
    import ray
    from ray.cluster_utils import Cluster

    # the GCS declares a silent node dead after 4 missed 0.5 s health checks (default: 5 × 3 s)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 150 * 1024 * 1024,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=150 * 1024 * 1024)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "VOXRAY_CACHE": str(voxray_cache)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_worker_node_killed_mid_job_loses_and_duplicates_nothing(head_and_workers, tmp_path):
    from ray.util.state import list_actors

    from jobs.bulk_synth import JobArgs, run_job

    config = tmp_path / "two-stage.yaml"
    # the two-stage pipeline in small blocks, so most rows are still in flight when the node dies
    config.write_text((REPO / "configs" / "vits-two-stage.yaml").read_text().replace("rows_per_block: 32",
                                                                                      "rows_per_block: 2"))
    n = 24
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i:02d}" for i in range(n)],
                             "text": [f"Row {i} keeps going when a node dies under it." for i in range(n)]}),
                   manifest)
    out = tmp_path / "out"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        summary=run_job(JobArgs(manifest=str(manifest), output=str(out), config=str(config)))))
    thread.start()
    nodes = {node.node_id: node for node in head_and_workers.worker_nodes}
    killed, deadline = None, time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        parts = list((out / PARTS_DIR).glob("*.parquet")) if (out / PARTS_DIR).exists() else []
        if parts:  # some rows written, most not: kill the node running a synthesis actor
            for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True):
                if "Stage_vits" in actor.class_name and actor.node_id in nodes:
                    head_and_workers.remove_node(nodes[actor.node_id], allow_graceful=False)
                    killed = sum(pq.read_table(p).num_rows for p in parts)
                    break
        time.sleep(0.2)
    thread.join(300)
    assert killed is not None and killed < n, "the job finished before a node could be killed"
    summary = outcome["summary"]
    assert (summary.rows, summary.ok, summary.failed) == (n, n, 0)
    ids = pq.read_table(out / "results.parquet").column("id").to_pylist()
    assert sorted(ids) == [f"r{i:02d}" for i in range(n)]  # none lost, none duplicated
    files = sorted((out / "audio").iterdir())
    assert [f.name for f in files] == [f"r{i:02d}.wav" for i in range(n)]  # no partial temporary files either
    for f in files:
        audio, rate = sf.read(f)
        assert rate > 0 and len(audio) > rate // 2, f
    print(f"node failure: killed after {killed}/{n} rows; {n} ok, 0 lost, 0 duplicated")
