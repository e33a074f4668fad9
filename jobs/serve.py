"""Online TTS on Ray Serve: each pipeline's stages as deployments behind an OpenAI-compatible API.

    python -m jobs.serve [--config vits] [--config chatterbox-cpu --bundle chatterbox-cpu=DIR] [--port 8000]
    serve run configs/serve.yaml          # or serve deploy: `build_app` with the models in `args`

Each served model (its id is the pipeline config's name) is its pipeline YAML, unchanged: one
`StageDeployment` per stage builds the stage with `build_stage`; the stage's `serve` block gives its
dynamic batching (`@serve.batch` max_batch_size, batch_wait_timeout_s), max_ongoing_requests and
autoscaling (min/max replicas, target ongoing requests), its `pool` the replica's CPUs and GPUs.

`Api`, the FastAPI ingress, cuts a request's input into sentence chunks and sends each chunk as one row
through the model's stage deployments in order (DeploymentHandles; intermediate columns go from replica
to replica through the object store). At every stage, rows of concurrent requests are batched into one
stage call; the stage contract fails a bad row alone, so a bad request never fails the others.

Every configured model's deployments are created when the application starts. A stage with
`serve.min_replicas: 0` has no replica until its first request (Serve autoscaling from zero): lazy
loading for rarely used models, at the price of a slow first request.
"""
# No `from __future__ import annotations`: FastAPI must see the routes' `Request` annotations as classes
# once Serve has rewritten the methods' signatures.
import argparse
import asyncio
import base64
import email.parser
import email.policy
import hashlib
import hmac
import json
import logging
import os
import struct
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import numpy as np
import pyarrow.fs as pafs
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import metrics
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from actors.audio import encode_audio
from actors.bundle import Bundle, cache_root, load_bundle
from actors.chatterbox.voice import DEFAULT_VOICE_ASSET
from actors.dsp import resample
from actors.errors import VoxrayError
from actors.rows import OK, Batch, batch_len
from actors.stage import Column
from actors.storage import StorageOptions, is_s3, join, write_atomic
from actors.text import normalize_text, split_sentences
from actors.vits.voice import Voice as PiperVoice
from jobs.config import DEFAULT_CONFIG, PipelineSpec, StageSpec, load_pipeline
from jobs.pipeline import build_stage

log = logging.getLogger(__name__)

APP_NAME = "voxray"
MAX_INPUT_CHARS = 4096        # OpenAI's limit for `input`
MAX_SENTENCE_CHARS = 400      # a chunk longer than this is cut at clauses, then words (split_sentences)
CHUNK_GAP_S = 0.2             # pause between chunks: the sentence pause both families use by default
STREAM_LOOKAHEAD = 2          # chunks in flight while streaming, once the first (sent alone) is done
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
PCM_RATE = 24000              # OpenAI's `pcm`: 24 kHz, 16-bit signed little-endian, mono
STAGE_ATTEMPTS = 3            # a row whose replica died is sent again (synthesis has no side effects)
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "pcm": "audio/pcm"}
STREAMED = ("wav", "pcm")     # chunk by chunk; flac and mp3 are encoded whole, then sent
# Parameters the API itself maps onto columns; the pipeline's other numeric inputs are generation parameters.
MAPPED_COLUMNS = ("id", "text", "speaker_id", "reference_audio")
REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)


# ---------------------------------------------------------------- stage deployments

def to_columns(rows: list[dict[str, Any]]) -> Batch:
    """Rows of concurrent requests → one batch of equal-length numpy columns (missing values are None)."""
    batch: Batch = {}
    for name in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(name) for row in rows]
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
            batch[name] = np.array(values)
            continue
        column = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):  # item by item: numpy would stack equal-length arrays into 2-D
            column[i] = v
        batch[name] = column
    return batch


def to_rows(batch: Batch) -> list[dict[str, Any]]:
    return [{k: v[i] for k, v in batch.items()} for i in range(batch_len(batch))]


BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


