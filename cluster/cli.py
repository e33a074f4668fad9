"""`python -m cluster`: one command line for operating voxray on a Ray cluster.

    python -m cluster up [--config cluster/aws.yaml] [--dry-run]       # ray up
    python -m cluster down [--config cluster/aws.yaml] [--dry-run]     # ray down
    python -m cluster submit --address http://HEAD:8265 bulk -- --manifest s3://b/m.parquet --output s3://b/run1
    python -m cluster status --address http://HEAD:8265               # nodes, stage pools, pending resources
    python -m cluster logs JOB_ID --address http://HEAD:8265
    python -m cluster summary s3://b/run1 --node-price 0.68 --nodes 4  # ok/failed, errors, audio hours, cost
    python -m cluster retry-failed s3://b/run1 --manifest s3://b/m.parquet --address http://HEAD:8265

Plain text by default, `--json` for machines. Ray >= 2.59 clusters use token auth: set
RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actors.rows import OK
from actors.storage import StorageOptions, join, write_atomic
from jobs.store import RESULTS_FILE

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLUSTER = REPO / "cluster" / "aws.yaml"
ENTRY_POINTS = {"bulk": "jobs/bulk_synth.py", "audiobook": "jobs/audiobook.py"}
NODE_PRICE = 0.68
"""Default $ per node-hour: a c6i.4xlarge on demand in us-west-2 (spot is about a third)."""
STAGE_ACTOR = re.compile(r"Stage_(\w+)\)")
"""Stage actors are named MapWorker(MapBatches(Stage_<name>)) (jobs/pipeline.py::add_stages)."""
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def ray_command(action: str, config: str, yes: bool) -> list[str]:
    return ["ray", action, config, *(["-y"] if yes else [])]


def job_entrypoint(kind: str, job_args: list[str]) -> str:
    return shlex.join(["python", ENTRY_POINTS[kind], *job_args])


def submit(address: str, kind: str, job_args: list[str], env: dict[str, str]) -> str:
    """Submit a bulk or audiobook job with this checkout as its working dir; returns the job id."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    return client.submit_job(entrypoint=job_entrypoint(kind, job_args), runtime_env={
        "working_dir": str(REPO), "excludes": [".git/", "out/", "bench/"], "env_vars": env})


