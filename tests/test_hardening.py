"""The bulk job under hostile conditions: damaged files, shared outputs, bad input, full disks, Ctrl-C.

Jobs run in this process (on the module's Ray cluster) or as real driver
processes connected to it, killed and interrupted for real.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from actors.bundle import sha256_file
from jobs.bulk_synth import JobArgs, main, run_job
from jobs.store import DAMAGED_DIR, LOCK_FILE, MAX_NAME_CHARS, PARTS_DIR, audio_name

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "test.yaml")


def manifest(path: Path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def texts(n: int, prefix: str = "row") -> dict:
    return {"id": [f"{prefix}-{i:03d}" for i in range(n)],
            "text": [f"Sentence {i} of the {prefix} manifest." for i in range(n)]}


def results(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "results.parquet").to_pylist()
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate result rows"
    return by_id


def driver(args: list[str], ray_cluster, **kwargs) -> subprocess.Popen:
    """A real driver process running the bulk job on the test cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "bulk_synth.py"), "--config", CONFIG, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# 1. damaged files ------------------------------------------------------------------------------

def test_damaged_results_and_parts_are_set_aside_and_their_rows_redone(ray_cluster, tmp_path, caplog):
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.parquet", **texts(3))
    assert main(["--manifest", m, "--output", str(out), "--config", CONFIG]) == 0
    good = (out / "results.parquet").read_bytes()
    (out / "results.parquet").write_bytes(good[: len(good) // 2])  # a write killed mid-file
    (out / PARTS_DIR).mkdir(exist_ok=True)
    (out / PARTS_DIR / "part-1-dead.parquet").write_bytes(good[:100])
    summary = run_job(JobArgs(manifest=m, output=str(out), config=CONFIG))
    assert (summary.rows, summary.ok, summary.skipped, summary.done_now) == (3, 3, 0, 3)
    assert sorted(p.name.split("-", 2)[-1] for p in (out / DAMAGED_DIR).iterdir()) == \
        ["part-1-dead.parquet", "results.parquet"]
    assert "is damaged" in caplog.text and sorted(results(out)) == texts(3)["id"]


def test_a_killed_write_leaves_no_file_under_its_final_name(tmp_path):
    target = tmp_path / "audio" / "big.wav"
    target.parent.mkdir()
    code = ("import sys, pyarrow.fs as fs; from actors.storage import write_atomic; "
            "write_atomic(fs.LocalFileSystem(), sys.argv[1], bytes(1 << 31))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=REPO)
    wait_for(lambda: any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in target.parent.iterdir()))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    assert all(p.name.startswith(".") for p in target.parent.iterdir())  # only a hidden temporary


# 2. one output, many manifests -------------------------------------------------------------------

def test_another_manifest_into_the_same_output_keeps_earlier_rows(ray_cluster, tmp_path):
    out = tmp_path / "out"
    first = manifest(tmp_path / "a.parquet", **texts(2, "a"), split=["train", "dev"])
    second = manifest(tmp_path / "b.parquet", **texts(2, "b"), take=[1, 2], split=[3, 4])
    assert main(["--manifest", first, "--output", str(out), "--config", CONFIG]) == 0
    summary = run_job(JobArgs(manifest=second, output=str(out), config=CONFIG))
    assert (summary.rows, summary.ok, summary.skipped, summary.done_now) == (2, 2, 0, 2)
    res = results(out)
    assert sorted(res) == ["a-000", "a-001", "b-000", "b-001"]
    assert [res[i]["split"] for i in ("a-000", "a-001", "b-000", "b-001")] == ["train", "dev", "3", "4"]
    assert [res[i]["take"] for i in ("b-000", "b-001")] == [1, 2] and res["a-000"]["take"] is None
    assert all(Path(r["audio_uri"]).is_file() for r in res.values())
    again = run_job(JobArgs(manifest=first, output=str(out), config=CONFIG))
    assert (again.ok, again.skipped, again.done_now) == (2, 2, 0)
    assert len(results(out)) == 4


# 3. two jobs, one output -------------------------------------------------------------------------

def test_a_second_job_on_a_busy_output_refuses_to_start(ray_cluster, tmp_path):
    out = tmp_path / "out"
    n = 16
    m = manifest(tmp_path / "m.parquet", **texts(n))
    first = driver(["--manifest", m, "--output", str(out)], ray_cluster)
    wait_for(lambda: (out / LOCK_FILE).exists() or first.poll() is not None)
    second = driver(["--manifest", m, "--output", str(out)], ray_cluster)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert "is in use by run" in err and "two jobs cannot write to one output at once" in err
    assert first.wait(timeout=300) == 0, first.communicate()[1][-3000:]
    res = results(out)
    assert sorted(res) == texts(n)["id"] and all(r["status"] == "ok" for r in res.values())
    assert len(list((out / "audio").iterdir())) == n and not (out / LOCK_FILE).exists()


def test_the_lock_of_a_dead_job_is_taken_over(ray_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"run_id": "killed-run", "host": os.uname().nodename,
                                             "pid": dead.pid, "heartbeat": time.time()}))
    m = manifest(tmp_path / "m.parquet", **texts(2))
    assert main(["--manifest", m, "--output", str(out), "--config", CONFIG]) == 0
    assert not (out / LOCK_FILE).exists() and len(results(out)) == 2


