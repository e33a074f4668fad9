"""Chatterbox through the bulk job on a real Ray cluster: five chained pools, voices cloned once per
reference, S3 in and out, per-row seeds, resume, a killed T3 actor, bad references, no torch in workers."""
from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from jobs.bulk_synth import JobArgs, main, run_job
from jobs.store import PARTS_DIR

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "configs" / "chatterbox-cpu.yaml"
TEXTS = ["Hello there, this is a cloned voice.", "Short one.", "A somewhat longer sentence to speak, with a pause.",
         "Numbers like seven and eight.", "The end."]


def reference(seconds: float, sr: int, f0: float, channels: int = 1) -> bytes:
    """A voiced-like test signal: a pitch-varying harmonic tone with noise, as WAV bytes."""
    t = np.arange(int(seconds * sr)) / sr
    pitch = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t) ** 2)
    x = 0.3 * x / np.abs(x).max() + 0.01 * np.random.default_rng(int(f0)).standard_normal(len(t))
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    buf = io.BytesIO()
    sf.write(buf, data.astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def config(tmp_path: Path, name: str, edit=None) -> str:
    """The shipped CPU config, optionally edited (e.g. other batch sizes)."""
    spec = yaml.safe_load(CPU_CONFIG.read_text())
    if edit:
        edit(spec)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def rows(n: int, speakers: list[str | None], tokens: int = 16) -> pa.Table:
    return pa.table({"id": [f"row-{i:02d}" for i in range(n)], "text": [TEXTS[i % len(TEXTS)] for i in range(n)],
                     "speaker_id": [speakers[i % len(speakers)] for i in range(n)],
                     "seed": list(range(100, 100 + n)), "max_new_tokens": [tokens] * n})


def results(table: pa.Table) -> dict[str, dict]:
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert len(by_id) == table.num_rows, "duplicate result rows"
    return by_id


@pytest.fixture(scope="module")
def local_refs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("refs")
    files = {"alice": reference(4.0, 22050, 180.0), "bob": reference(5.0, 44100, 110.0, channels=2),
             "carol": reference(3.5, 16000, 240.0)}
    out = {}
    for name, data in files.items():
        (root / f"{name}.wav").write_bytes(data)
        out[name] = str(root / f"{name}.wav")
    (root / "broken.wav").write_bytes(b"RIFF not really a wav file")
    out["broken"] = str(root / "broken.wav")
    return out


def speakers_manifest(path: Path, refs: dict[str, str]) -> str:
    pq.write_table(pa.table({"speaker_id": list(refs), "audio_uri": list(refs.values())}), path)
    return str(path)


def test_voices_clone_over_s3_once_per_reference_and_bad_references_fail_only_their_rows(
        ray_cluster, s3_env, s3_client, cb_tiny_bundle, local_refs, tmp_path):
    bucket = s3_env["bucket"]
    refs = {}
    for name, path in local_refs.items():
        s3_client.put_object(Bucket=bucket, Key=f"refs/{name}.wav", Body=Path(path).read_bytes())
        refs[name] = f"s3://{bucket}/refs/{name}.wav"
    for key, table in (("m/speakers.parquet", pa.table({"speaker_id": list(refs), "audio_uri": list(refs.values())})),
                       ("m/texts.parquet", rows(14, ["alice", "bob", "carol", "broken", None, "alice", "bob"]))):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        s3_client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
    out = f"s3://{bucket}/cb/run"
    summary = run_job(JobArgs(manifest=f"s3://{bucket}/m/texts.parquet", speakers=f"s3://{bucket}/m/speakers.parquet",
                              output=out, config=str(CPU_CONFIG), bundle=str(cb_tiny_bundle),
                              endpoint_url=s3_env["endpoint"]))
    broken = [i for i in range(14) if i % 7 == 3]
    assert (summary.rows, summary.failed) == (14, len(broken)), summary
    # three good references computed once each; every other row with a reference reused one
    with_ref = [i for i in range(14) if i % 7 not in (3, 4)]
    assert summary.computed_once == {"computed": 3, "reused": len(with_ref)}
    body = s3_client.get_object(Bucket=bucket, Key="cb/run/results.parquet")["Body"].read()
    res = results(pq.read_table(io.BytesIO(body)))
    assert sorted(res) == [f"row-{i:02d}" for i in range(14)]
    for i in range(14):
        r = res[f"row-{i:02d}"]
        if i in broken:
            assert r["status"] == "error" and refs["broken"] in r["error"], r["error"]
            continue
        assert r["status"] == "ok", r["error"]
        if i % 7 == 4:
            assert (r["voice"], r["voice_source"]) == ("default", "default")
        else:  # computed before the rows ran, then taken from the cache
            assert len(r["voice"]) == 64 and r["voice_source"] in ("memory", "store")
        assert 0 < len(r["speech_tokens"]) <= 16 and all(0 <= t < 6561 for t in r["speech_tokens"])
        assert all(r[f"time_{s}_s"] >= 0 for s in ("conditioning", "t3", "s3gen_encoder", "cfm", "vocoder"))
        wav = s3_client.get_object(Bucket=bucket, Key=f"cb/run/audio/{r['id']}.wav")["Body"].read()
        audio, sr = sf.read(io.BytesIO(wav))
        assert sr == 24000 and abs(len(audio) / sr - r["duration_s"]) < 1e-3
        assert len(audio) == len(r["speech_tokens"]) * 960  # 25 tokens/s at 24 kHz, one chunk
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="cb/run/_cache/")["Contents"]]
    assert len([k for k in keys if k.endswith(".npz")]) == 3