@serve.deployment
class StageDeployment:
    """One pipeline stage as a Serve deployment: the rows of concurrent requests go through one stage call."""

    def __init__(self, model: str, spec: StageSpec, bundle: str, storage: StorageOptions, cache: str) -> None:
        self.stage = build_stage(spec, bundle, storage, cache)
        # Batching from the stage's serve block; batches run at once only where its pool runs concurrent
        # calls (pool.max_concurrency: e.g. T3, whose calls share one decode loop).
        self._batched = serve.batch(max_batch_size=spec.serve.max_batch_size,
                                    batch_wait_timeout_s=spec.serve.batch_wait_timeout_s,
                                    max_concurrent_batches=spec.pool.max_concurrency)(self._run_batch)
        tag_keys = ("model", "stage")
        self.rows_metric = metrics.Counter("voxray_stage_rows", "rows through the stage", tag_keys)
        self.failed_metric = metrics.Counter("voxray_stage_failed_rows", "rows the stage returned failed", tag_keys)
        self.batch_metric = metrics.Histogram("voxray_stage_batch_size", "rows per stage call", BATCH_BOUNDARIES,
                                              tag_keys)
        self.latency_metric = metrics.Histogram("voxray_stage_latency_s", "seconds per stage call",
                                                LATENCY_BOUNDARIES, tag_keys)
        for metric in (self.rows_metric, self.failed_metric, self.batch_metric, self.latency_metric):
            metric.set_default_tags({"model": model, "stage": spec.name})
        self.batches = self.rows = self.largest_batch = 0

    async def run(self, row: dict[str, Any]) -> dict[str, Any]:
        """One row through the stage, in a batch with the rows of other requests."""
        return await self._batched(row)

    async def _run_batch(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        # in a thread: the replica keeps accepting rows (the next batch forms) while this one computes
        out = await asyncio.to_thread(self.stage, to_columns(rows))
        self.batches += 1
        self.rows += len(rows)
        self.largest_batch = max(self.largest_batch, len(rows))
        self.rows_metric.inc(len(rows))
        failed = int(sum(s != OK for s in out["status"]))
        if failed:  # a counter takes only positive increments
            self.failed_metric.inc(failed)
        self.batch_metric.observe(len(rows))
        self.latency_metric.observe(time.perf_counter() - start)
        return to_rows(out)

    def stats(self) -> dict[str, Any]:
        return {"replica": serve.get_replica_context().replica_id.unique_id, "batches": self.batches,
                "rows": self.rows, "largest_batch": self.largest_batch}

    def ready(self) -> bool:
        return True


def stage_deployment(model: str, pipeline: PipelineSpec, spec: StageSpec, storage: StorageOptions, cache: str):
    """The bound deployment of one stage, sized by the stage's serve and pool blocks."""
    s = spec.serve
    return StageDeployment.options(
        name=f"{model}.{spec.name}",
        max_ongoing_requests=s.max_ongoing_requests,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests,
                            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s},
        ray_actor_options={"num_cpus": spec.pool.num_cpus, "num_gpus": spec.pool.num_gpus},
    ).bind(model, spec, pipeline.bundle, storage, cache)


# ---------------------------------------------------------------- what the ingress knows of a model

@dataclass(frozen=True)
class Model:
    """A served pipeline as the API sees it (described on the driver when the application is built)."""

    id: str
    pipeline: PipelineSpec
    sample_rate: int
    voices: tuple[str, ...]
    """The bundle's own voices: "default" (when it has one) and a multi-speaker Piper voice's speakers."""
    params: dict[str, Column]
    """Generation parameters a request may give: the pipeline's numeric input columns."""
    default_length_scale: float | None
    """What `speed` 1 means for a pipeline with a length_scale input (None: it takes no speed)."""
    conditioning: int | None
    """Index of the stage that turns `reference_audio` into a voice (None: no uploaded voices)."""

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": 0, "owned_by": "voxray",
                "family": self.pipeline.family, "sample_rate": self.sample_rate,
                "stages": [s.name for s in self.pipeline.stages], "voices": list(self.voices),
                "uploaded_voices": self.conditioning is not None,
                "parameters": {k: c.range_text() or c.kind for k, c in self.params.items()}}


def bundle_voices(bundle: Bundle) -> tuple[str, ...]:
    if bundle.family == "vits":
        return ("default", *sorted(PiperVoice.of(bundle).speakers))
    return ("default",) if DEFAULT_VOICE_ASSET in bundle.manifest.get("assets", {}) else ()


def describe_model(model_id: str, pipeline: PipelineSpec, storage: StorageOptions) -> Model:
    bundle = load_bundle(pipeline.bundle, storage)
    inputs = pipeline.input_columns()
    pipeline.check_chain(inputs)
    params = {k: c for k, c in inputs.items() if c.kind in ("float", "int") and k not in MAPPED_COLUMNS}
    conditioning = next((i for i, cls in enumerate(pipeline.stage_classes()) if "reference_audio" in cls.requires),
                        None)
    return Model(model_id, pipeline, bundle.sample_rate, bundle_voices(bundle), params,
                 float(bundle.generation.get("length_scale", 1.0)) if "length_scale" in params else None,
                 conditioning)


