"""Manifests, bundles and outputs on a real S3-compatible server (SeaweedFS on loopback)."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from actors.bundle import load_bundle
from actors.errors import BundleError
from actors.storage import StorageOptions
from jobs.bulk_synth import main
from tests.conftest import REPO


def upload_dir(client, bucket: str, prefix: str, local, manifest_edit=None) -> None:
    for path in sorted(local.iterdir()):
        body = path.read_bytes()
        if path.name == "bundle.json" and manifest_edit:
            body = json.dumps(manifest_edit(json.loads(body))).encode()
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=body)


@pytest.fixture
def s3_bundle(s3_env, s3_client, default_bundle) -> str:
    upload_dir(s3_client, s3_env["bucket"], "bundles/joe", default_bundle)
    return f"s3://{s3_env['bucket']}/bundles/joe"


def test_bundle_downloads_once_into_a_hash_keyed_cache(s3_env, s3_bundle, voxray_cache):
    storage = StorageOptions.from_env(s3_env["endpoint"])
    bundle = load_bundle(s3_bundle, storage)
    assert bundle.path.parent == voxray_cache / "bundles" and bundle.family == "vits"
    assert load_bundle(s3_bundle, storage).path == bundle.path


def test_partial_or_corrupt_s3_bundle_names_the_file(s3_env, s3_client, default_bundle):
    storage = StorageOptions.from_env(s3_env["endpoint"])
    bucket = s3_env["bucket"]
    upload_dir(s3_client, bucket, "bundles/corrupt", default_bundle, lambda m: {**m, "name": "corrupt"})
    s3_client.put_object(Bucket=bucket, Key="bundles/corrupt/voice.json", Body=b"{}")
    with pytest.raises(BundleError, match="voice.json is corrupt"):
        load_bundle(f"s3://{bucket}/bundles/corrupt", storage)
    upload_dir(s3_client, bucket, "bundles/partial", default_bundle, lambda m: {**m, "name": "partial"})
    s3_client.delete_object(Bucket=bucket, Key="bundles/partial/model.onnx")
    with pytest.raises(BundleError, match="missing file model.onnx"):
        load_bundle(f"s3://{bucket}/bundles/partial", storage)
    with pytest.raises(BundleError, match="cannot read bundle.json"):
        load_bundle(f"s3://{bucket}/bundles/none", storage)


def test_wrong_credentials_are_a_clear_manifest_error(s3_env, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    code = main(["--manifest", f"s3://{s3_env['bucket']}/manifests/none.parquet", "--output", str(tmp_path),
                 "--endpoint-url", s3_env["endpoint"]])
    assert code == 2
    assert "text manifest s3://" in capsys.readouterr().err


def test_job_reads_and_writes_s3(ray_cluster, s3_env, s3_client, s3_bundle):
    bucket = s3_env["bucket"]
    table = pa.table({"id": ["s3-a", "s3-b", "s3-bad"],
                      "text": ["Stored on S3.", "Written back to S3 as well.", ""]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3_client.put_object(Bucket=bucket, Key="manifests/m.parquet", Body=buf.getvalue())
    out = f"s3://{bucket}/runs/one"
    code = main(["--manifest", f"s3://{bucket}/manifests/m.parquet", "--output", out,
                 "--bundle", s3_bundle, "--endpoint-url", s3_env["endpoint"], "--config", "test.yaml"])
    assert code == 1  # the empty row fails, the others are written
    body = s3_client.get_object(Bucket=bucket, Key="runs/one/results.parquet")["Body"].read()
    rows = {r["id"]: r for r in pq.read_table(io.BytesIO(body)).to_pylist()}
    assert sorted(rows) == ["s3-a", "s3-b", "s3-bad"]
    assert rows["s3-bad"]["status"] == "error" and rows["s3-bad"]["error"] == "empty text"
    for row_id in ("s3-a", "s3-b"):
        assert rows[row_id]["audio_uri"] == f"{out}/audio/{row_id}.wav"
        wav = s3_client.get_object(Bucket=bucket, Key=f"runs/one/audio/{row_id}.wav")["Body"].read()
        audio, sr = sf.read(io.BytesIO(wav))
        assert sr == 22050 and abs(len(audio) / sr - rows[row_id]["duration_s"]) < 1e-3
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="runs/one/")["Contents"]]
    assert not [k for k in keys if "_results_parts" in k and k.endswith(".parquet")]


def test_two_stage_pipeline_on_ray_with_s3_in_and_out(ray_cluster, s3_env, s3_client, s3_bundle, tmp_path):
    """Front end and graph as separate pools; intermediates go through the object store, not files."""
    bucket = s3_env["bucket"]
    config = tmp_path / "two.yaml"
    config.write_text((REPO / "configs" / "vits-two-stage.yaml").read_text()
                      .replace("num_cpus: 1}", "num_cpus: 0.5}").replace("rows_per_block: 32", "rows_per_block: 2"))
    table = pa.table({"id": ["t-a", "t-b", "t-c", "t-bad"], "group": [1, 1, 2, 2],
                      "text": ["First of four.", "Second, a bit longer than the first.", "Third.", " "]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3_client.put_object(Bucket=bucket, Key="manifests/two.parquet", Body=buf.getvalue())
    out = f"s3://{bucket}/runs/two"
    code = main(["--manifest", f"s3://{bucket}/manifests/two.parquet", "--output", out, "--bundle", s3_bundle,
                 "--endpoint-url", s3_env["endpoint"], "--config", str(config), "--format", "flac"])
    assert code == 1
    body = s3_client.get_object(Bucket=bucket, Key="runs/two/results.parquet")["Body"].read()
    rows = {r["id"]: r for r in pq.read_table(io.BytesIO(body)).to_pylist()}
    assert sorted(rows) == ["t-a", "t-b", "t-bad", "t-c"]
    assert rows["t-bad"]["status"] == "error" and rows["t-bad"]["error"] == "empty text"
    assert [rows[i]["group"] for i in ("t-a", "t-c")] == [1, 2]
    for row_id in ("t-a", "t-b", "t-c"):
        row = rows[row_id]
        assert row["status"] == "ok" and row["time_phonemize_s"] > 0 and row["time_vits_s"] > 0
        data = s3_client.get_object(Bucket=bucket, Key=f"runs/two/audio/{row_id}.flac")["Body"].read()
        audio, sr = sf.read(io.BytesIO(data))
        assert sr == 22050 and abs(len(audio) / sr - row["duration_s"]) < 1e-3
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="runs/two/")["Contents"]]
    assert "runs/two/_voxray.lock" not in keys
    assert not [k for k in keys if "_results_parts/" in k and k.endswith(".parquet")]


def test_s3_output_lock_refuses_a_live_holder_and_takes_over_a_dead_one(ray_cluster, s3_env, s3_client, tmp_path,
                                                                       capsys):
    import json
    import os
    import time

    bucket = s3_env["bucket"]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["l-a"], "text": ["Locked out."]}), manifest)
    args = ["--manifest", str(manifest), "--output", f"s3://{bucket}/runs/locked", "--config", "test.yaml",
            "--endpoint-url", s3_env["endpoint"]]
    live = {"run_id": "live-run", "host": os.uname().nodename, "pid": os.getpid(), "heartbeat": time.time()}
    s3_client.put_object(Bucket=bucket, Key="runs/locked/_voxray.lock", Body=json.dumps(live).encode())
    assert main(args) == 2
    assert "is in use by run live-run" in capsys.readouterr().err
    dead = {**live, "run_id": "dead-run", "host": "another-host", "heartbeat": time.time() - 3600}
    s3_client.put_object(Bucket=bucket, Key="runs/locked/_voxray.lock", Body=json.dumps(dead).encode())
    assert main(args) == 0
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="runs/locked/")["Contents"]]
    assert "runs/locked/_voxray.lock" not in keys and "runs/locked/audio/l-a.wav" in keys
