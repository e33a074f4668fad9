"""`python -m cluster`: offline commands on real results, `submit`/`status`/`logs` against a real Ray cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.cli import main
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "test.yaml")


def cli(capsys, *argv: str) -> dict:
    code = main([argv[0], "--json", *argv[1:]])
    assert code == 0, code
    return json.loads(capsys.readouterr().out)


def test_up_and_down_print_the_ray_command_and_the_module_runs_without_torch():
    for action in ("up", "down"):
        proc = subprocess.run([sys.executable, "-m", "cluster", action, "--dry-run", "-y"], cwd=REPO,
                              capture_output=True, text=True, check=True)
        assert proc.stdout.strip() == f"command: ray {action} {REPO / 'cluster' / 'aws.yaml'} -y"
    probe = "import sys, cluster.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'export')))"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_submit_status_logs_summary_and_retry_selection(ray_cluster, tmp_path, capsys):
    address = f"http://{ray_cluster.dashboard_url}"
    manifest = tmp_path / "m.parquet"
    n = 8  # one row with empty text fails
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(n)],
                             "text": [f"Cluster row number {i}, read aloud." if i != 3 else "" for i in range(n)]}),
                   manifest)
    out = tmp_path / "run"
    job = cli(capsys, "submit", "--address", address, "--env", f"VOXRAY_CACHE={os.environ['VOXRAY_CACHE']}",
              "bulk", "--", "--manifest", str(manifest), "--output", str(out), "--config", CONFIG)
    assert job["entrypoint"].startswith("python jobs/bulk_synth.py --manifest ")

    seen: dict[str, set[str]] = {}
    deadline = time.monotonic() + 180
    while not (out / "results.parquet").exists():  # the job's stage actors show up by stage name
        assert time.monotonic() < deadline, "the submitted job did not finish"
        status = cli(capsys, "status", "--address", address)
        assert any(node["state"] == "ALIVE" and node["head"] for node in status["nodes"])
        assert set(status["pending"]) == {"resource_demand", "placement_groups", "autoscaler"}
        for stage, states in status["pools"].items():
            seen.setdefault(stage, set()).update(states)
        time.sleep(0.5)
    assert "ALIVE" in seen.get("vits", set()), seen

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    while str(client.get_job_status(job["job_id"]).value) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        time.sleep(0.5)
    assert str(client.get_job_status(job["job_id"]).value) == "FAILED"  # exit 1: one row failed
    main(["logs", job["job_id"], "--address", address])
    logs = capsys.readouterr().out
    assert f"1 of {n} rows failed" in logs

    summary = cli(capsys, "summary", str(out), "--node-price", "2.0", "--nodes", "2", "--wall-seconds", "60")
    rows = pq.read_table(out / "results.parquet").to_pylist()
    audio_s = sum(r["duration_s"] for r in rows if r["status"] == "ok")
    assert (summary["rows"], summary["ok"], summary["failed"]) == (n, n - 1, 1)
    assert summary["errors"] == {next(r["error"] for r in rows if r["status"] != "ok"): 1}
    assert set(summary["stage_seconds"]) == {"vits", "write"} and summary["stage_seconds"]["vits"] > 0
    assert summary["audio_hours"] == round(audio_s / 3600, 4)
    assert summary["throughput_audio_s_per_s"] == round(audio_s / 60, 2)
    assert summary["cost_per_audio_hour"] == round(2.0 * 2 * 60 / audio_s, 4)  # 2 nodes × 1 min × $2/h
    text = subprocess.run([sys.executable, "-m", "cluster", "summary", str(out)], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    assert f"ok: {n - 1}" in text and "cost_per_audio_hour:" in text  # plain text; wall time from the files

    retry = cli(capsys, "retry-failed", str(out), "--manifest", str(manifest), "--config", CONFIG, "--dry-run",
                "--", "--format", "wav")
    assert retry["rows"] == 1
    assert pq.read_table(retry["manifest"]).column("id").to_pylist() == ["c3"]  # only the failed row
    assert retry["entrypoint"] == (f"python jobs/bulk_synth.py --manifest {retry['manifest']} --output {out} "
                                   f"--config {CONFIG} --format wav")


def test_summary_and_retry_selection_read_a_run_on_s3(s3_env, s3_client, tmp_path, capsys):
    bucket = s3_env["bucket"]
    results = pa.table({"id": ["a", "b", "c", "d"], "status": ["ok", "ok", "error", "error"],
                        "error": ["", "", "vits: ValueError: length_scale=20 is out of range",
                                  "vits: ValueError: length_scale=30 is out of range"],
                        "duration_s": [1800.0, 1800.0, None, None], "time_vits_s": [1.0, 2.0, 0.0, 0.0]})
    sink = pa.BufferOutputStream()
    pq.write_table(results, sink)
    s3_client.put_object(Bucket=bucket, Key="cli-run/results.parquet", Body=sink.getvalue().to_pybytes())
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d", "e"], "text": ["x"] * 5}), manifest)
    run, endpoint = f"s3://{bucket}/cli-run", s3_env["endpoint"]

    summary = cli(capsys, "summary", run, "--endpoint-url", endpoint, "--wall-seconds", "1800", "--nodes", "3")
    assert (summary["rows"], summary["ok"], summary["failed"], summary["audio_hours"]) == (4, 2, 2, 1.0)
    assert summary["errors"] == {"vits: ValueError: length_scale=… is out of range": 2}  # one class, counted twice
    assert summary["stage_seconds"] == {"vits": 3.0}
    assert summary["throughput_audio_s_per_s"] == 2.0
    assert summary["cost_per_audio_hour"] == round(3 * 0.5 * 0.68, 4)  # 3 nodes × half an hour, default price

    retry = cli(capsys, "retry-failed", run, "--endpoint-url", endpoint, "--manifest", str(manifest), "--dry-run")
    assert retry["rows"] == 3 and retry["manifest"].startswith(f"{run}/_retry/")
    body = s3_client.get_object(Bucket=bucket, Key=retry["manifest"][len(f"s3://{bucket}/"):])["Body"].read()
    assert pq.read_table(pa.BufferReader(body)).column("id").to_pylist() == ["c", "d", "e"]  # failed + never run