# ---------------------------------------------------------------- errors, requests, audio

class ApiError(Exception):
    """A request the API refuses: an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, kind=self.kind)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class SpeechRequest(BaseModel):
    """OpenAI's `POST /v1/audio/speech` body; other keys are the model's generation parameters."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: str = "default"
    response_format: Literal["wav", "flac", "mp3", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def speech_request(data: dict[str, Any]) -> SpeechRequest:
    try:
        return SpeechRequest.model_validate(data)
    except ValidationError as e:
        problem = e.errors()[0]
        param = ".".join(str(p) for p in problem["loc"]) or None
        code = "missing_parameter" if problem["type"] == "missing" else "invalid_parameter"
        raise ApiError(400, f"{param}: {problem['msg']}", param=param, code=code) from None


def speech_chunks(text: str) -> list[str]:
    """Normalized text → sentences, each one row; a piece with nothing to say (e.g. "...") joins the previous."""
    chunks: list[str] = []
    for sentence in split_sentences(text, MAX_SENTENCE_CHARS):
        if chunks and not any(ch.isalnum() for ch in sentence):
            chunks[-1] = f"{chunks[-1]} {sentence}"
        else:
            chunks.append(sentence)
    return chunks


def pcm16(audio: np.ndarray) -> bytes:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()  # as libsndfile's PCM_16


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header of unknown length (sizes 0xFFFFFFFF, as streaming encoders write them)."""
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


def chunk_bytes(fmt: str, audio: np.ndarray, sample_rate: int, first: bool) -> bytes:
    """One chunk of a wav or pcm stream; chunks concatenate into one file."""
    if fmt == "pcm":
        return pcm16(resample(audio, sample_rate, PCM_RATE) if sample_rate != PCM_RATE else audio)
    return (streaming_wav_header(sample_rate) if first else b"") + pcm16(audio)


def sse_event(data: bytes) -> bytes:
    return b"data: " + json.dumps({"type": "speech.audio.delta",
                                   "audio": base64.b64encode(data).decode()}).encode() + b"\n\n"


def sse_done() -> bytes:
    return b'data: {"type": "speech.audio.done"}\n\n'


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None if it is over `limit` bytes; the rest is read and dropped (memory stays
    bounded, and the client gets its answer instead of a connection closed mid-upload)."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            parts.append(chunk)
    return b"".join(parts) if size <= limit else None


def multipart_fields(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body's fields: name → (file name, bytes). The stdlib parser: no extra dependency."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ApiError(400, "expected a multipart/form-data body with a `file` field", param="file",
                       code="invalid_multipart")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


class VoiceStore:
    """Uploaded reference clips by the sha256 of their bytes, `<store>/voices/<id>.audio` and `.json`, beside
    the stages' cache `<store>/cache`, where the conditioning stage keeps the voices it computed."""

    def __init__(self, store: str, storage: StorageOptions) -> None:
        self.root, self.cache, self.storage = join(store, "voices"), join(store, "cache"), storage
        self.fs, self.path = storage.resolve(self.root)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(self.path, recursive=True)

    def clip(self, voice_id: str) -> str:
        return join(self.root, f"{voice_id}.audio")

    def put_clip(self, voice_id: str, data: bytes) -> None:
        write_atomic(self.fs, f"{self.path}/{voice_id}.audio", data)

    def put_info(self, info: dict[str, Any]) -> None:
        write_atomic(self.fs, f"{self.path}/{info['id']}.json", json.dumps(info).encode())

    def get(self, voice_id: str) -> dict[str, Any] | None:
        if len(voice_id) != 64 or any(c not in "0123456789abcdef" for c in voice_id):
            return None
        try:
            with self.fs.open_input_stream(f"{self.path}/{voice_id}.json") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None

    def list(self) -> list[dict[str, Any]]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        found = (self.get(i.base_name[:-5]) for i in infos if i.base_name.endswith(".json"))
        return sorted((v for v in found if v), key=lambda v: v["created_at"])

    def delete(self, voice_id: str) -> None:
        """The clip, its record and its stored conditionings (`<cache>/voices/<fingerprint>/<id>.npz`)."""
        for name in (f"{voice_id}.json", f"{voice_id}.audio"):
            try:
                self.fs.delete_file(f"{self.path}/{name}")
            except FileNotFoundError:
                pass
        fs, path = self.storage.resolve(join(self.cache, "voices"))
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True)):
            if info.base_name == f"{voice_id}.npz":
                fs.delete_file(info.path)


