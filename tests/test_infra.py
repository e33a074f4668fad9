"""Cluster and image definitions stay consistent with the code they launch."""
from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import yaml

from jobs.config import PipelineSpec, load_pipeline, pipeline_names

REPO = Path(__file__).resolve().parents[1]


def test_rayjob_entrypoint_names_real_files_and_options():
    job = yaml.safe_load((REPO / "infra/kuberay/rayjob-bulk-synth.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    from jobs.bulk_synth import parse_args

    args = parse_args(argv[2:])
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")
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


KUBERAY = REPO / "infra" / "kuberay"
CRD = json.loads((KUBERAY / "crd-fields.json").read_text())
POD = "PodTemplateSpec"
OBJECT_META = {"name", "namespace", "labels", "annotations"}


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(KUBERAY.glob("*.yaml"))}


def cluster_specs(doc: dict) -> dict:
    """The RayCluster spec inside any of the three kinds."""
    return {"RayCluster": doc["spec"], "RayJob": doc["spec"].get("rayClusterSpec"),
            "RayService": doc["spec"].get("rayClusterConfig")}[doc["kind"]]


def unknown_fields(value: object, path: str, fields: set[str], pod: set[str]) -> list[str]:
    """Paths of `value` (under `path`) that the schema `fields` lacks; pod templates are checked against `pod`."""
    if path and f"{path}.<{POD}>" in fields:
        return [f"{path}.{p}" for p in unknown_fields(value, "", pod, pod)]
    if isinstance(value, list):
        return [p for item in value for p in unknown_fields(item, f"{path}[]", fields, pod)]
    if not isinstance(value, dict):
        return []
    bad = []
    for key, item in value.items():
        here = f"{path}.{key}" if path else key
        if here in fields:
            bad += unknown_fields(item, here, fields, pod)
        elif f"{path}.*" in fields:  # a map (e.g. rayStartParams, resources.requests) or free-form object
            bad += unknown_fields(item, f"{path}.*", fields, pod)
        else:
            bad.append(here)
    return bad


def test_kuberay_manifests_use_only_fields_of_the_kuberay_crds():
    assert len(manifests()) == 3
    for name, doc in manifests().items():
        assert doc["apiVersion"] == CRD["apiVersion"], name
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"} and set(doc["metadata"]) <= OBJECT_META, name
        bad = unknown_fields(doc["spec"], "spec", set(CRD["kinds"][doc["kind"]]), set(CRD[POD]))
        assert bad == [], f"{name}: fields not in the {doc['kind']} CRD: {bad}"


def node_types() -> dict[str, list[dict[str, float]]]:
    """Worker node shapes per cluster definition: CPUs and GPUs a Ray node of each type offers."""
    aws = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    shapes = {"cluster/aws.yaml": [{"CPU": t["resources"].get("CPU", 0), "GPU": t["resources"].get("GPU", 0)}
                                   for name, t in aws["available_node_types"].items()
                                   if name != aws["head_node_type"]]}
    for name, doc in manifests().items():
        shapes[name] = [{"CPU": float(c["resources"]["limits"]["cpu"]),
                         "GPU": float(c["resources"]["limits"].get("nvidia.com/gpu", 0))}
                        for group in cluster_specs(doc)["workerGroupSpecs"]
                        for c in group["template"]["spec"]["containers"]]
    return shapes


def pipelines() -> dict[str, PipelineSpec]:
    return {name: load_pipeline(name) for name in pipeline_names()}


def fits(pipeline: PipelineSpec, shapes: list[dict[str, float]]) -> list[str]:
    """Stages of `pipeline` whose actor (plus one read/write task beside it) fits on no node shape."""
    return [s.name for s in pipeline.stages
            if not any(s.pool.num_cpus + pipeline.io.num_cpus <= shape["CPU"] and s.pool.num_gpus <= shape["GPU"]
                       for shape in shapes)]


def test_every_stage_pool_fits_the_worker_node_types_it_runs_on():
    shapes, specs = node_types(), pipelines()
    assert {"vits", "vits-two-stage", "test", "chatterbox", "chatterbox-cpu"} <= set(specs)
    for where in ("cluster/aws.yaml", "raycluster.yaml"):  # general clusters run every pipeline
        assert {s["GPU"] > 0 for s in shapes[where]} == {True, False}, f"{where}: a CPU and a GPU worker type"
        for name, spec in specs.items():
            assert fits(spec, shapes[where]) == [], f"{name} does not fit {where}'s worker types"
    from jobs.bulk_synth import parse_args

    job = yaml.safe_load((KUBERAY / "rayjob-bulk-synth.yaml").read_text())
    assert fits(load_pipeline(parse_args(shlex.split(job["spec"]["entrypoint"])[2:]).config),
                shapes["rayjob-bulk-synth.yaml"]) == []
    for model in serve_applications(service_config())[0]["args"]["models"].values():
        assert fits(load_pipeline(model["config"]), shapes["rayservice.yaml"]) == [], model


def test_worker_groups_scale_from_zero_and_gpu_groups_run_the_gpu_image():
    aws = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    assert all(t.get("min_workers", 0) == 0 for t in aws["available_node_types"].values())
    assert aws["available_node_types"]["gpu"]["docker"]["worker_image"].endswith(":gpu")
    for name, doc in manifests().items():
        spec = cluster_specs(doc)
        assert spec["enableInTreeAutoscaling"] is True, name
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            if doc["kind"] != "RayService":  # a service keeps one worker for its replicas
                assert group["minReplicas"] == 0, f"{name}: {group['groupName']} must scale to zero"
            for c in group["template"]["spec"]["containers"]:
                gpu = "nvidia.com/gpu" in c["resources"]["limits"]
                assert c["image"].endswith(":gpu" if gpu else ":cpu"), (name, group["groupName"])
    dockerfile = (REPO / "infra/Dockerfile").read_text()
    version = re.search(r"rayproject/ray:([\d.]+)", dockerfile).group(1)
    assert f"RAY_IMAGE=rayproject/ray:{version}-py311-gpu --build-arg EXTRAS=gpu -t voxray:gpu" in dockerfile
    import tomllib

    assert "gpu" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def service_config() -> dict:
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def serve_applications(config: dict) -> list[dict]:
    return [{k: app[k] for k in ("name", "route_prefix", "import_path", "args")} for app in config["applications"]]


def test_rayservice_serves_the_application_of_configs_serve_yaml():
    """Assumes the Serve app (jobs/serve.py, being written) is the one configs/serve.yaml names."""
    apps = serve_applications(service_config())
    assert apps == serve_applications(yaml.safe_load((REPO / "configs/serve.yaml").read_text()))
    for app in apps:
        module, _, attr = app["import_path"].partition(":")
        source = REPO / f"{module.replace('.', '/')}.py"
        tree = ast.parse(source.read_text())
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | \
            {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert attr in names, f"{source} defines no {attr}"