def wait(address: str, job_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
    return status


def cluster_status(address: str) -> dict[str, Any]:
    """Nodes, stage actors by stage and state, and the autoscaler's pending demands, from the dashboard."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    nodes = [{"node_id": n.node_id, "ip": n.node_ip, "state": n.state, "head": bool(n.is_head_node),
              "resources": n.resources_total} for n in list_nodes(address=address, limit=10_000)]
    pools: dict[str, Counter] = {}
    for actor in list_actors(address=address, limit=10_000, filters=[("state", "!=", "DEAD")]):
        match = STAGE_ACTOR.search(actor.class_name or "")
        if match:
            pools.setdefault(match.group(1), Counter())[actor.state] += 1
    # the dashboard's autoscaler report, through the client that carries the cluster's auth token
    response = JobSubmissionClient(address)._do_request("GET", "/api/cluster_status")
    response.raise_for_status()
    report = response.json().get("data", {})
    load = (report.get("clusterStatus") or {}).get("loadMetricsReport") or {}
    return {"nodes": nodes, "pools": {k: dict(v) for k, v in sorted(pools.items())},
            "pending": {"resource_demand": load.get("resourceDemand", []),
                        "placement_groups": load.get("pendingPlacementGroups", []),
                        "autoscaler": report.get("autoscalingStatus") or ""}}


def read_results(run: str, storage: StorageOptions) -> pa.Table:
    fs, path = storage.resolve(run)
    try:
        return pq.read_table(f"{path}/{RESULTS_FILE}", filesystem=fs)
    except FileNotFoundError:
        raise SystemExit(f"error: {join(run, RESULTS_FILE)} does not exist (not a finished run?)") from None


def error_class(message: str) -> str:
    """An error message with its row-specific parts (quoted values, numbers) masked, so alike errors count together."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "(no message)"
    return re.sub(r"'[^']*'|\"[^\"]*\"|\b\d+(\.\d+)?\b", "…", first)[:120]


def audio_span_s(run: str, storage: StorageOptions) -> float | None:
    """Seconds from the first to the last audio file written, a run's wall time when none is given."""
    fs, path = storage.resolve(run)
    infos = [i for i in fs.get_file_info(pafs.FileSelector(f"{path}/audio", allow_not_found=True))
             if i.type == pafs.FileType.File and i.mtime is not None]
    if len(infos) < 2:
        return None
    times = [i.mtime.timestamp() for i in infos]
    return max(times) - min(times)


def summarize(run: str, storage: StorageOptions, node_price: float, nodes: int,
              wall_s: float | None) -> dict[str, Any]:
    results = read_results(run, storage)
    ok = pc.fill_null(pc.equal(results.column("status"), OK), False)
    audio_s = float(pc.sum(results.filter(ok).column("duration_s")).as_py() or 0.0)
    failed = results.filter(pc.invert(ok))
    errors = Counter(error_class(m) for m in failed.column("error").to_pylist())
    stages = {name[len("time_"):-len("_s")]: round(float(pc.sum(results.column(name)).as_py() or 0.0), 3)
              for name in results.column_names if name.startswith("time_") and name.endswith("_s")}
    wall = wall_s if wall_s is not None else audio_span_s(run, storage)
    node_hours = wall * nodes / 3600 if wall else None
    return {
        "run": run, "rows": results.num_rows, "ok": int(pc.sum(ok).as_py() or 0), "failed": failed.num_rows,
        "errors": dict(errors.most_common()), "audio_hours": round(audio_s / 3600, 4),
        "wall_seconds": round(wall, 2) if wall else None,
        "throughput_audio_s_per_s": round(audio_s / wall, 2) if wall else None,
        "stage_seconds": stages, "node_price_per_hour": node_price, "nodes": nodes,
        "cost_per_audio_hour": round(node_hours * node_price / (audio_s / 3600), 4)
        if node_hours and audio_s else None,
    }


def failed_rows(run: str, manifest: str, storage: StorageOptions) -> pa.Table:
    """The manifest's rows without an ok result in `run` (failed, or never written)."""
    fs, path = storage.resolve(manifest)
    table = pq.read_table(path, filesystem=fs)
    results = read_results(run, storage)
    done = results.filter(pc.fill_null(pc.equal(results.column("status"), OK), False)).column("id")
    return table.filter(pc.invert(pc.is_in(table.column("id"), value_set=done)))


def retry_manifest(run: str, rows: pa.Table, storage: StorageOptions) -> str:
    """Write the rows to retry under RUN/_retry/ (whole or not at all) and return its URI."""
    uri = join(run, "_retry", f"manifest-{time.strftime('%Y%m%dT%H%M%S')}.parquet")
    fs, path = storage.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink)
    write_atomic(fs, path, sink.getvalue().to_pybytes())
    return uri


