"""The bulk job on a real multi-node Ray cluster: a head without CPUs and two worker nodes."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, free_port_pair


@pytest.fixture(scope="module")
def three_nodes(voxray_cache, default_bundle):
    import ray
    from ray.cluster_utils import Cluster

    env = {"env_vars": {"PYTHONPATH": str(REPO), "VOXRAY_CACHE": str(voxray_cache)}}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 150 * 1024 * 1024,
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port_pair()})
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=150 * 1024 * 1024)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=env, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actor_pool_spreads_over_nodes_and_every_row_lands_once(three_nodes, tmp_path):
    from ray.util.state import list_actors

    from jobs.bulk_synth import JobArgs, run_job

    config = tmp_path / "two-nodes.yaml"
    # 1.5 of each node's 2 CPUs per actor: two actors only fit on two different worker nodes,
    # and each node keeps room for read and write tasks
    config.write_text((REPO / "configs" / "test.yaml").read_text()
                      .replace("num_cpus: 0.5", "num_cpus: 1.5").replace("min_actors: 1", "min_actors: 2"))
    n = 12
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [f"n{i}" for i in range(n)],
                             "text": [f"Row {i} on some node." for i in range(n)]}), manifest)
    summary = run_job(JobArgs(manifest=str(manifest), output=str(tmp_path / "out"), config=str(config)))
    assert (summary.rows, summary.ok) == (n, n)
    workers = [a for a in list_actors(detail=True) if "MapWorker" in a.class_name]
    assert len({a.node_id for a in workers}) == 2, workers
    ids = pq.read_table(tmp_path / "out" / "results.parquet").column("id").to_pylist()
    assert sorted(ids) == sorted(f"n{i}" for i in range(n))
