"""Manifests, bundles and outputs on a real S3-compatible server (SeaweedFS on loopback)."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from actors.bundle import BundleError, load_bundle
from actors.storage import StorageOptions
from jobs.bulk_synth import main


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