# ---------------------------------------------------------------- the ingress

api = FastAPI(title="voxray", description="OpenAI-compatible text-to-speech on Ray Serve")


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return e.response()


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    problem = e.errors()[0]
    param = ".".join(str(p) for p in problem["loc"][1:]) or None
    return error_response(400, f"{param}: {problem['msg']}", param=param, code="invalid_parameter")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
    return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)


@api.exception_handler(Exception)
async def _server_error(request: Request, e: Exception) -> JSONResponse:  # a bug, never a bad request
    log.exception("internal error")
    return error_response(500, f"internal error ({type(e).__name__})", kind="server_error")


@serve.deployment(name="api")
@serve.ingress(api)
class Api:
    """The OpenAI-compatible HTTP API; each model's stage deployments chained through their handles."""

    def __init__(self, models: dict[str, Model], stages: dict[str, list[DeploymentHandle]], store: str,
                 storage: StorageOptions, api_keys: list[str]) -> None:
        self.models, self.stages = models, stages
        self.voices = VoiceStore(store, storage)
        self.api_keys = [k.encode() for k in api_keys]
        self.first_audio_metric = metrics.Histogram("voxray_api_first_audio_s", "seconds to the first audio bytes",
                                                    LATENCY_BOUNDARIES, ("model",))

    # -------------------------------------------------------- helpers

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k)
                                                 for k in self.api_keys):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")

    def _model(self, model_id: str) -> Model:
        model = self.models.get(model_id)
        if model is None:
            raise ApiError(404, f"model {model_id!r} does not exist (served: {sorted(self.models)})", param="model",
                           code="model_not_found")
        return model

    def _voice_columns(self, model: Model, voice: str) -> dict[str, Any]:
        if voice in model.voices:
            return {"speaker_id": voice} if voice != "default" else {}
        if self.voices.get(voice) is not None:
            if model.conditioning is None:
                raise ApiError(400, f"model {model.id!r} does not take uploaded voices", param="voice",
                               code="voice_not_supported")
            return {"reference_audio": self.voices.clip(voice)}
        raise ApiError(400, f"voice {voice!r} does not exist for model {model.id!r} (bundle voices: "
                            f"{list(model.voices)}; uploaded voices: GET /v1/voices)", param="voice",
                       code="voice_not_found")

    def _params(self, model: Model, req: SpeechRequest) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, v in (req.model_extra or {}).items():
            column = model.params.get(name)
            if column is None:
                raise ApiError(400, f"unknown parameter {name!r} for model {model.id!r} (its parameters: "
                                    f"{sorted(model.params)})", param=name, code="unknown_parameter")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (column.kind == "int" and v != int(v)):
                raise ApiError(400, f"{name} must be {'an integer' if column.kind == 'int' else 'a number'}",
                               param=name, code="invalid_parameter")
            try:
                params[name] = column.check(name, v)
            except ValueError as e:
                raise ApiError(400, str(e), param=name, code="invalid_parameter") from None
        if req.speed != 1.0:
            if model.default_length_scale is None:
                raise ApiError(400, f"model {model.id!r} does not take `speed`", param="speed",
                               code="invalid_parameter")
            if "length_scale" in params:
                raise ApiError(400, "give `speed` or `length_scale`, not both", param="speed",
                               code="invalid_parameter")
            params["length_scale"] = model.default_length_scale / req.speed
        return params

    async def _run(self, model: Model, row: dict[str, Any], first_stage: int = 0,
                   last_stage: int | None = None) -> dict[str, Any]:
        """One row through stages [first_stage, last_stage] of `model`; the row as the last one returned it."""
        handles = self.stages[model.id][first_stage:None if last_stage is None else last_stage + 1]
        for attempt in range(1, STAGE_ATTEMPTS + 1):
            try:
                response = handles[0].run.remote(row)
                for handle in handles[1:]:  # the response, not its value: the next replica fetches it directly
                    response = handle.run.remote(response)
                return await response
            except REPLICA_LOST as e:  # a replica died; Serve replaces it, a live one takes the row again
                log.warning("model %s: %s (attempt %d of %d)", model.id, e, attempt, STAGE_ATTEMPTS)
                if attempt == STAGE_ATTEMPTS:
                    raise ApiError(503, f"model {model.id!r} is unavailable right now; retry", kind="server_error",
                                   code="model_unavailable") from None
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    async def _audio(self, model: Model, row: dict[str, Any]) -> tuple[np.ndarray, int]:
        out = await self._run(model, row)
        if out["status"] != OK:
            raise ApiError(400, f"cannot synthesize {row['text']!r}: {out['error']}", param="input",
                           code="synthesis_failed")
        return np.asarray(out["audio"], dtype=np.float32), int(out["sample_rate"])

    async def _in_order(self, model: Model, rows: list[dict[str, Any]]) -> AsyncIterator[tuple[np.ndarray, int]]:
        """The chunks' audio in order: the first chunk alone (the quickest first audio), then a few ahead."""
        pending = deque([asyncio.ensure_future(self._audio(model, rows[0]))])
        following = iter(rows[1:])
        try:
            while pending:
                result = await pending.popleft()
                for row in following:
                    pending.append(asyncio.ensure_future(self._audio(model, row)))
                    if len(pending) >= STREAM_LOOKAHEAD:
                        break
                yield result
        finally:
            for task in pending:
                task.cancel()

    # -------------------------------------------------------- routes

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 when every stage that keeps replicas answers; stages scaled to zero start on demand."""
        names, checks = [], []
        for model in self.models.values():
            for spec, handle in zip(model.pipeline.stages, self.stages[model.id]):
                if spec.serve.min_replicas > 0:
                    names.append(f"{model.id}.{spec.name}")
                    checks.append(asyncio.wait_for(handle.ready.remote(), timeout=10))
        results = await asyncio.gather(*checks, return_exceptions=True)
        stages = {n: "ready" if r is True else f"unavailable ({type(r).__name__})" for n, r in zip(names, results)}
        ready = all(r is True for r in results)
        return JSONResponse({"status": "ok" if ready else "unavailable", "stages": stages}, 200 if ready else 503)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [m.info() for m in self.models.values()]}

    @api.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return self._model(model_id).info()

    @api.post("/v1/audio/speech")
    async def speech(self, request: Request) -> Response:
        self._authorize(request)
        req = speech_request(parse_json(await request.body()))
        model = self._model(req.model)
        voice = self._voice_columns(model, req.voice)
        params = self._params(model, req)
        chunks = speech_chunks(normalize_text(req.input))
        if not chunks:
            raise ApiError(400, "input has nothing to speak", param="input", code="invalid_parameter")
        request_id = uuid.uuid4().hex
        seed = params.pop("seed", None)
        rows = [{"id": f"{request_id}/{k}", "text": chunk, **voice, **params, "status": OK, "error": "",
                 # chunk k draws from seed + k: reproducible, and no two chunks share their noise
                 **({} if seed is None else {"seed": (seed + k) % 2**53})}
                for k, chunk in enumerate(chunks)]
        start = time.perf_counter()
        fmt = req.response_format
        if fmt not in STREAMED:
            audio, rate = await self._joined(model, rows)
            data = encode_audio(audio, rate, fmt)
            self.first_audio_metric.observe(time.perf_counter() - start, {"model": model.id})
            if req.stream_format == "sse":
                return StreamingResponse(iter([sse_event(data), sse_done()]), media_type="text/event-stream")
            return Response(data, media_type=MEDIA_TYPES[fmt])
        parts = self._in_order(model, rows)
        first = await anext(parts)  # a first chunk that fails is still a 400: no byte has been sent
        self.first_audio_metric.observe(time.perf_counter() - start, {"model": model.id})
        if req.stream_format == "sse":
            return StreamingResponse(self._sse(fmt, first, parts), media_type="text/event-stream")
        return StreamingResponse(self._chunks(fmt, first, parts), media_type=MEDIA_TYPES[fmt])

    async def _joined(self, model: Model, rows: list[dict[str, Any]]) -> tuple[np.ndarray, int]:
        """Every chunk at once (they batch with each other and with other requests), joined with pauses."""
        results = await asyncio.gather(*(self._audio(model, row) for row in rows))
        rate = results[0][1]
        gap = np.zeros(int(CHUNK_GAP_S * rate), dtype=np.float32)
        return np.concatenate([x for audio, _ in results for x in (gap, audio)][1:]), rate

    async def _chunks(self, fmt: str, first: tuple[np.ndarray, int],
                      rest: AsyncIterator[tuple[np.ndarray, int]]) -> AsyncIterator[bytes]:
        audio, rate = first
        yield chunk_bytes(fmt, audio, rate, first=True)
        gap = np.zeros(int(CHUNK_GAP_S * rate), dtype=np.float32)
        async for audio, rate in rest:  # a later chunk that fails ends the stream early (the client sees it cut)
            yield chunk_bytes(fmt, np.concatenate([gap, audio]), rate, first=False)

    async def _sse(self, fmt: str, first: tuple[np.ndarray, int],
                   rest: AsyncIterator[tuple[np.ndarray, int]]) -> AsyncIterator[bytes]:
        try:
            async for data in self._chunks(fmt, first, rest):
                yield sse_event(data)
        except ApiError as e:
            yield b"data: " + json.dumps({"type": "error", "error": {
                "message": e.message, "type": e.kind, "param": e.param, "code": e.code}}).encode() + b"\n\n"
            return
        yield sse_done()

    @api.post("/v1/voices")
    async def upload_voice(self, request: Request) -> dict[str, Any]:
        """A reference clip (multipart `file`; optional `name`, `model`) → a voice id (the sha256 of its bytes)."""
        self._authorize(request)
        body = await read_limited(request, MAX_UPLOAD_BYTES + 64 * 1024)  # the file plus its form framing
        if body is None:
            raise ApiError(413, f"upload over {MAX_UPLOAD_BYTES} bytes", param="file", code="file_too_large")
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, "expected a multipart/form-data body with a `file` field", param="file",
                           code="invalid_multipart")
        fields = multipart_fields(content_type, body)
        if "file" not in fields:
            raise ApiError(400, "no `file` field in the upload", param="file", code="missing_parameter")
        filename, data = fields["file"]
        if not data:
            raise ApiError(400, "the uploaded file is empty", param="file", code="invalid_reference_audio")
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"upload over {MAX_UPLOAD_BYTES} bytes", param="file", code="file_too_large")
        name = fields.get("name", (None, (filename or "").encode()))[1].decode(errors="replace")
        model = self._reference_model(fields.get("model", (None, b""))[1].decode(errors="replace"))
        voice_id = hashlib.sha256(data).hexdigest()
        known = self.voices.get(voice_id)
        self.voices.put_clip(voice_id, data)
        # conditioning once, now: the stage stores the voice under <store>/cache, speech requests reuse it
        out = await self._run(model, {"id": f"voice/{voice_id}", "reference_audio": self.voices.clip(voice_id),
                                      "status": OK, "error": ""}, model.conditioning, model.conditioning)
        if out["status"] != OK:
            if known is None:
                self.voices.delete(voice_id)
            raise ApiError(400, f"the reference clip cannot be used: {out['error']}", param="file",
                           code="invalid_reference_audio")
        info = known or {"id": voice_id, "object": "voice", "name": name, "model": model.id,
                         "created_at": int(time.time()), "source": "upload"}
        self.voices.put_info(info)
        return {**info, "conditioning": str(out["voice_source"])}

    def _reference_model(self, model_id: str) -> Model:
        if model_id:
            model = self._model(model_id)
            if model.conditioning is None:
                raise ApiError(400, f"model {model_id!r} does not take uploaded voices", param="model",
                               code="voice_not_supported")
            return model
        for model in self.models.values():
            if model.conditioning is not None:
                return model
        raise ApiError(400, "no served model takes uploaded voices", param="model", code="voice_not_supported")

    @api.get("/v1/voices")
    async def list_voices(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        bundle = [{"id": v, "object": "voice", "name": v, "model": m.id, "source": "bundle"}
                  for m in self.models.values() for v in m.voices]
        return {"object": "list", "data": bundle + self.voices.list()}

    @api.delete("/v1/voices/{voice_id}")
    async def delete_voice(self, voice_id: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        if self.voices.get(voice_id) is None:
            if any(voice_id in m.voices for m in self.models.values()):
                raise ApiError(400, f"voice {voice_id!r} is part of a bundle and cannot be deleted", param="voice_id",
                               code="voice_not_deletable")
            raise ApiError(404, f"voice {voice_id!r} does not exist", param="voice_id", code="voice_not_found")
        self.voices.delete(voice_id)
        return {"id": voice_id, "object": "voice.deleted", "deleted": True}

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Per stage deployment, the replicas that answered: batches, rows and the largest batch formed."""
        self._authorize(request)
        out: dict[str, Any] = {}
        for model in self.models.values():
            for spec, handle in zip(model.pipeline.stages, self.stages[model.id]):
                if spec.serve.min_replicas == 0:
                    continue  # asking would start a replica
                # several asks reach several replicas (Serve routes each to a less busy one)
                answers = await asyncio.gather(*(handle.stats.remote() for _ in range(4 * spec.serve.max_replicas)),
                                               return_exceptions=True)
                replicas = {a["replica"]: a for a in answers if isinstance(a, dict)}
                out[f"{model.id}.{spec.name}"] = {
                    "replicas": list(replicas.values()),
                    "largest_batch": max((a["largest_batch"] for a in replicas.values()), default=0)}
        return {"object": "stats", "stages": out}