# 4. the job's own columns ------------------------------------------------------------------------

def test_reserved_columns_are_rejected_up_front(tmp_path, capsys):
    m = manifest(tmp_path / "m.parquet", **texts(2), status=["error", "ok"], error=["old", ""])
    assert main(["--manifest", m, "--output", str(tmp_path / "out"), "--config", CONFIG]) == 2
    assert "columns ['error', 'status'] are the job's own" in capsys.readouterr().err


# 5. unusable outputs -----------------------------------------------------------------------------

def test_unusable_local_outputs_fail_before_any_work(tmp_path, capsys):
    m = manifest(tmp_path / "m.parquet", **texts(2))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for output, message in ((a_file, "is a file, not a folder"), ("/proc/voxray-out", "is not writable")):
        start = time.monotonic()
        assert main(["--manifest", m, "--output", str(output), "--config", CONFIG]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert time.monotonic() - start < 10  # nothing was synthesized


def test_an_output_in_a_missing_bucket_fails_before_any_work(s3_env, tmp_path, capsys):
    m = manifest(tmp_path / "m.parquet", **texts(2))
    assert main(["--manifest", m, "--output", "s3://no-such-bucket/run", "--config", CONFIG,
                 "--endpoint-url", s3_env["endpoint"]]) == 2
    err = capsys.readouterr().err
    assert "output s3://no-such-bucket/run is not writable" in err and "Traceback" not in err


@pytest.fixture
def small_disk(tmp_path):
    """A real 700 KB filesystem (tmpfs): room for three ~200 KB files and the bookkeeping."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.fail(f"mounting a small tmpfs failed ({done.stderr.decode().strip()}): this test needs root "
                    "(or CAP_SYS_ADMIN) to make a real full disk")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_leaves_only_complete_files(ray_cluster, tmp_path, small_disk):
    n = 6
    long = "This sentence is long enough to make a file of about two hundred kilobytes of audio. " * 2
    m = manifest(tmp_path / "m.parquet", id=[f"big-{i}" for i in range(n)], text=[long] * n)
    code = main(["--manifest", m, "--output", str(small_disk), "--config", CONFIG])
    assert code == 1
    res = results(small_disk)
    assert sorted(res) == [f"big-{i}" for i in range(n)]
    failed = [r for r in res.values() if r["status"] == "error"]
    assert failed and all("No space left on device" in r["error"] and r["duration_s"] is None for r in failed)
    files = list((small_disk / "audio").iterdir())
    assert sorted(f.name for f in files) == sorted(f"{r['id']}.wav" for r in res.values() if r["status"] == "ok")
    for f in files:  # every file under a final name decodes whole
        audio, sr = sf.read(f)
        assert abs(len(audio) / sr - res[f.stem]["duration_s"]) < 1e-3


# 6. empty manifest -------------------------------------------------------------------------------

def test_an_empty_manifest_succeeds_with_empty_results(tmp_path):
    m = manifest(tmp_path / "m.parquet", id=pa.array([], pa.string()), text=pa.array([], pa.string()))
    out = tmp_path / "new" / "out"
    assert main(["--manifest", m, "--output", str(out), "--config", CONFIG]) == 0
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == 0 and {"id", "status", "audio_uri"} <= set(table.column_names)


# 7. what only a worker would find, found first ---------------------------------------------------

def corrupt_text_pages(path: Path) -> str:
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["CORRUPT-ME one.", "Fine two."]}), path,
                   compression="none", use_dictionary=False)
    data = bytearray(path.read_bytes())
    at = data.index(b"CORRUPT-ME")
    data[at - 4:at] = b"\xff\xff\xff\x7f"  # the value's length prefix
    path.write_bytes(bytes(data))
    assert pq.read_table(path, columns=["id"]).num_rows == 2  # ids alone still read
    return str(path)


def broken_bundle(default_bundle: Path, tmp_path: Path, how: str) -> str:
    copy = tmp_path / how
    shutil.copytree(default_bundle, copy)
    manifest_ = json.loads((copy / "bundle.json").read_text())
    if how == "unloadable-graph":
        (copy / "model.onnx").write_bytes(b"not an onnx graph")
        manifest_["graphs"]["vits"]["sha256"] = sha256_file(copy / "model.onnx")
    elif how == "not-an-object":
        manifest_ = [manifest_]
    elif how == "no-sha256":
        del manifest_["graphs"]["vits"]["sha256"]
    (copy / "bundle.json").write_text(json.dumps(manifest_))
    return str(copy)


@pytest.mark.parametrize("case, message", [
    ("corrupt-pages", "text manifest"),
    ("unloadable-graph", "graph 'vits' (model.onnx) cannot be loaded"),
    ("not-an-object", "expected a JSON object, got list"),
    ("no-sha256", "graphs.vits needs string keys 'file' and 'sha256'"),
])
def test_input_only_a_worker_would_find_is_refused_first(ray_cluster, default_bundle, tmp_path, capsys,
                                                         case, message):
    m = manifest(tmp_path / "m.parquet", **texts(2))
    bundle = "default"
    if case == "corrupt-pages":
        m = corrupt_text_pages(tmp_path / "bad.parquet")
    else:
        bundle = broken_bundle(default_bundle, tmp_path, case)
    assert main(["--manifest", m, "--output", str(tmp_path / "out"), "--config", CONFIG, "--bundle", bundle]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "out" / "audio").exists()


# 8. resume costs what is left --------------------------------------------------------------------

def test_resume_of_a_large_manifest_costs_what_is_left(ray_cluster, tmp_path):
    done, left = 300_000, 10
    ids = [f"r{i:07d}" for i in range(done + left)]
    m = manifest(tmp_path / "m.parquet", id=ids, text=["Resume me." for _ in ids])
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ids[:done], "status": ["ok"] * done, "error": [""] * done,
                             "audio_uri": [f"{out}/audio/{i}.wav" for i in ids[:done]],
                             "duration_s": np.ones(done), "sample_rate": pa.array([22050] * done, pa.int32())}),
                   out / "results.parquet")
    start = time.monotonic()
    summary = run_job(JobArgs(manifest=m, output=str(out), config=CONFIG))
    wall = time.monotonic() - start
    assert (summary.rows, summary.skipped, summary.done_now, summary.failed) == (done + left, done, left, 0)
    assert len(list((out / "audio").iterdir())) == left
    assert pq.read_table(out / "results.parquet", columns=["id"]).num_rows == done + left
    print(f"resume of {left} rows of {done + left}: {wall:.1f} s")
    assert wall < 90, wall  # was 445 s when blocks were sized from all rows


# 9. long ids -------------------------------------------------------------------------------------

def test_long_ids_get_bounded_unique_names(ray_cluster, tmp_path):
    ids = ["x" * 300, "x" * 299 + "y", "语音合成的测试标识符号很长很长很长很长很长很长很长很长", "short", "no-text"]
    m = manifest(tmp_path / "m.parquet", id=ids, text=["Long id one.", "Long id two.", "CJK id.", "Short.", ""])
    out = tmp_path / "out"
    assert main(["--manifest", m, "--output", str(out), "--config", CONFIG]) == 1
    res = results(out)
    names = [Path(res[i]["audio_uri"]).name for i in ids[:4]]
    assert len(set(names)) == 4 and all(len(n.encode()) <= MAX_NAME_CHARS + 4 for n in names)
    assert names[3] == "short.wav" and all(Path(res[i]["audio_uri"]).is_file() for i in ids[:4])
    assert [audio_name(i, "wav") for i in ids[:4]] == [f"audio/{n}" for n in names]  # deterministic
    assert res["no-text"]["status"] == "error" and res["no-text"]["duration_s"] is None


# 10. smaller -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cols, message", [
    ({"text": [1, 2]}, "column 'text' must hold str values"),
    ({"text": ["a.", "b."], "length_scale": [1.0, 0.0]}, "1 rows have length_scale outside its range (>= 0.1 and "
                                                        "<= 10, no NaN); first: id 'row-001' has length_scale=0"),
    ({"text": ["a.", "b."], "noise_w": [float("nan"), 0.5]}, "first: id 'row-000' has noise_w=NaN"),
])
def test_bad_column_types_and_parameters_are_refused_up_front(tmp_path, capsys, cols, message):
    m = manifest(tmp_path / "m.parquet", id=["row-000", "row-001"], **cols)
    assert main(["--manifest", m, "--output", str(tmp_path / "out"), "--config", CONFIG]) == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_exits_130_after_writing_what_finished(ray_cluster, tmp_path):
    out = tmp_path / "out"
    n = 80
    m = manifest(tmp_path / "m.parquet", **texts(n))
    job = driver(["--manifest", m, "--output", str(out)], ray_cluster)
    # Interrupt mid-job: at the first written part, or once the stage has synthesized a few rows (Ray Data
    # may hold writes back until late on a 2-CPU cluster), whichever comes first.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stderr), daemon=True)
    reader.start()
    progress = re.compile(r"MapBatches\(Stage_vits\): (\d+)/")
    wait_for(lambda: any((out / PARTS_DIR).glob("part-*.parquet")) or
             any(int(hit.group(1)) >= 8 for line in lines[-50:] if (hit := progress.search(line))))
    job.send_signal(signal.SIGINT)
    stdout = job.stdout.read()
    job.wait(120)
    reader.join(10)
    assert job.returncode == 130, "".join(lines)[-3000:]
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["interrupted"] and summary["done_now"] < n
    finished = {i for i, r in results(out).items() if r["status"] == "ok"}
    assert len(finished) == summary["done_now"] and not (out / LOCK_FILE).exists()
    again = run_job(JobArgs(manifest=m, output=str(out), config=CONFIG))
    assert (again.ok, again.skipped, again.done_now) == (n, len(finished), n - len(finished))
