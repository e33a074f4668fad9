"""Online TTS on a real Ray Serve instance on loopback: the OpenAI-compatible API over the default voice's
pipeline (configs/vits.yaml) and, for uploaded voices, the tiny Chatterbox bundle (stages scaled from zero)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml
from openai import OpenAI

from tests.test_dsp import speech_like

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = ("The first sentence is short. The second one takes a little longer to say out loud. "
        "Here comes a third sentence, with a clause. A fourth follows it. "
        "The fifth sentence is here too. And the sixth one ends the paragraph.")
QUIET = {"noise_scale": 0.0, "noise_w": 0.0}  # deterministic VITS: streamed and whole files compare equal


def wav_bytes(x: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(ray_cluster, cb_tiny_bundle, tmp_path_factory) -> str:
    """The app on loopback: `vits` (the shipped config) and `cb` (tiny Chatterbox, every stage at
    min_replicas 0 and small CPU fractions so both fit the 2-CPU test cluster); an API key."""
    from ray import serve

    from jobs.serve import APP_NAME, build_app

    spec = yaml.safe_load((REPO / "configs" / "chatterbox-cpu.yaml").read_text())
    spec["defaults"]["serve"] = {"min_replicas": 0, "max_replicas": 1, "max_batch_size": 4,
                                 "max_ongoing_requests": 8}
    for stage in spec["stages"]:
        stage["pool"]["num_cpus"] = 0.05
    cb_config = tmp_path_factory.mktemp("serve-config") / "cb.yaml"
    cb_config.write_text(yaml.safe_dump(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"models": {"vits": {"config": "vits"},
                                "cb": {"config": str(cb_config), "bundle": str(cb_tiny_bundle)}},
                     "store": str(tmp_path_factory.mktemp("serve-store")), "api_keys": [KEY]})
    serve.run(app, name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server, headers=AUTH, timeout=120) as c:
        yield c


def speech(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/audio/speech", json={"model": "vits", "voice": "default", **body})


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def test_health_models_and_auth(server, client):
    health = httpx.get(f"{server}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert health.json()["stages"] == {"vits.vits": "ready"}  # cb's stages start on demand
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {"vits", "cb"}
    assert models["vits"]["stages"] == ["vits"] and models["vits"]["sample_rate"] == 22050
    assert "noise_scale" in models["vits"]["parameters"] and "seed" in models["cb"]["parameters"]
    assert models["cb"]["uploaded_voices"] and not models["vits"]["uploaded_voices"]
    assert client.get("/v1/models/cb").json()["family"] == "chatterbox"
    assert_error(client.get("/v1/models/nope"), 404, "model")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server}/v1/audio/speech", json={"model": "vits", "input": "Hi."}, headers=headers)
        assert assert_error(r, 401)["code"] == "invalid_api_key"
        assert_error(httpx.get(f"{server}/v1/voices", headers=headers), 401)


def test_formats(client):
    by_format = {}
    for fmt in ("wav", "flac", "mp3"):
        r = speech(client, input="Hello world, this is voxray.", response_format=fmt, **QUIET)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}[fmt]
        audio, sr = sf.read(io.BytesIO(r.content), dtype="float32")
        assert sr == 22050 and 1.0 < len(audio) / sr < 4.0, (fmt, len(audio) / sr)
        by_format[fmt] = audio
    np.testing.assert_allclose(by_format["wav"], by_format["flac"], atol=2 / 32768)  # lossless, same samples
    pcm = speech(client, input="Hello world, this is voxray.", response_format="pcm", **QUIET)
    assert pcm.headers["content-type"] == "audio/pcm" and len(pcm.content) % 2 == 0
    assert abs(len(pcm.content) / 2 / 24000 - len(by_format["wav"]) / 22050) < 0.01  # OpenAI's 24 kHz pcm
    slow = speech(client, input="Hello world, this is voxray.", response_format="wav", speed=0.5, **QUIET)
    assert 1.7 < sf.info(io.BytesIO(slow.content)).duration / (len(by_format["wav"]) / 22050) < 2.3


def test_openai_client(server):
    openai = OpenAI(base_url=f"{server}/v1", api_key=KEY)
    whole = openai.audio.speech.create(model="vits", voice="default", input="Hello from the official client.",
                                       response_format="wav", extra_body=QUIET)
    audio, sr = sf.read(io.BytesIO(whole.content), dtype="float32")
    assert sr == 22050 and len(audio) > sr
    with openai.audio.speech.with_streaming_response.create(model="vits", voice="default", input=LONG,
                                                             response_format="wav", extra_body=QUIET) as r:
        streamed = b"".join(r.iter_bytes())
    assert sf.info(io.BytesIO(streamed)).duration > 5
    from openai import BadRequestError, NotFoundError

    with pytest.raises(NotFoundError):
        openai.audio.speech.create(model="nope", voice="default", input="Hi.")
    with pytest.raises(BadRequestError, match="voice"):
        openai.audio.speech.create(model="vits", voice="alloy", input="Hi.")


def test_streaming_sends_the_first_sentence_first(client):
    start = time.perf_counter()
    arrivals, chunks = [], []
    with client.stream("POST", "/v1/audio/speech", json={"model": "vits", "voice": "default", "input": LONG,
                                                          "response_format": "wav", **QUIET}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        for chunk in r.iter_raw():
            arrivals.append(time.perf_counter() - start)
            chunks.append(chunk)
    total = arrivals[-1]
    assert len(chunks) >= 3 and arrivals[0] < 0.6 * total, arrivals  # audio before the rest is synthesized
    streamed, sr = sf.read(io.BytesIO(b"".join(chunks)), dtype="float32")
    whole, _ = sf.read(io.BytesIO(speech(client, input=LONG, response_format="flac", **QUIET).content),
                       dtype="float32")
    assert sr == 22050 and len(streamed) == len(whole)  # the same sentences, pauses and samples
    np.testing.assert_allclose(streamed, whole, atol=2 / 32768)

    events = []
    with client.stream("POST", "/v1/audio/speech", json={"model": "vits", "voice": "default", "input": LONG,
                                                          "response_format": "pcm", "stream_format": "sse", **QUIET}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events[-1:]] == ["speech.audio.done"]
    deltas = [base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 3 and abs(sum(map(len, deltas)) / 2 / 24000 - len(whole) / sr) < 0.05


BAD_BODIES = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "vits"}, 400, "input"),
    ({"model": "vits", "input": 123}, 400, "input"),
    ({"model": "vits", "input": ""}, 400, "input"),
    ({"model": "vits", "input": "   "}, 400, "input"),
    ({"model": "vits", "input": "x" * 4097}, 400, "input"),
    ({"model": "nope", "input": "Hi."}, 404, "model"),
    ({"model": "vits", "input": "Hi.", "voice": "nobody"}, 400, "voice"),
    ({"model": "vits", "input": "Hi.", "voice": 7}, 400, "voice"),
    ({"model": "vits", "input": "Hi.", "response_format": "ogg"}, 400, "response_format"),
    ({"model": "vits", "input": "Hi.", "stream_format": "video"}, 400, "stream_format"),
    ({"model": "vits", "input": "Hi.", "speed": 10}, 400, "speed"),
    ({"model": "vits", "input": "Hi.", "speed": "fast"}, 400, "speed"),
    ({"model": "vits", "input": "Hi.", "noise_scale": 50}, 400, "noise_scale"),
    ({"model": "vits", "input": "Hi.", "noise_scale": "loud"}, 400, "noise_scale"),
    ({"model": "vits", "input": "Hi.", "length_scale": 2, "speed": 2}, 400, "speed"),
    ({"model": "vits", "input": "Hi.", "seed": 3}, 400, "seed"),  # VITS noise is not seedable
    ({"model": "vits", "input": "Hi.", "temperature": 0.5}, 400, "temperature"),
    ({"model": "cb", "input": "Hi.", "speed": 2}, 400, "speed"),
    ({"model": "cb", "input": "Hi.", "max_new_tokens": 2.5}, 400, "max_new_tokens"),
    ({"model": "cb", "input": "Hi.", "seed": -1}, 400, "seed"),
]


@pytest.mark.parametrize("body,status,param", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_speech_requests(client, body, status, param):
    if isinstance(body, bytes):
        r = client.post("/v1/audio/speech", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/audio/speech", json=body)
    assert_error(r, status, param)


def test_bad_routes(client):
    assert_error(client.get("/v1/audio/speech"), 405)
    assert_error(client.get("/v1/nothing"), 404)


def test_uploaded_voices(client, tmp_path):
    listed = client.get("/v1/voices").json()["data"]
    assert {"id": "default", "object": "voice", "name": "default", "model": "vits", "source": "bundle"} in listed
    clip = wav_bytes(speech_like(3.0, 24000, seed=5), 24000)
    r = client.post("/v1/voices", files={"file": ("me.wav", clip, "audio/wav")}, data={"model": "cb"})
    assert r.status_code == 200, r.text
    voice = r.json()
    assert voice["id"] == hashlib.sha256(clip).hexdigest() and voice["name"] == "me.wav"
    assert voice["conditioning"] == "computed"
    again = client.post("/v1/voices", files={"file": ("again.wav", clip, "audio/wav")}).json()  # cb is the default
    assert again["id"] == voice["id"] and again["conditioning"] == "memory"  # conditioned once
    assert voice["id"] in [v["id"] for v in client.get("/v1/voices").json()["data"]]

    r = speech(client, model="cb", voice=voice["id"], input="Hello there.", response_format="wav",
               max_new_tokens=8, seed=1)
    assert r.status_code == 200, r.text
    assert sf.info(io.BytesIO(r.content)).samplerate == 24000
    assert_error(speech(client, model="vits", voice=voice["id"], input="Hi."), 400, "voice")

    assert client.delete(f"/v1/voices/{voice['id']}").json() == {"id": voice["id"], "object": "voice.deleted",
                                                                 "deleted": True}
    assert_error(client.delete(f"/v1/voices/{voice['id']}"), 404)
    assert_error(client.delete("/v1/voices/default"), 400)
    assert_error(speech(client, model="cb", voice=voice["id"], input="Hi."), 400, "voice")


@pytest.mark.parametrize("upload,status", [
    ({"files": {"file": ("x.wav", b"RIFF not really a wav file", "audio/wav")}}, 400),
    ({"files": {"file": ("x.wav", wav_bytes(np.zeros(48000, np.float32), 24000), "audio/wav")}}, 400),  # silent
    ({"files": {"file": ("x.wav", b"", "audio/wav")}}, 400),
    ({"files": {"file": ("x.wav", b"\0" * (21 * 1024 * 1024), "audio/wav")}}, 413),
    ({"files": {"other": ("x.wav", b"abc", "audio/wav")}}, 400),
    ({"json": {"file": "abc"}}, 400),
    ({"files": {"file": ("x.wav", b"abc", "audio/wav")}, "data": {"model": "vits"}}, 400),
    ({"files": {"file": ("x.wav", b"abc", "audio/wav")}, "data": {"model": "nope"}}, 404),
], ids=["corrupt", "silent", "empty", "oversize", "no-file", "not-multipart", "vits", "unknown-model"])
def test_bad_uploads(client, upload, status):
    assert_error(client.post("/v1/voices", **upload), status)


def test_concurrent_clients_are_batched_and_isolated(server, client):
    texts = [f"Request number {i} says hello." for i in range(24)]

    def one(text: str) -> int:
        with httpx.Client(base_url=server, headers=AUTH, timeout=120) as c:
            r = speech(c, input=text, response_format="wav")
            if r.status_code == 200:
                assert sf.info(io.BytesIO(r.content)).duration > 0.5
            return r.status_code

    bad = "\u200b"  # passes the API's checks, but the stage finds nothing to speak: its row alone fails
    with ThreadPoolExecutor(len(texts) + 1) as pool:
        statuses = list(pool.map(one, [*texts[:12], bad, *texts[12:]]))
    assert statuses == [200] * 12 + [400] + [200] * 12
    stats = client.get("/v1/stats").json()["stages"]["vits.vits"]
    assert stats["largest_batch"] > 1, stats


def test_killed_replica_recovers(server, client):
    import ray

    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::voxray#vits.vits#")]
    assert replicas
    statuses: list[int] = []

    def load() -> None:
        for i in range(6):
            statuses.append(speech(client, input=f"Still here, number {i}.", response_format="wav").status_code)

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(0.5)
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    worker.join()
    later = [speech(client, input=f"After the crash, number {i}.", response_format="wav").status_code
             for i in range(4)]
    # the ingress sends a row whose replica died again: even the requests in flight succeed
    assert statuses == [200] * 6 and later == [200] * 4, (statuses, later)
    deadline = time.monotonic() + 60
    while httpx.get(f"{server}/health").status_code != 200:
        assert time.monotonic() < deadline, "health did not come back"
        time.sleep(1)


def test_prometheus_metrics_per_stage(ray_cluster):
    """The stages' own metrics reach the node's Prometheus endpoint (reported every few seconds)."""
    url = f"http://127.0.0.1:{ray_cluster.address_info['metrics_export_port']}/metrics"
    wanted = ("ray_voxray_stage_rows_total", "ray_voxray_stage_batch_size_bucket", "ray_voxray_stage_latency_s_bucket",
              "ray_voxray_api_first_audio_s_bucket")
    deadline = time.monotonic() + 60
    while True:
        lines = httpx.get(url, timeout=10).text.splitlines()
        found = {w: [line for line in lines if line.startswith(w) and 'model="vits"' in line] for w in wanted}
        if all(found.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(found.values()), {w: len(v) for w, v in found.items()}
    assert any('stage="vits"' in line for line in found["ray_voxray_stage_batch_size_bucket"])
