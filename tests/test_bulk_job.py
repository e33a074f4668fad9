"""jobs/bulk_synth.py on a real local Ray cluster: outputs, bad rows, resume, killed workers, no torch."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs.bulk_synth import EXAMPLE_MANIFEST, JobArgs, main, run_job
from jobs.store import PARTS_DIR

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "test.yaml")


def write_manifest(path: Path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def results(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "results.parquet").to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate result rows"
    return by_id


def test_example_job_writes_audio_and_results(ray_cluster, tmp_path):
    summary = run_job(JobArgs(output=str(tmp_path / "out"), config=CONFIG))
    ids = pq.read_table(EXAMPLE_MANIFEST).column("id").to_pylist()
    assert (summary.rows, summary.ok, summary.failed, summary.skipped) == (len(ids), len(ids), 0, 0)
    res = results(tmp_path / "out")
    assert sorted(res) == sorted(ids)
    for row_id, row in res.items():
        assert row["status"] == "ok" and row["error"] == ""
        audio, sr = sf.read(row["audio_uri"])
        assert sr == row["sample_rate"] == 22050
        assert abs(len(audio) / sr - row["duration_s"]) < 1e-3 and row["duration_s"] > 1.0
        assert row["time_vits_s"] > 0 and row["time_write_s"] > 0
    assert not (tmp_path / "out" / PARTS_DIR).exists() or not list((tmp_path / "out" / PARTS_DIR).iterdir())
    # the paragraph is split into sentences and joined: longer than any single sentence row
    assert res["long-text"]["duration_s"] > 2 * res["question"]["duration_s"]


def test_bad_rows_get_error_rows_and_exit_code_1(ray_cluster, tmp_path):
    manifest = write_manifest(
        tmp_path / "m.parquet",
        id=["good", "empty", "spaces", "too-long", "stranger", "known-but-not-in-voice", "odd/id?"],
        text=["A fine row.", "", "   ", "x" * 1500, "Hello.", "Hello.", "Ids with slashes are fine."],
        speaker_id=[None, None, None, None, "stranger", "alice", None])
    speakers = write_manifest(tmp_path / "s.parquet", speaker_id=["alice"], audio_uri=["s3://x/alice.wav"])
    out = tmp_path / "out"
    code = main(["--manifest", manifest, "--speakers", speakers, "--output", str(out), "--config", CONFIG,
                 "--format", "flac"])
    assert code == 1
    res = results(out)
    assert {k: r["status"] for k, r in res.items()} == {
        "good": "ok", "empty": "error", "spaces": "error", "too-long": "error", "stranger": "error",
        "known-but-not-in-voice": "error", "odd/id?": "ok"}
    assert res["empty"]["error"] == "empty text"
    assert "over the limit of 1000" in res["too-long"]["error"]
    assert "not in the speaker manifest" in res["stranger"]["error"]
    assert "unknown speaker 'alice'" in res["known-but-not-in-voice"]["error"]
    assert res["odd/id?"]["audio_uri"].endswith("audio/odd%2Fid%3F.flac")
    assert sorted(p.name for p in (out / "audio").iterdir()) == ["good.flac", "odd%2Fid%3F.flac"]
    assert res["empty"]["audio_uri"] is None


@pytest.mark.parametrize("cols, message", [
    ({"id": ["a", "b", "a"], "text": ["x", "y", "z"]}, "1 duplicate id values ('a')"),
    ({"key": ["a"], "text": ["x"]}, "missing columns ['id']"),
    ({"id": ["a", None], "text": ["x", "y"]}, "1 rows have no id (first at row 1)"),
    ({"id": ["a", " "], "text": ["x", "y"]}, "1 rows have no id (first at row 1)"),
])
def test_unusable_manifests_are_rejected_up_front(tmp_path, capsys, cols, message):
    manifest = write_manifest(tmp_path / "m.parquet", **cols)
    assert main(["--manifest", manifest, "--output", str(tmp_path / "out"), "--config", CONFIG]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unreadable_and_missing_manifests(tmp_path, capsys):
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert main(["--manifest", str(garbage), "--output", str(tmp_path / "o"), "--config", CONFIG]) == 2
    assert "unreadable as Parquet" in capsys.readouterr().err
    assert main(["--manifest", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_rerun_skips_done_rows_and_retries_failed_ones(ray_cluster, tmp_path):
    out = tmp_path / "out"
    first = write_manifest(tmp_path / "m1.parquet", id=["a", "b", "c"], text=["One.", "Two.", ""])
    assert main(["--manifest", first, "--output", str(out), "--config", CONFIG]) == 1
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "audio").iterdir()}
    second = write_manifest(tmp_path / "m2.parquet", id=["a", "b", "c", "d"], text=["One.", "Two.", "Three.", "Four."])
    summary = run_job(JobArgs(manifest=second, output=str(out), config=CONFIG))
    assert (summary.rows, summary.ok, summary.skipped) == (4, 4, 2)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "audio").iterdir() if p.name in stamp} == stamp
    assert sorted(results(out)) == ["a", "b", "c", "d"]
    again = run_job(JobArgs(manifest=second, output=str(out), config=CONFIG))
    assert (again.rows, again.ok, again.skipped) == (4, 4, 4)


def test_killed_worker_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    from ray.util.state import list_actors

    n = 24
    manifest = write_manifest(tmp_path / "m.parquet", id=[f"row-{i:02d}" for i in range(n)],
                              text=[f"Sentence number {i}, spoken slowly and clearly for the test." for i in range(n)])
    out = tmp_path / "out"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        summary=run_job(JobArgs(manifest=manifest, output=str(out), config=CONFIG))))
    thread.start()
    killed, deadline = None, time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        parts = list((out / PARTS_DIR).glob("*.parquet")) if (out / PARTS_DIR).exists() else []
        if parts:  # some rows are written, most are not: kill a synthesis actor now
            for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True):
                if "MapWorker" in actor.class_name and actor.pid:
                    os.kill(actor.pid, signal.SIGKILL)
                    killed = sum(pq.read_table(p).num_rows for p in parts)
                    break
        time.sleep(0.2)
    thread.join(300)
    assert killed is not None and killed < n, "the job finished before a worker could be killed"
    summary = outcome["summary"]
    assert (summary.rows, summary.ok, summary.failed) == (n, n, 0)
    res = results(out)
    assert sorted(res) == [f"row-{i:02d}" for i in range(n)]
    assert len(list((out / "audio").iterdir())) == n


def test_job_submission_never_imports_torch(ray_cluster, tmp_path):
    """`ray job submit --working-dir .` path; driver and every synthesis worker stay torch-free."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = tmp_path / "probe.yaml"
    config.write_text(Path(CONFIG).read_text().replace("actors.vits.VitsStage", "tests.probes.TorchFreeVitsStage"))
    client = JobSubmissionClient(f"http://{ray_cluster.dashboard_url}")
    job = client.submit_job(
        entrypoint=f"{sys.executable} tests/probes.py --output {tmp_path / 'out'} --config {config}",
        runtime_env={"working_dir": str(REPO), "excludes": ["out/", ".git/"],
                     "env_vars": {"VOXRAY_CACHE": os.environ["VOXRAY_CACHE"]}})
    deadline = time.monotonic() + 240
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "TORCH_IN_DRIVER=False" in logs
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert rows and all(r["status"] == "ok" for r in rows), rows
