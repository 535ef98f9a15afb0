"""cluster/: KubeRay manifests against the KubeRay CRD schemas (a subset kept as test data) with
every pod template against the Kubernetes schemas, the cluster-launcher YAML against Ray's own
schema, and the Dockerfile against the repo's package version and pins."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = json.loads((Path(__file__).parent / "data" / "kuberay_v1_subset.schema.json").read_text())
K8S_VERSION = "1.30"


def cluster_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside a RayCluster, RayJob, RayCronJob or RayService spec."""
    return spec.get("rayClusterSpec", spec.get("rayClusterConfig",
                                               spec.get("jobTemplate", {}).get("rayClusterSpec", spec)))


def pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = cluster_spec(spec)
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]


def validate_pod_template(template: dict[str, Any]) -> None:
    import kubernetes_validate

    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    kubernetes_validate.validate(wrapper, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-audit.yaml", "raycronjob-watch.yaml", "rayservice.yaml"])
def test_kuberay_manifests_validate(name: str) -> None:
    manifest = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    jsonschema.validate(manifest, KUBERAY[manifest["kind"]])
    templates = pod_templates(manifest["spec"])
    assert len(templates) == 2
    for template in templates:
        validate_pod_template(template)
    cluster = cluster_spec(manifest["spec"])
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head does no work
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["enableInTreeAutoscaling"] and gpu["minReplicas"] < gpu["maxReplicas"]
    assert cluster["rayVersion"] == pin("ray")


def test_the_rayservice_serves_the_check_application_with_a_valid_serve_config() -> None:
    """serveConfigV2 against Ray Serve's own schema; its import path is memaudit serve's
    application builder, with arguments it accepts."""
    import inspect

    from ray.serve.schema import ServeDeploySchema

    from audit.pipeline import serve_app

    manifest = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "audit.pipeline.serve_app:app_builder" and serve_app.app_builder
    accepted = set(re.findall(r"\[?(\w+)=", inspect.getdoc(serve_app.app_builder) or ""))
    assert set(app.args) <= accepted and "reference" in app.args, (set(app.args), accepted)
    assert config.http_options.port == 8000
    ports = [p["containerPort"] for p in pod_templates(manifest["spec"])[0]["spec"]["containers"][0]["ports"]]
    assert 8000 in ports


def test_jobs_rely_on_resume_and_finish() -> None:
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-audit.yaml").read_text())["spec"]
    assert job["shutdownAfterJobFinishes"] and job["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0
    assert job["entrypoint"].startswith("python /opt/memaudit/jobs/run.py ")
    cron = yaml.safe_load((CLUSTER / "kuberay" / "raycronjob-watch.yaml").read_text())["spec"]
    assert "jobs/watch.py" in cron["jobTemplate"]["entrypoint"]
    for entry in (job["entrypoint"], cron["jobTemplate"]["entrypoint"]):
        assert (REPO / entry.split()[1].removeprefix("/opt/memaudit/")).is_file()


def test_schema_rejects_what_kuberay_would() -> None:
    manifest = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    manifest["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, KUBERAY["RayCluster"])
    manifest = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    manifest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0]["effect"] = 3
    import kubernetes_validate

    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod_template(manifest["spec"]["workerGroupSpecs"][0]["template"])


def test_cluster_launcher_config_validates_against_rays_schema() -> None:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def pin(name: str) -> str:
    text = (REPO / "constraints.txt").read_text()
    return re.search(rf"^{re.escape(name)}==(\S+)$", text, re.M).group(1)


def test_dockerfile_installs_this_version_with_the_tested_pins() -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    docker = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG MEMAUDIT_VERSION=(\S+)$", docker, re.M).group(1) == version
    assert re.search(r"^FROM rayproject/ray:(\S+?)-py311-cu\d+$", docker, re.M).group(1) == pin("ray")
    assert f"torch=={pin('torch')}" in docker and f"torchvision=={pin('torchvision')}" in docker
    assert "-c /tmp/constraints.txt" in docker
    for image in (CLUSTER / "kuberay").glob("*.yaml"):
        assert f"memaudit:{version}" in image.read_text()