def test_seeded_rows_reproduce_across_runs_with_other_batch_sizes_and_resume(
        ray_cluster, cb_tiny_bundle, local_refs, tmp_path):
    speakers = speakers_manifest(tmp_path / "speakers.parquet", {k: v for k, v in local_refs.items() if k != "broken"})
    manifest = tmp_path / "texts.parquet"
    table = rows(10, ["alice", "bob", None, "carol"])
    table = table.append_column("temperature", pa.array([0.8] * 10))
    pq.write_table(table, manifest)

    def exact(spec: dict) -> None:
        """fp32 everywhere: the shipped int8 T3 and bf16 CFM/vocoder trade batch-invariance for speed."""
        for stage in spec["stages"]:
            stage["backend"] = {"threads": stage.get("backend", {}).get("threads", 1)}
        spec["stages"][1]["options"]["lm"] = "fp32"

    def small_batches(spec: dict) -> None:
        exact(spec)
        for stage in spec["stages"]:
            stage["pool"]["batch_size"] = 1
        spec["stages"][1]["options"]["max_rows"] = 2
        spec["io"]["rows_per_block"] = 3

    first, second = tmp_path / "first", tmp_path / "second"
    args = dict(manifest=str(manifest), speakers=speakers, bundle=str(cb_tiny_bundle))
    fp32 = config(tmp_path, "fp32", exact)
    assert run_job(JobArgs(output=str(first), config=fp32, **args)).ok == 10
    assert run_job(JobArgs(output=str(second), config=config(tmp_path, "small", small_batches), **args)).ok == 10
    a, b = (results(pq.read_table(d / "results.parquet")) for d in (first, second))
    for key in a:
        assert a[key]["speech_tokens"] == b[key]["speech_tokens"], key
        x, _ = sf.read(first / "audio" / f"{key}.wav", dtype="int16")
        y, _ = sf.read(second / "audio" / f"{key}.wav", dtype="int16")
        assert x.shape == y.shape and np.abs(x.astype(int) - y).max() <= 2, key  # 16-bit rounding of ~1e-5
    # resume: drop some results; the rerun redoes only those, with voices from the store
    kept = pq.read_table(first / "results.parquet")
    pq.write_table(kept.slice(0, 6), first / "results.parquet")
    again = run_job(JobArgs(output=str(first), config=fp32, **args))
    assert (again.ok, again.skipped, again.done_now) == (10, 6, 4)
    assert again.computed_once["computed"] == 0
    redone = results(pq.read_table(first / "results.parquet"))
    assert all(redone[k]["speech_tokens"] == a[k]["speech_tokens"] for k in a)


def test_killed_t3_actor_loses_and_duplicates_nothing(ray_cluster, cb_tiny_bundle, tmp_path):
    from ray.util.state import list_actors

    def small_blocks(spec: dict) -> None:  # rows finish a few at a time, so there is a moment to kill T3
        spec["io"]["rows_per_block"] = 2
        for stage in spec["stages"]:
            stage["pool"]["batch_size"] = 2
        spec["stages"][1]["class"] = "tests.probes.SlowT3"

    n = 24
    manifest = tmp_path / "texts.parquet"
    pq.write_table(rows(n, [None], tokens=40), manifest)
    out = tmp_path / "out"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=run_job(JobArgs(
        manifest=str(manifest), output=str(out), config=config(tmp_path, "kill", small_blocks),
        bundle=str(cb_tiny_bundle)))))
    thread.start()
    # Kill T3 two seconds after its actor is up: each SlowT3 call takes a second and there are twelve, so
    # rows are in flight then, whether or not Ray Data has written any results yet.
    killed, seen, deadline = None, None, time.monotonic() + 180
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True):
            if "Stage_t3" in (actor.class_name or "") and actor.pid:
                seen = seen or time.monotonic()
                if time.monotonic() - seen >= 2.0:
                    os.kill(actor.pid, signal.SIGKILL)
                    parts = list((out / PARTS_DIR).glob("*.parquet")) if (out / PARTS_DIR).exists() else []
                    killed = sum(pq.read_table(p).num_rows for p in parts)
                break
        time.sleep(0.1)
    thread.join(300)
    assert killed is not None and killed < n, "the job finished before the T3 actor could be killed"
    summary = outcome["summary"]
    assert (summary.rows, summary.ok, summary.failed) == (n, n, 0)
    assert sorted(results(pq.read_table(out / "results.parquet"))) == [f"row-{i:02d}" for i in range(n)]
    assert len(list((out / "audio").iterdir())) == n


def test_workers_never_import_torch(ray_cluster, cb_tiny_bundle, local_refs, tmp_path):
    probe = config(tmp_path, "probe", lambda spec: [
        s.update({"class": s["class"].replace("actors.chatterbox.", "tests.probes.TorchFree")}) for s in spec["stages"]])
    manifest = tmp_path / "texts.parquet"
    pq.write_table(rows(4, ["alice", None]), manifest)
    speakers = speakers_manifest(tmp_path / "speakers.parquet", {"alice": local_refs["alice"]})
    code = main(["--manifest", str(manifest), "--speakers", speakers, "--output", str(tmp_path / "out"),
                 "--config", probe, "--bundle", str(cb_tiny_bundle)])
    assert code == 0, pq.read_table(tmp_path / "out" / "results.parquet").column("error").to_pylist()