# ---------------------------------------------------------------- the application

class ModelArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str
    """A pipeline: a name under configs/ or a path."""
    bundle: str | None = None
    """Overrides the pipeline's bundle (required when it names none)."""


class AppArgs(BaseModel):
    """`build_app`'s arguments (`args:` in configs/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelArgs] = Field(min_length=1)
    """Model id (the API's `model`) → its pipeline."""
    store: str | None = None
    """Where uploaded voices and stage caches (voice conditionings) live: a folder every replica can
    read, or s3://; default $VOXRAY_CACHE/serve."""
    api_keys: list[str] = []
    """Accepted bearer keys, with those in $VOXRAY_API_KEYS (comma-separated); none: no authentication."""
    ingress_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(512, ge=1)
    """HTTP requests the ingress holds at once (streams included); above it Serve queues them."""


def build_app(args: dict[str, Any]) -> serve.Application:
    """The voxray application: every model's stage deployments and the ingress (Serve's app builder)."""
    try:
        a = AppArgs.model_validate(args)
    except ValidationError as e:
        raise VoxrayError(f"serve arguments: {e}") from None
    storage = StorageOptions.from_env()
    store = a.store or str(cache_root() / "serve")
    if not is_s3(store):  # replicas resolve paths in their own working directories
        store = os.path.abspath(os.path.expanduser(store))
    cache = VoiceStore(store, storage).cache
    models, stages = {}, {}
    for model_id, m in a.models.items():
        pipeline = load_pipeline(m.config).with_overrides(bundle=m.bundle)
        models[model_id] = describe_model(model_id, pipeline, storage)
        stages[model_id] = [stage_deployment(model_id, pipeline, spec, storage, cache) for spec in pipeline.stages]
    keys = [*a.api_keys, *(k.strip() for k in os.environ.get("VOXRAY_API_KEYS", "").split(",") if k.strip())]
    return Api.options(max_ongoing_requests=a.max_ongoing_requests,
                       ray_actor_options={"num_cpus": a.ingress_cpus}).bind(models, stages, store, storage, keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve pipelines behind an OpenAI-compatible TTS API on Ray Serve.")
    p.add_argument("--config", action="append", help=f"a pipeline name or path, repeatable; its name is the "
                                                     f"model id (default: {DEFAULT_CONFIG})")
    p.add_argument("--bundle", action="append", default=[], metavar="[MODEL=]URI",
                   help="a model's bundle (dir or s3:// prefix); MODEL= may be left out with one --config")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", help="uploaded voices and stage caches (default: $VOXRAY_CACHE/serve)")
    p.add_argument("--api-key", action="append", default=[], help="accepted bearer key, repeatable "
                                                                   "(also $VOXRAY_API_KEYS)")
    args = p.parse_args(argv)
    models = {Path(c).stem: {"config": c} for c in args.config or [DEFAULT_CONFIG]}
    for item in args.bundle:
        model, sep, uri = item.partition("=")
        if not sep and len(models) == 1:
            model, uri = next(iter(models)), item
        if model not in models:
            p.error(f"--bundle {item}: no --config named {model!r} (models: {sorted(models)})")
        models[model]["bundle"] = uri
    try:
        app = build_app({"models": models, "store": args.store, "api_keys": args.api_key})
    except VoxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"voxray: models {sorted(models)} on http://{args.host}:{args.port}/v1/audio/speech", file=sys.stderr)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
