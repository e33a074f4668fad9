"""Load test of the Serve API (a script, not a test): bounded requests and time, loopback only.

    python jobs/loadtest.py --start --config vits --concurrency 1,16,64 --json bench/serve-vits.json
    python jobs/loadtest.py --url http://127.0.0.1:8000 --model vits      # a server already running

At each concurrency level, that many clients send streamed wav requests back to back (the bulk
benchmark's texts: the example manifest, cycled) until `--requests` are done or `--max-seconds` pass,
after `--warmup-seconds` at the same concurrency that are not counted (replicas scale up, caches fill).
Reported per level: requests/s, audio-seconds per wall-second, latency p50/p95/p99, time to first
audio p50/p95 and errors by status; on stdout and, with --json, in a file.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import numpy as np
import pyarrow.parquet as pq

from jobs.bulk_synth import EXAMPLE_MANIFEST

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Level:
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    first_audio: list[float] = field(default_factory=list)
    audio_seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0

    def report(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 4) if values else None

        done = len(self.latencies)
        return {"concurrency": self.concurrency, "requests": done + sum(self.errors.values()), "ok": done,
                "errors": sum(self.errors.values()), "error_kinds": self.errors, "wall_s": round(self.wall, 2),
                "requests_per_s": round(done / self.wall, 2), "audio_s_per_s": round(self.audio_seconds / self.wall, 2),
                "latency_p50_s": pct(self.latencies, 50), "latency_p95_s": pct(self.latencies, 95),
                "latency_p99_s": pct(self.latencies, 99), "first_audio_p50_s": pct(self.first_audio, 50),
                "first_audio_p95_s": pct(self.first_audio, 95)}


def wav_seconds(data: bytes) -> float:
    """Duration of a streamed 16-bit mono wav (44-byte header, sizes unknown)."""
    rate = struct.unpack_from("<I", data, 24)[0]
    return (len(data) - 44) / 2 / rate


async def one(session: aiohttp.ClientSession, url: str, body: dict, level: Level | None) -> None:
    start = time.perf_counter()
    first, parts = None, []
    try:
        async with session.post(f"{url}/v1/audio/speech", json=body) as r:
            async for chunk in r.content.iter_any():
                first = first or time.perf_counter() - start
                parts.append(chunk)
            status = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        status = type(e).__name__
    if level is None:
        return
    if status != 200:
        level.errors[str(status)] = level.errors.get(str(status), 0) + 1
        return
    level.latencies.append(time.perf_counter() - start)
    level.first_audio.append(first)
    level.audio_seconds += wav_seconds(b"".join(parts))


async def run_level(url: str, model: str, texts: list[str], concurrency: int, requests: int, max_seconds: float,
                    warmup_seconds: float, headers: dict[str, str]) -> Level:
    level = Level(concurrency)
    counter = iter(range(10**9))
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def client(until: float, measured: Level | None, budget: int | None) -> None:
            while time.perf_counter() < until:
                i = next(counter)
                if budget is not None and i >= budget:
                    return
                body = {"model": model, "voice": "default", "input": texts[i % len(texts)], "response_format": "wav"}
                await one(session, url, body, measured)

        if warmup_seconds > 0:
            deadline = time.perf_counter() + warmup_seconds
            await asyncio.gather(*(client(deadline, None, None) for _ in range(concurrency)))
        counter = iter(range(10**9))
        start = time.perf_counter()
        await asyncio.gather(*(client(start + max_seconds, level, requests) for _ in range(concurrency)))
        level.wall = time.perf_counter() - start
    return level


def start_server(configs: list[str], port: int) -> str:
    import ray
    from ray import serve

    from jobs.serve import APP_NAME, build_app

    app = build_app({"models": {Path(c).stem: {"config": c} for c in configs}})
    ray.init(logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (loopback only)")
    p.add_argument("--start", action="store_true", help="start the server in this process first (local Ray)")
    p.add_argument("--config", action="append", help="with --start: pipelines to serve (default: vits)")
    p.add_argument("--port", type=int, default=8000, help="with --start: its HTTP port")
    p.add_argument("--model", help="model id to load (default: the first --config, else vits)")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=200, help="counted requests per level at most")
    p.add_argument("--max-seconds", type=float, default=60, help="measured seconds per level at most")
    p.add_argument("--warmup-seconds", type=float, default=10, help="uncounted seconds before each level")
    p.add_argument("--api-key", default=os.environ.get("VOXRAY_API_KEY"))
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    configs = args.config or ["vits"]
    model = args.model or Path(configs[0]).stem
    if urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url {args.url}: loopback only ({', '.join(LOOPBACK)})")
    url = start_server(configs, args.port) if args.start else args.url.rstrip("/")
    texts = pq.read_table(EXAMPLE_MANIFEST).column("text").to_pylist()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    report = {"url": url, "model": model, "cpus": os.cpu_count(), "levels": []}
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        level = asyncio.run(run_level(url, model, texts, concurrency, args.requests, args.max_seconds,
                                      args.warmup_seconds, headers)).report()
        report["levels"].append(level)
        print(f"{concurrency:>4} clients: {level['requests_per_s']:7.2f} req/s  {level['audio_s_per_s']:7.2f} "
              f"audio-s/s  p50 {level['latency_p50_s']} p95 {level['latency_p95_s']} p99 {level['latency_p99_s']} s  "
              f"first audio p50 {level['first_audio_p50_s']} s  errors {level['errors']}", flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any(level["errors"] for level in report["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
