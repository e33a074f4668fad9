"""Regenerate crd-fields.json from KubeRay's CRDs (ray-operator/config/crd/bases/ray.io_*.yaml):

    python infra/kuberay/derive_crd_fields.py KUBERAY_COMMIT ray.io_rayclusters.yaml ray.io_rayjobs.yaml \
        ray.io_rayservices.yaml > infra/kuberay/crd-fields.json

Each kind's field paths (`a.b[].c`; `*` for map keys and free-form objects) are listed; pod templates
(the same PodTemplateSpec wherever they appear) are listed once, under `PodTemplateSpec`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

POD = "PodTemplateSpec"


def is_pod_template(schema: dict) -> bool:
    return {"metadata", "spec"} <= set(schema.get("properties", {})) and \
        "containers" in schema["properties"]["spec"].get("properties", {})


def walk(schema: dict, path: str, out: set[str], pods: set[str] | None) -> None:
    if path:
        out.add(path)
    if pods is not None and path and is_pod_template(schema):
        out.add(f"{path}.<{POD}>")
        if not pods:
            walk(schema, "", pods, None)
        return
    for name, sub in schema.get("properties", {}).items():
        walk(sub, f"{path}.{name}" if path else name, out, pods)
    if "items" in schema:
        walk(schema["items"], f"{path}[]", out, pods)
    if isinstance(schema.get("additionalProperties"), dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        out.add(f"{path}.*")
        if isinstance(schema.get("additionalProperties"), dict):
            walk(schema["additionalProperties"], f"{path}.*", out, pods)


def main(commit: str, files: list[str]) -> None:
    kinds: dict[str, list[str]] = {}
    pods: set[str] = set()
    for file in files:
        crd = yaml.safe_load(Path(file).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        paths: set[str] = set()
        walk(version["schema"]["openAPIV3Schema"], "", paths, pods)
        kinds[crd["spec"]["names"]["kind"]] = sorted(paths)
    json.dump({"source": f"github.com/ray-project/kuberay@{commit} ray-operator/config/crd/bases",
               "apiVersion": "ray.io/v1", "kinds": kinds, POD: sorted(pods)}, sys.stdout, indent=0)
    print()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
