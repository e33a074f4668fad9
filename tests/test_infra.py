"""Cluster and image definitions stay consistent with the code they launch."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_rayjob_entrypoint_names_real_files_and_options():
    job = yaml.safe_load((REPO / "infra/kuberay/rayjob-bulk-synth.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    from jobs.bulk_synth import parse_args

    args = parse_args(argv[2:])
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")
    from jobs.config import load_pipeline

    load_pipeline(args.config)


def test_cluster_definitions_agree_on_ray_version_and_zero_cpu_head():
    cluster = yaml.safe_load((REPO / "infra/kuberay/raycluster.yaml").read_text())
    job = yaml.safe_load((REPO / "infra/kuberay/rayjob-bulk-synth.yaml").read_text())
    image = re.search(r"rayproject/ray:([\d.]+)", (REPO / "infra/Dockerfile").read_text()).group(1)
    assert cluster["spec"]["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"] == image
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    aws = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    assert aws["available_node_types"][aws["head_node_type"]]["resources"] == {"CPU": 0}


def test_dockerfile_copies_every_package():
    text = (REPO / "infra/Dockerfile").read_text()
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for top in {p.rstrip("*") for p in packages} | {"configs"}:
        assert f"COPY --chown=ray:users {top} {top}" in text, top