def _text(value: Any, indent: str = "") -> str:
    """Plain text of nested dicts and lists, one `key: value` per line."""
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            nested = isinstance(v, (dict, list)) and v
            lines.append(f"{indent}{k}:" + (f"\n{_text(v, indent + '  ')}" if nested else f" {v if v != {} else '-'}"))
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(f"{indent}- " + (_text(v, indent + "  ").lstrip() if isinstance(v, dict) else str(v))
                         for v in value)
    return f"{indent}{value}"


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: --env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for action in ("up", "down"):
        s = sub.add_parser(action, parents=[common], help=f"ray {action} a cluster config")
        s.add_argument("--config", default=str(DEFAULT_CLUSTER), help="cluster YAML (default: cluster/aws.yaml)")
        s.add_argument("--yes", "-y", action="store_true", help="don't ask for confirmation")
        s.add_argument("--dry-run", action="store_true", help="print the command only")
    # like `ray job submit`, the dashboard address may come from $RAY_ADDRESS
    address = {"default": os.environ.get("RAY_ADDRESS"), "required": "RAY_ADDRESS" not in os.environ,
               "help": "the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"}
    s = sub.add_parser("submit", parents=[common], help="submit a bulk or audiobook job (this checkout is the "
                                                         "working dir); --json goes before KIND")
    s.add_argument("--address", **address)
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job")
    s.add_argument("--wait", action="store_true", help="wait for the job; exit 0 only if it succeeded")
    s.add_argument("--timeout", type=float, default=24 * 3600, help="seconds --wait waits (default: a day)")
    s.add_argument("kind", choices=sorted(ENTRY_POINTS), help="the job; its own arguments follow --")
    s = sub.add_parser("status", parents=[common], help="nodes, stage pools and pending resources")
    s.add_argument("--address", **address)
    s = sub.add_parser("logs", parents=[common], help="a job's logs")
    s.add_argument("job_id")
    s.add_argument("--address", **address)
    for name, what in (("summary", "a run's results"), ("retry-failed", "re-submit a run's failed rows")):
        s = sub.add_parser(name, parents=[common], help=what)
        s.add_argument("run", help="the job's --output (local or s3://)")
        s.add_argument("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL[_S3])")
    s.add_argument("--manifest", required=True, help="the run's text manifest")
    s.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="the cluster's dashboard (default: $RAY_ADDRESS; required unless --dry-run)")
    s.add_argument("--config", help="the run's pipeline config")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job")
    s.add_argument("--dry-run", action="store_true", help="write the retry manifest, print the job, submit nothing; "
                                                          "after --: more of the run's job arguments (--speakers …)")
    s = sub.choices["summary"]
    s.add_argument("--node-price", type=float, default=NODE_PRICE, help=f"$ per node-hour (default {NODE_PRICE})")
    s.add_argument("--nodes", type=int, default=1, help="worker nodes the run used (default 1)")
    s.add_argument("--wall-seconds", type=float,
                   help="the run's wall time (the job summary's wall_seconds; default: first to last audio file)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # everything after `--` goes to the job (bulk_synth.py / audiobook.py) untouched
    cut = argv.index("--") if "--" in argv else len(argv)
    args, job_args = parser().parse_args(argv[:cut]), argv[cut + 1:]
    out: Any
    code = 0
    if args.command in ("up", "down"):
        cmd = ray_command(args.command, args.config, args.yes)
        if args.dry_run:
            out = {"command": shlex.join(cmd)}
        else:
            return subprocess.call(cmd)
    elif args.command == "submit":
        job_id = submit(args.address, args.kind, job_args, _env(args.env))
        out = {"job_id": job_id, "entrypoint": job_entrypoint(args.kind, job_args)}
        if args.wait:
            out["status"] = wait(args.address, job_id, args.timeout)
            code = 0 if out["status"] == "SUCCEEDED" else 1
    elif args.command == "status":
        out = cluster_status(args.address)
    elif args.command == "logs":
        from ray.job_submission import JobSubmissionClient

        logs = JobSubmissionClient(args.address).get_job_logs(args.job_id)
        print(json.dumps({"job_id": args.job_id, "logs": logs}) if args.json else logs, end="\n" * args.json)
        return 0
    elif args.command == "summary":
        out = summarize(args.run, StorageOptions.from_env(args.endpoint_url), args.node_price, args.nodes,
                        args.wall_seconds)
    else:  # retry-failed
        storage = StorageOptions.from_env(args.endpoint_url)
        rows = failed_rows(args.run, args.manifest, storage)
        out = {"rows": rows.num_rows}
        if rows.num_rows:
            manifest = retry_manifest(args.run, rows, storage)
            # the bulk job redoes only rows not ok under --output; the smaller manifest is all it reads
            retry_args = ["--manifest", manifest, "--output", args.run,
                        *(["--config", args.config] * bool(args.config)),
                        *(["--endpoint-url", args.endpoint_url] * bool(args.endpoint_url)), *job_args]
            out.update(manifest=manifest, entrypoint=job_entrypoint("bulk", retry_args))
            if not args.dry_run:
                if not args.address:
                    raise SystemExit("error: retry-failed needs --address (or --dry-run)")
                out["job_id"] = submit(args.address, "bulk", retry_args, _env(args.env))
    print(json.dumps(out, indent=2) if args.json else _text(out))
    return code


if __name__ == "__main__":
    sys.exit(main())
